from fasttune.config.base_config import (
    BaseConfig,
    DataConfig,
    GenerationConfig,
    LoraConfig,
    ModelConfig,
    TrainingConfig,
    from_dict,
    to_dict,
)
from fasttune.config.experiments import EXPERIMENTS, get_experiment

__all__ = [
    "BaseConfig",
    "DataConfig",
    "GenerationConfig",
    "LoraConfig",
    "ModelConfig",
    "TrainingConfig",
    "EXPERIMENTS",
    "get_experiment",
    "from_dict",
    "to_dict",
]
