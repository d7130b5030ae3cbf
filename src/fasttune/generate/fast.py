"""Fast generation for HF causal LMs: a preallocated KV cache and CUDA graphs of the decode step, with no compiler.

Greedy tokens must be identical to HF `generate` (sdpa, DynamicCache), so every step runs HF's own forward on the very
tensors HF would see there. In particular attention gets views of the first `t` cached positions, not the whole
preallocated buffer plus a mask: a mask (or a longer key axis) sends SDPA to another kernel with another summation
order, and on a bf16 model one flipped rounding changes a near-tied argmax within a few hundred tokens. Shapes then
depend on `t`, so there is one CUDA graph per KV length, captured the first time that length is decoded (about the
cost of one eager step) and replayed by every later call: the first call runs near HF speed, later calls launch one
graph per token instead of ~780 kernels from Python.

Speed limit of this design: HF's Llama decode step is ~780 small kernels (RMSNorm alone is 8 per norm, RoPE 10 per
layer), ~3.5 us each inside a graph on an H100, so ~2.8 ms per token at batch 1 (measured 338-363 tok/s, 1b shape)
whatever the weights' bandwidth allows. Going faster means fusing those ops, which changes rounding, i.e. tokens.
Determinism: the fast path gives HF's scores bit for bit only where HF's kernels are deterministic; with SDPA's cuDNN
backend (torch 2.11 picks it for H100 decode steps) HF generate does not repeat its own tokens at batch 8 (see
`python -m fasttune.bench.generate --diagnose`).

Legend: B batch, P prompt length, N new tokens, T cache capacity, H key/value heads, D head dim, V vocab.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from fasttune.model.build import head_dim as config_head_dim

log = logging.getLogger("fasttune")

MAX_EOS_IDS = 8  # eos ids live in a fixed-size buffer (padded with -1) so captured graphs never change shape


class _FixedLayer(CacheLayerMixin):
    """One layer's keys/values in preallocated (B, H, T, D) buffers. `update` writes at `write_pos` and returns views of
    the first `seen + q` positions, the same tensors a DynamicCache would return (there: contiguous copies)."""

    is_sliding = False
    is_compileable = False  # HF generate must never mistake it for a StaticCache and build 4D masks for it

    def __init__(self, keys_BHTD: torch.Tensor, values_BHTD: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys_BHTD, values_BHTD
        self.device = keys_BHTD.device
        self.is_initialized = True
        self.seen = 0  # positions already cached before the current forward
        self.write_pos: torch.Tensor | None = None  # (q,) cache positions the current forward writes

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # allocated up front: captured graphs need fixed addresses

    def update(self, key_states, value_states, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys.index_copy_(2, self.write_pos, key_states)
        self.values.index_copy_(2, self.write_pos, value_states)
        t = self.seen + key_states.shape[-2]
        # strided views: SDPA's kernels compute the same bits as on DynamicCache's packed copies (checked on an H100)
        return self.keys[:, :, :t], self.values[:, :, :t]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0  # as DynamicLayer: masks see only the filled part

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class FixedKVCache(Cache):
    """HF `Cache` over preallocated buffers whose lengths, as seen by the model, follow the decode step."""

    def __init__(self, n_layers: int, shape_BHTD: tuple[int, ...], dtype, device):
        def buffer():
            return torch.zeros(shape_BHTD, dtype=dtype, device=device)

        layers = [_FixedLayer(buffer(), buffer()) for _ in range(n_layers)]
        super().__init__(layers=layers)

    def set_step(self, seen: int, write_pos: torch.Tensor) -> None:
        for layer in self.layers:
            layer.seen, layer.write_pos = seen, write_pos


def unsupported_reason(model) -> str | None:
    """Why the fast path cannot run this model exactly like HF generate, or None when it can."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported"
    attn = getattr(config, "_attn_implementation", None)
    if attn != "sdpa":
        return f"attention implementation {attn!r}: the fast path builds sdpa's padding masks (load with sdpa)"
    params = inspect.signature(model.forward).parameters
    missing = [p for p in ("position_ids", "logits_to_keep") if p not in params]
    if missing or _cache_kwarg(model) is None:
        return f"{type(model).__name__}.forward lacks {', '.join(missing) or 'a cache argument'}"
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"} or getattr(text, "sliding_window", None):
        return f"layer types {sorted(kinds)} / sliding window: only full-attention layers are supported"
    return None


