"""Weight decay is grouped as HF Trainer groups it (Trainer.get_decay_parameter_names): no decay on norms (by their
layer type or their name) and biases; every other parameter decays, 1-D ones included (Qwen3-Next's A_log, GPT-OSS's
attention sinks), not only the matrices."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, Trainer

from fasttune.config import get_experiment
from fasttune.model import norm
from fasttune.train.optim import build_optimizer

SHAPE = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, head_dim=8)  # fmt: skip
EXTRA = {
    "llama": dict(attention_bias=True),
    "qwen2": {},
    "gemma": {},
    "qwen3": {},
    "qwen3_next": dict(
        num_hidden_layers=4,
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
    ),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"]),
}


def _decayed(model) -> set[str]:
    """The names of the parameters fasttune's optimizer decays."""
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer, _ = build_optimizer(get_experiment("quick"), model, torch.device("cpu"))
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    return {names[id(p)] for p in optimizer.param_groups[0]["params"]}


@pytest.mark.parametrize("model_type", list(EXTRA))
def test_the_decayed_parameters_are_hf_trainers(model_type):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**SHAPE, **EXTRA[model_type]}))
    norm.apply(model)  # fasttune's lean RMSNorm (a norm's forward replaced): still a norm
    want = set(Trainer.get_decay_parameter_names(None, model)) & {n for n, _ in model.named_parameters()}
    got = _decayed(model)
    assert got == want, (sorted(got - want), sorted(want - got))
    one_d = {n for n, p in model.named_parameters() if p.ndim == 1 and n in want}
    if model_type in ("qwen3_next", "gpt_oss"):  # 1-D parameters that are neither norms nor biases: decayed
        assert one_d, model_type


def test_a_norm_layer_decays_by_its_type_whatever_its_name():
    """A norm whose name says nothing (`scale_in`): its type (nn.LayerNorm, an RMSNorm class) keeps it undecayed."""

    class RMSNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8))

    model = torch.nn.Sequential()
    model.add_module("scale_in", torch.nn.LayerNorm(8))
    model.add_module("proj", torch.nn.Linear(8, 8))
    model.add_module("gain_out", RMSNorm())
    model.register_parameter("gate", torch.nn.Parameter(torch.zeros(8)))
    assert _decayed(model) == {"proj.weight", "gate"}


def test_a_run_started_under_the_old_grouping_resumes_with_it(tmp_path, monkeypatch):
    """Checkpoints before the rule was recorded grouped by dimensions (1-D: no decay); on Qwen3-Next (1-D A_log) the
    groups differ in size, and the optimizer state would not load into HF's grouping (torch refuses it). Such a run
    resumes with its own grouping, and its next checkpoint says which."""
    import dataclasses

    from fixtures.tiny_tokenizer import build_tiny_tokenizer
    from helpers import sft_config

    from fasttune.train import checkpoint, loop

    tok = build_tiny_tokenizer()
    config = AutoConfig.for_model(
        "qwen3_next",
        **{**SHAPE, **EXTRA["qwen3_next"], "vocab_size": len(tok)},
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        mlp_only_layers=[0, 1, 2, 3],
    )  # dense MLPs: the A_log parameters are what this test is about, not the experts
    torch.manual_seed(0)
    path = tmp_path / "qwen3-next"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    cfg = sft_config(tmp_path, path, max_steps=1, save_every=1, eval_every=0)
    with monkeypatch.context() as m:  # the old fasttune: grouped by dimensions, no rule recorded
        m.setattr(loop, "DECAY_RULE", 1)
        loop.train(cfg)
    old = checkpoint.list_checkpoints(cfg.run_dir)[-1]
    state = checkpoint.load_trainer_state(old)
    del state["state"]["decay_rule"]
    torch.save(state, old / checkpoint.STATE_FILE)
    result = loop.train(dataclasses.replace(cfg, resume=True, training=dataclasses.replace(cfg.training, max_steps=2)))
    saved = checkpoint.load_trainer_state(result.checkpoint)
    assert saved["state"]["decay_rule"] == 1
    sizes = [len(g["params"]) for g in saved["optimizer"]["param_groups"]]
    assert sizes == [len(g["params"]) for g in state["optimizer"]["param_groups"]]


def test_a_class_that_only_contains_norm_in_its_name_is_no_norm():
    """RobertaPreLayerNormForCausalLM (the whole model) and its RobertaPreLayerNormLMHead are no norm layers: their
    matrices decay, as HF Trainer decays them; the norms inside them do not."""

    class TinyPreLayerNormLMHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = torch.nn.Linear(8, 8)
            self.ln = torch.nn.LayerNorm(8)

    class TinyPreLayerNormForCausalLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(16, 8)
            self.head = TinyPreLayerNormLMHead()

    model = TinyPreLayerNormForCausalLM()
    hf = set(Trainer.get_decay_parameter_names(None, model))
    assert _decayed(model) == hf == {"embed.weight", "head.dense.weight"}
