"""The one table of attention backends: what each is, needs and lacks, and the function that runs it.

select (auto's preferences and fallbacks), dispatch (per-call feature fallbacks, registration), probe (availability),
doctor (rows, versions, install hints) and bench read these records and nothing else. Adding a backend = one record
here + its impl (impls.py, one signature for every layout).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fasttune.attention import impls, kernels

HALF = (torch.float16, torch.bfloat16)
AUTO_HF_NAME = "fasttune_auto"  # routes each call by layout and row length (select.Plan)


@dataclass(frozen=True, eq=False)
class Backend:
    name: str  # fasttune's name (config attn_implementation)
    # registered into transformers under this name. Names avoid the substrings "sdpa", "flash" and
    # "flex_attention": transformers runs its own dispatch checks (and generation special cases) on any name
    # containing them.
    hf_name: str
    impl: Callable  # impls.py: (q_BHSD, k_BKLD, v_BKLD, padding_BL, varlen, *, scale, window, softcap, dropout)
    label: str  # for people (doctor rows)
    module: str | None = None  # must import for the backend to be usable
    pip: str | None = None  # what to pip install when `module` is missing
    dists: tuple[str, ...] = ()  # pip distributions that may provide `module` (doctor shows the version)
    cuda: bool = False  # needs a CUDA GPU
    min_cc: tuple[int, int] = (0, 0)  # CUDA compute capability range
    max_cc: tuple[int, int] = (99, 99)
    dtypes: tuple[torch.dtype, ...] | None = None  # None: any
    max_head_dim: int | None = None
    softcap: bool = True  # computes a logit softcap itself (else such calls run on eager, logged)
    dropout: bool = True  # computes attention dropout itself (else such calls run on sdpa, logged)
    window: bool = True  # computes a sliding window itself (every backend does: sdpa/eager through a mask)
    cpu_backward: bool = True  # has a backward on CPU (trains there)
    # auto's preference per GPU family and layout: lower is tried first; absent: never picked by auto there.
    rank: dict[tuple[str, str], int] = field(default_factory=dict)


FLASH = dict(cuda=True, dtypes=HALF, max_head_dim=256)


def _flash(name: str, api: str):
    return impls.varlen_family(kernels.flash_varlen(name, api), kernels.flash_dense(name, api))


# auto's ranks were measured on H100 (docs/BENCHMARKS.md, bf16 causal fwd+bwd TFLOP/s, packed 4k documents: FA4 499 >
# flex 254 ~ sdpa->varlen 250 ~ varlen 248). Packed: every flash kernel and varlen take documents natively; sdpa
# packs through varlen on CUDA anyway, and compiled flex recompiles as pack lengths change, so it sits behind varlen.
# CPU: flex is unfused without a GPU compile and varlen does not exist; sdpa has a fused CPU kernel.
# A backend added here is added to NAMES in __init__.py too (the config's choices, known without importing torch).
# fmt: off
_RECORDS = (
    Backend("eager", "fasttune_eager", impls.eager, "eager (reference)",
            rank={("cpu", "rows"): 1, ("cpu", "packed"): 1}),
    Backend("sdpa", "fasttune_sdp", impls.sdpa, "torch sdpa", softcap=False,
            rank={("hopper", "rows"): 1, ("ampere", "rows"): 1, ("ampere", "packed"): 3, ("cpu", "rows"): 0,
                  ("cpu", "packed"): 0}),
    Backend("flex_attention", "fasttune_flex", impls.flex, "flex attention",
            module="torch.nn.attention.flex_attention", dropout=False, cpu_backward=False,
            rank={("hopper", "rows"): 3, ("hopper", "packed"): 4, ("ampere", "rows"): 2, ("ampere", "packed"): 2}),
    Backend("varlen", "fasttune_varlen", impls.torch_varlen, "varlen (torch)", module="torch.nn.attention.varlen",
            min_cc=(8, 0), softcap=False, dropout=False,
            rank={("hopper", "packed"): 3, ("ampere", "rows"): 3, ("ampere", "packed"): 1}, **FLASH),
    # flash-attn-4 also installs a `flash_attn` package (holding only .cute): FA2 is its compiled extension.
    Backend("flash_attention_2", "fasttune_fa2", _flash("flash_attention_2", "flash_attn"), "flash-attn 2",
            module="flash_attn_2_cuda", pip="flash-attn", dists=("flash-attn",), min_cc=(8, 0),
            rank={("hopper", "rows"): 4, ("hopper", "packed"): 2, ("ampere", "rows"): 0, ("ampere", "packed"): 0},
            **FLASH),
    Backend("flash_attention_3", "fasttune_fa3", _flash("flash_attention_3", "flash_attn_interface"), "flash-attn 3",
            module="flash_attn_interface", pip="flash-attn-3 (built from hopper/)",
            dists=("flash-attn-3", "flash_attn_3", "flashattn-hopper"), min_cc=(9, 0), max_cc=(9, 9), dropout=False,
            rank={("hopper", "rows"): 2, ("hopper", "packed"): 1}, **FLASH),
    Backend("flash_attention_4", "fasttune_fa4", _flash("flash_attention_4", "flash_attn.cute"), "flash-attn 4",
            module="flash_attn.cute", pip="flash-attn-4", dists=("flash-attn-4",), min_cc=(9, 0), max_cc=(10, 9),
            dropout=False, rank={("hopper", "rows"): 0, ("hopper", "packed"): 0}, **FLASH),
)
# fmt: on
BACKENDS: dict[str, Backend] = {b.name: b for b in _RECORDS}


def preference(family: str, layout: str) -> tuple[str, ...]:
    """auto's order of backends to try for a GPU family ('hopper', 'ampere', 'cpu') and layout ('rows', 'packed')."""
    ranked = [b for b in _RECORDS if (family, layout) in b.rank]
    return tuple(b.name for b in sorted(ranked, key=lambda b: b.rank[family, layout]))