def _cache_kwarg(model) -> str | None:
    # transformers 5.24 renamed the forward argument `past_key_values` (5.17) to `cache`
    params = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


@dataclass
class _Slot:
    """Everything a captured graph reads or writes for one batch size; addresses never change while it lives."""

    cache: FixedKVCache
    ids_BT: torch.Tensor  # prompt + generated tokens by position; graph t reads column t-1 and writes column t
    pad_mask_BT: torch.Tensor  # bool, False on left padding
    positions_T: torch.Tensor  # arange(T): graph t writes the cache at positions_T[t-1:t]
    pos_B1: torch.Tensor  # rotary position of the token fed next (differs per row under left padding)
    done_B: torch.Tensor  # rows that emitted EOS; they emit pad from then on, as in HF
    eos_E: torch.Tensor  # eos ids, -1 where unused
    pad: torch.Tensor  # 0-dim pad token id
    graphs: dict[tuple, torch.cuda.CUDAGraph] = field(default_factory=dict)

    @property
    def capacity(self) -> int:
        return self.ids_BT.shape[1]


class FastGenerator:
    """Greedy or sampled generation for one HF causal LM. Keep the object: its graphs serve every later call."""

    def __init__(self, model, use_graphs: bool | None = None, check_every: int = 16):
        if (reason := unsupported_reason(model)) is not None:
            raise ValueError(f"fast generation: {reason}")
        self.model = model
        self.device = next(model.parameters()).device
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        self.check_every = check_every  # EOS is checked on the host every this many tokens: each check is a sync
        self._cache_kw = _cache_kwarg(model)
        self._slots: dict[int, _Slot] = {}
        self._warm: set[tuple] = set()
        self._temperature = torch.ones((), device=self.device)
        self._top_p = torch.ones((), device=self.device)
        if self.use_graphs:
            self._pool = torch.cuda.graph_pool_handle()  # one pool: graphs replay one after another, never together
            self._stream = torch.cuda.Stream(self.device)
        self.capture_seconds = 0.0  # time spent capturing graphs so far, for benchmarks

    @torch.no_grad()
    def generate(
        self,
        input_ids_BP: torch.Tensor,
        attention_mask_BP: torch.Tensor | None = None,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int = 0,
        on_token: Callable[[list[int]], None] | None = None,
    ) -> torch.Tensor:
        """Prompt plus new tokens, (B, P + n) with n <= max_new_tokens, as HF `generate` returns them. Prompts must be
        left-padded. `on_token` gets each step's B new token ids (costs one host sync per token)."""
        input_ids_BP = input_ids_BP.to(self.device)
        batch, prompt_len = input_ids_BP.shape
        mask_BP = torch.ones_like(input_ids_BP) if attention_mask_BP is None else attention_mask_BP.to(self.device)
        padded = not bool(mask_BP.all())
        if padded and not bool(mask_BP[:, -1].all()):
            raise ValueError("fast generation needs left padding: the last prompt column has padding")
        if max_new_tokens <= 0:
            return input_ids_BP.clone()
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if len(eos) > MAX_EOS_IDS:
            raise ValueError(f"at most {MAX_EOS_IDS} eos ids are supported, got {len(eos)}")
        sample = temperature > 0
        self._temperature.fill_(temperature if sample else 1.0)
        self._top_p.fill_(top_p)
        slot = self._slot(batch, prompt_len + max_new_tokens)
        slot.eos_E.fill_(-1)
        slot.eos_E[: len(eos)] = torch.tensor(eos, dtype=torch.long)
        slot.pad.fill_(pad_token_id)
        slot.done_B.zero_()

        self._prefill(slot, input_ids_BP, mask_BP, padded, (sample, top_k))
        if on_token is not None:
            on_token(slot.ids_BT[:, prompt_len].tolist())
        n = 1
        while n < max_new_tokens:
            if eos and (on_token is not None or n % self.check_every == 0) and bool(slot.done_B.all()):
                break
            t = prompt_len + n  # KV length of this step: feeds column t-1, writes column t
            self._run_step(slot, t, (padded, sample, top_k))
            n += 1
            if on_token is not None:
                on_token(slot.ids_BT[:, t].tolist())
        return _trim(slot.ids_BT[:, : prompt_len + n].clone(), prompt_len, eos)

    def _slot(self, batch: int, length: int) -> _Slot:
        slot = self._slots.get(batch)
        if slot is not None and slot.capacity >= length:
            return slot
        self._slots.pop(batch, None)  # frees the old buffers and their graphs
        capacity = -(-length // 256) * 256  # round up: a few longer calls do not reallocate (and recapture) each time
        config = self.model.config.get_text_config(decoder=True)
        heads = config.num_attention_heads
        head_dim = config_head_dim(config)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        dtype = next(self.model.parameters()).dtype
        dev = self.device
        shape_BHTD = (batch, kv_heads, capacity, head_dim)
        cache = FixedKVCache(config.num_hidden_layers, shape_BHTD, dtype, dev)
        slot = _Slot(
            cache=cache,
            ids_BT=torch.zeros((batch, capacity), dtype=torch.long, device=dev),
            pad_mask_BT=torch.ones((batch, capacity), dtype=torch.bool, device=dev),
            positions_T=torch.arange(capacity, device=dev),
            pos_B1=torch.zeros((batch, 1), dtype=torch.long, device=dev),
            done_B=torch.zeros(batch, dtype=torch.bool, device=dev),
            eos_E=torch.full((MAX_EOS_IDS,), -1, dtype=torch.long, device=dev),
            pad=torch.zeros((), dtype=torch.long, device=dev),
        )
        self._slots[batch] = slot
        return slot

    def _prefill(self, slot: _Slot, input_ids_BP, mask_BP, padded: bool, select_key: tuple) -> None:
        prompt_len = input_ids_BP.shape[1]
        slot.ids_BT[:, :prompt_len].copy_(input_ids_BP)
        slot.pad_mask_BT.fill_(True)
        slot.pad_mask_BT[:, :prompt_len].copy_(mask_BP.bool())
        # HF generate's positions: count real tokens only, so left padding does not shift a row's positions
        position_ids_BP = (mask_BP.long().cumsum(-1) - 1).masked_fill(mask_BP == 0, 0)
        slot.pos_B1.copy_(position_ids_BP[:, -1:] + 1)
        slot.cache.set_step(0, slot.positions_T[:prompt_len])
        # no mask without padding: HF drops an all-ones mask too, which lets SDPA use its causal flash kernel
        logits_BV = self._forward(slot, input_ids_BP, position_ids_BP, mask_BP if padded else None)
        self._commit(slot, prompt_len, self._select(logits_BV, *select_key))

    def _forward(self, slot: _Slot, input_ids, position_ids, attention_mask) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: slot.cache},
        )
        return out.logits[:, -1, :].float()  # HF generate scores in float32 too

    def _decode(self, slot: _Slot, t: int, padded: bool, sample: bool, top_k: int) -> None:
        """One decode step at KV length t, on tensors whose addresses do not change: capturable."""
        slot.cache.set_step(t - 1, slot.positions_T[t - 1 : t])
        # the mask HF builds for this step: padding over the t keys (the query is last, so causality masks nothing)
        mask = slot.pad_mask_BT[:, None, None, :t] if padded else None
        logits_BV = self._forward(slot, slot.ids_BT[:, t - 1 : t], slot.pos_B1, mask)
        self._commit(slot, t, self._select(logits_BV, sample, top_k))
        slot.pos_B1.add_(1)

    def _commit(self, slot: _Slot, t: int, next_B: torch.Tensor) -> None:
        next_B = torch.where(slot.done_B, slot.pad, next_B)  # HF: finished rows emit pad
        slot.ids_BT[:, t].copy_(next_B)
        slot.done_B.logical_or_((next_B[:, None] == slot.eos_E[None, :]).any(-1))

    def _select(self, logits_BV: torch.Tensor, sample: bool, top_k: int) -> torch.Tensor:
        if not sample:
            return logits_BV.argmax(-1)  # first index among ties, like HF's argmax on the same float32 scores
        logits_BV = logits_BV / self._temperature  # HF's order: temperature, top-k, top-p
        if top_k > 0:
            kth_B1 = logits_BV.topk(min(top_k, logits_BV.shape[-1])).values[:, -1:]
            logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
        # top-p as HF's TopPLogitsWarper: drop the low tail whose total probability is at most 1 - top_p
        sorted_BV, order_BV = logits_BV.sort(-1)
        drop_sorted_BV = sorted_BV.softmax(-1).cumsum(-1) <= (1 - self._top_p)
        drop_sorted_BV[:, -1] = False
        logits_BV = logits_BV.masked_fill(drop_sorted_BV.scatter(-1, order_BV, drop_sorted_BV), float("-inf"))
        probs_BV = logits_BV.softmax(-1)
        # argmax(p / Exp(1)) is one multinomial draw, without multinomial's host sync: graph-safe
        return (probs_BV / torch.empty_like(probs_BV).exponential_()).argmax(-1)

    def _run_step(self, slot: _Slot, t: int, key: tuple) -> None:
        if not self.use_graphs:
            self._decode(slot, t, *key)
            return
        graph = slot.graphs.get((t, *key))
        if graph is None:
            if key + (slot.ids_BT.shape[0],) not in self._warm:
                # the first step of a kind runs eagerly on the capture stream: lazy inits (cuBLAS handle and
                # workspace for that stream, kernel loads) must not happen inside a capture
                self._on_capture_stream(lambda: self._decode(slot, t, *key))
                self._warm.add(key + (slot.ids_BT.shape[0],))
                return
            graph = self._capture(slot, t, key)
            if graph is None:
                self._decode(slot, t, *key)
                return
        graph.replay()

    def _capture(self, slot: _Slot, t: int, key: tuple) -> torch.cuda.CUDAGraph | None:
        start = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        try:
            # capture_begin rather than `torch.cuda.graph`: that one runs gc.collect() and empty_cache() per capture
            def capture():
                graph.capture_begin(pool=self._pool)
                try:
                    self._decode(slot, t, *key)
                finally:
                    graph.capture_end()

            self._on_capture_stream(capture)
        except RuntimeError as e:
            log.warning("fast generation: CUDA graph capture failed (%s); decoding eagerly from now on", e)
            log.debug("capture failure", exc_info=True)
            self.use_graphs = False
            return None  # a capture only records, so no step ran: the caller runs it eagerly
        slot.graphs[(t, *key)] = graph
        self.capture_seconds += time.perf_counter() - start
        return graph

    def _on_capture_stream(self, fn: Callable[[], None]) -> None:
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            fn()
        current.wait_stream(self._stream)


def _trim(seq_BS: torch.Tensor, prompt_len: int, eos: list[int]) -> torch.Tensor:
    """Cut after the step where the last row finished, as HF stops there (later columns hold only pad)."""
    if not eos:
        return seq_BS
    new_BN = seq_BS[:, prompt_len:].cpu()
    is_eos_BN = torch.isin(new_BN, torch.tensor(eos))
    if not bool(is_eos_BN.any(-1).all()):
        return seq_BS
    last = int(is_eos_BN.int().argmax(-1).max())  # first EOS of each row, latest row
    return seq_BS[:, : prompt_len + last + 1]


def fast_generate(model, input_ids_BP: torch.Tensor, attention_mask_BP: torch.Tensor | None = None,
                  use_graphs: bool | None = None, **kwargs):  # fmt: skip
    """`FastGenerator.generate` with one generator kept on the model, so graphs captured once serve later calls."""
    key = f"_fasttune_generator_{use_graphs}"  # one per setting: a later call never silently gets the other one
    gen = model.__dict__.get(key)
    if gen is None:
        gen = FastGenerator(model, use_graphs=use_graphs)
        model.__dict__[key] = gen
    return gen.generate(input_ids_BP, attention_mask_BP, **kwargs)
