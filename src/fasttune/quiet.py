"""Log and warning filters for third-party lines fasttune's users can do nothing about; --debug shows them all.
Imports nothing heavy: the command line installs the log filters with its logging setup, before it parses (and before
`--help`, which imports neither torch nor transformers); the training package installs them when it is imported
(fasttune/train/__init__.py: before torch and transformers, whose import prints torchao's lines), and `train()` runs
under `quiet_output`, so that a script calling it gets the command line's output. A script sees the hidden lines as
--debug does: with fasttune's logger at DEBUG."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Callable, Iterator

log = logging.getLogger("fasttune")


class _Drop(logging.Filter):
    """Drops records containing one of `needles`, logging them to fasttune's debug log instead (seen with --debug)."""

    def __init__(self, *needles: str):
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(n in message for n in self.needles):
            log.debug("%s (hidden: not needed by fasttune)", message)
            return False
        return True


_QUIET = {
    "torchao": _Drop("Failed to load"),
    "torchao.kernel.intmm": _Drop("Detected no triton"),  # int8 matmul kernels (CPU machines have no triton)
    "torch.utils._pytree": _Drop("is an Enum subclass and is now natively supported"),
}


def quiet_torchao() -> None:
    """torchao's import (by fasttune for adamw_8bit, and by transformers on every model load once torchao is
    installed) tries to load its CUDA extensions (mxfp8, cutlass kernels) and logs a 'Failed to load ..._C_*.so'
    warning for each it cannot load (every CPU machine, other CUDA builds), on a CPU machine it warns that triton
    is missing (for its int8 matmul kernels), and torch >= 2.13 logs a deprecation
    notice about torchao's enum registration. 8-bit AdamW is plain PyTorch compiled by torch.compile and needs none
    of those extensions: these lines go to the debug log (--debug). Every other message, and every import error,
    stays. Process-wide (the command line calls it with its logging setup); calling it again changes nothing."""
    for name, f in _QUIET.items():
        logging.getLogger(name).addFilter(f)  # a no-op when already added


def progress_bars_off() -> Callable[[], None]:
    """transformers' "Loading weights" / "Writing model shards" bars off (on every model load and save they drown the
    output); returns what puts them back as they were. Set in huggingface_hub, which transformers reads when it is
    imported: a command that stops before it loads a model (a --checkpoint that is not there) does not import
    transformers (seconds) for this; set in transformers itself where it is imported."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    hub_off = are_progress_bars_disabled()
    hf_logging = sys.modules.get("transformers.utils.logging")
    hf_on = hf_logging is not None and hf_logging.is_progress_bar_enabled()
    disable_progress_bars()
    if hf_logging is not None:
        hf_logging.disable_progress_bar()

    def restore() -> None:
        if hf_on:
            hf_logging.enable_progress_bar()
        disable_progress_bars() if hub_off else enable_progress_bars()

    return restore


@contextlib.contextmanager
def quiet_output() -> Iterator[None]:
    """The command line's quiet output around a call from a script (`train(cfg)`): torchao's lines hidden
    (quiet_torchao) and transformers' progress bars off while it runs, back as they were after; with fasttune's debug
    log shown (the command line's --debug), the bars stay, as --debug shows them."""
    quiet_torchao()
    restore = None if debugging() else progress_bars_off()
    try:
        yield
    finally:
        if restore is not None:
            restore()


def debugging() -> bool:
    """Whether fasttune's debug log is shown (--debug): then no third-party line is hidden."""
    return log.isEnabledFor(logging.DEBUG)


def ignore_warning(message: str, category: type[Warning]) -> None:
    """Ignore the Python warnings of `category` whose message starts with the regex `message` (as
    warnings.filterwarnings matches it), process-wide or inside a `warnings.catch_warnings()` block; with --debug
    (fasttune's log at DEBUG) nothing is ignored: they are shown as Python shows them."""
    if not debugging():
        warnings.filterwarnings("ignore", message=message, category=category)


# peft (<= 0.21) reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model (get_peft_model,
# PeftModel.from_pretrained): a FutureWarning with a site-packages path about code the user cannot change
PEFT_READS_DEPRECATED = ("`is_gradient_checkpointing` is deprecated", FutureWarning)

# peft (0.21) fuses the gate and up adapters it makes of Llama-style targets on MoE experts that transformers 5 fuses
# (gate_up_proj: twice the rank and alpha, in rank_pattern / alpha_pattern), then warns that those keys matched no
# targeted module: its check reads the experts module's name, not the parameter's; the ranks apply all the same
# (model/lora.py checks them, tests/test_lora_moe.py reads the adapter shapes)
PEFT_FUSED_PATTERNS = (r"The following (rank|alpha)_pattern keys did not match any targeted module and were ignored: "
                       r"\['\.\*\\\\\.gate_up_proj'\]\.$", RuntimeWarning)  # fmt: skip
