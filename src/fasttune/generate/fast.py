"""Fast generation for HF causal LMs: one object per model, one CUDA graph per decode step, greedy or sampled.

Public API (stable; `fasttune generate` / `fasttune eval` build on it):

    gen = Generator(model)              # once per model; owns the fused weights, KV caches and captured graphs
    gen.reason                          # None on the fast path, else why HF `generate` runs instead (log it)
    out_BS = gen.generate(input_ids_BP, attention_mask_BP, max_new_tokens=256, temperature=0.0, top_p=1.0,
                          top_k=0, eos_token_id=[2], pad_token_id=0, on_token=callback, keys=None,
                          stop_strings=None)

`generate` returns prompt + new tokens, (B, P + n), n <= max_new_tokens, as HF `generate` does: prompts left-padded
(`attention_mask` 0 on padding), rows that emitted an EOS id continue with `pad_token_id`, and the output ends at the
step where the last row finished. `temperature=0` is greedy; otherwise HF's order: temperature, top-k, top-p, then
one draw per row with the row's own key (`keys`, from `sampling.sample_key`: the same answer in any batch; None: keys
drawn from torch's global generator, seed it with `torch.manual_seed`). `eos_token_id=None` never stops early.
`stop_strings` (a `stops.StopStrings`): a row also finishes once its new text contains one; it is checked at the host
syncs, and the row's tokens after the one that completed it become `pad_token_id`, as HF's criterion leaves them.
`on_token(tokens_B)` receives each step's B new token ids in order; on the fast path it is called in bursts every
`check_every` steps (each burst is one host sync), so streaming costs almost nothing. Errors (right padding, an
empty prompt, a prompt plus `max_new_tokens` beyond the model's context) raise ValueError with the reason.

The fast path (fasttune/generate/decoder.py, Triton kernels on CUDA in kernels.py) supports Llama, Mistral, Qwen2,
Qwen3 (sliding windows included), Phi-3/Phi-4, Gemma 2/3 text (gemma.py) and the MoE models Mixtral, Qwen2-MoE,
Qwen3-MoE and OLMoE (moe.py) with plain weights; anything else
(another architecture, unmerged LoRA, sharded weights, a generation config that sets a repetition penalty or another
logits processor) runs through HF `generate` with the same arguments, and `reason` says why. A call the fused
decoder cannot run although the model is supported (longrope past original_max_position_embeddings) runs through HF
`generate` too, logged once per reason and kept in `call_reason`. On the CPU, or with `use_graphs=False`, the fused
decoder runs step by step without graphs. Weights changed in place (training between
calls) are re-fused at the next call; a change of the model's device or dtype rebuilds everything.

Per (padded batch size, cache capacity, sampling kind) one graph is captured the first time it is needed (a fraction
of a second) and replayed for every later step, prompt length and call: batch sizes round up to a power of two and
capacities to a power of two of at least 256 tokens, and a larger cache replaces a smaller one. Sampling, the EOS
check and the token bookkeeping run on the device inside the graph; the host only replays it and syncs every
`check_every` steps.

Legend: B batch, P prompt length, T cache capacity, V vocab, E eos ids.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers.generation.streamers import BaseStreamer

from fasttune.generate import gemma
from fasttune.generate.decoder import FusedDecoder
from fasttune.generate.decoder import unsupported_reason as decoder_unsupported_reason
from fasttune.generate.sampling import draw, hf_sampling, row_uniform
from fasttune.generate.stops import StopOnText, StopStrings
from fasttune.model.context import context_length

log = logging.getLogger("fasttune")

MAX_EOS_IDS = 8  # eos ids live in a fixed-size buffer (padded with -1) so captured graphs never change shape
MIN_CAPACITY = 256  # smallest KV cache: short calls share one cache (and one graph)


# generation config settings that change HF `generate`'s tokens, greedy ones included, with their neutral values: the
# fast path applies none of them, so a model whose generation_config.json sets one (Qwen2.5-Instruct's
# repetition_penalty 1.05) runs through HF `generate`, which applies it as plain HF does
_PROCESSING = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None, "sequence_bias": None,
               "suppress_tokens": None, "begin_suppress_tokens": None, "min_length": 0, "min_new_tokens": 0,
               "forced_bos_token_id": None, "forced_eos_token_id": None, "exponential_decay_length_penalty": None,
               "num_beams": 1}  # fmt: skip


def unsupported_reason(model) -> str | None:
    """Why the fast path cannot run `model` (HF `generate` will), or None when it can."""
    if getattr(model.config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported"
    config = getattr(model, "generation_config", None)
    for name, neutral in _PROCESSING.items():
        value = getattr(config, name, None)
        if value not in (None, neutral, [], {}):  # an empty list of suppressed tokens suppresses none
            return f"generation_config.json sets {name}={value!r}, which the fast path does not apply"
    return gemma.unsupported_reason(model) if gemma.handles(model) else decoder_unsupported_reason(model)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass
class _State:
    """Everything a captured graph reads or writes for one padded batch size; addresses never change while it lives."""

    cache: torch.Tensor  # (L, 2, B, Hkv, T, D)
    ids_BT: torch.Tensor  # prompt + generated tokens by cache slot; a step reads slot s and writes s + 1
    bias_B11T: torch.Tensor  # additive attention mask: 0 on written real tokens, -inf on padding and unwritten slots
    pos_B: torch.Tensor  # rotary position of the token fed next (differs per row under left padding)
    slot_1: torch.Tensor  # cache slot of the token fed next
    done_B: torch.Tensor  # rows that emitted EOS (or are batch padding); they emit pad from then on, as in HF
    keys_B: torch.Tensor  # each row's sample key (sampling.py): its random numbers depend on it and the step only
    start_1: torch.Tensor  # cache slot of the first new token (the padded prompt length)
    eos_E: torch.Tensor  # eos ids, -1 where unused
    pad: torch.Tensor  # 0-dim pad token id
    graphs: dict[tuple, torch.cuda.CUDAGraph] = field(default_factory=dict)
    warm: set[tuple] = field(default_factory=set)

    @property
    def capacity(self) -> int:
        return self.ids_BT.shape[1]


@dataclass
class _Call:
    """One `generate` call's settings, as the fast path's steps read them."""

    batch: int
    prompt_len: int  # padded
    max_new: int
    eos: list[int]
    pad: int
    key: tuple[bool, int]  # (sample, top_k): which captured graph runs the steps
    on_token: Callable[[list[int]], None] | None
    stops: StopStrings | None


class _CallbackStreamer(BaseStreamer):
    """HF `generate`'s streamer protocol (prompt first, then one (B,) tensor per step) as `on_token` calls."""

    def __init__(self, on_token: Callable[[list[int]], None]):
        self.on_token, self.prompt_seen = on_token, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.on_token(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


class Generator:
    """Greedy or sampled generation for one HF causal LM (see the module docstring). Keep the object: its fused
    weights, caches and graphs serve every later call; weights are re-fused when the model's change (training)."""

    def __init__(self, model, *, use_graphs: bool | None = None, check_every: int = 16):
        self.model = model
        self.reason = unsupported_reason(model)
        self.call_reason: str | None = None  # why the last call ran through HF `generate` on a supported model
        self._logged: set[str] = set()
        self.check_every = check_every
        self.capture_seconds = 0.0  # time spent capturing graphs so far, for benchmarks
        self.prefill_seconds = 0.0  # the last call's prompt pass (a first call's includes CUDA's lazy start-up)
        self._graphs_asked = use_graphs
        self._build()

    def _build(self) -> None:
        """Fused weights, caches and graphs for the model's current device and dtype."""
        self.device = next(self.model.parameters()).device
        on_cuda = self.device.type == "cuda"
        self.use_graphs = on_cuda if self._graphs_asked is None else self._graphs_asked
        if self.use_graphs and not on_cuda:
            raise ValueError("use_graphs=True needs the model on a CUDA device")
        decoder = gemma.GemmaDecoder if gemma.handles(self.model) else FusedDecoder
        self.decoder = decoder(self.model) if self.reason is None else None
        self._states: dict[int, _State] = {}
        self._temperature = torch.ones((), device=self.device)
        self._top_p = torch.ones((), device=self.device)
        if self.use_graphs and self.decoder is not None:
            self._pool = torch.cuda.graph_pool_handle()  # one pool: graphs replay one after another, never together
            self._stream = torch.cuda.Stream(self.device)

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
        keys: list[int] | None = None,
        stop_strings: StopStrings | None = None,
    ) -> torch.Tensor:
        """Prompt plus new tokens, (B, P + n) with n <= max_new_tokens (see the module docstring)."""
        self.prefill_seconds = 0.0
        ids_BP = input_ids_BP.to(self.device)
        mask_BP = torch.ones_like(ids_BP) if attention_mask_BP is None else attention_mask_BP.to(self.device)
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        longest = self._check(ids_BP, mask_BP, max_new_tokens, eos)
        if max_new_tokens <= 0:
            return ids_BP.clone()
        if keys is None:  # greedy draws nothing: the global generator is left as it is
            keys = torch.randint(0, 1 << 32, (len(ids_BP),)).tolist() if temperature > 0 else [0] * len(ids_BP)
        call = _Call(*ids_BP.shape, max_new_tokens, eos, pad_token_id, (temperature > 0, top_k), on_token,
                     stop_strings if stop_strings else None)  # fmt: skip
        if self._hf_runs(longest + max_new_tokens - 1):
            return self._hf_generate(ids_BP, mask_BP, max_new_tokens, (temperature, top_p, top_k), eos, pad_token_id,
                                     on_token, keys, call.stops)  # fmt: skip
        ids_BP, mask_BP = self._follow_model(ids_BP, mask_BP)
        state = self._start(call, keys, temperature, top_p)
        start = self._clock()
        self._prefill(state, ids_BP, mask_BP, call.key)
        self.prefill_seconds = self._clock() - start
        return self._decode(state, call)

    def _hf_runs(self, positions: int) -> bool:
        """Whether this call runs through HF `generate`: an unsupported model, or a call of `positions` (the longest
        real prompt plus the new tokens fed back: the positions HF's RoPE sees) the fused decoder cannot run, whose
        reason (`call_reason`) is logged once."""
        self.call_reason = None if self.decoder is None else self.decoder.call_reason(positions)
        if self.call_reason and self.call_reason not in self._logged:
            self._logged.add(self.call_reason)
            log.info("fast generation: HF generate for this call (%s)", self.call_reason)
        return self.decoder is None or self.call_reason is not None

    def _follow_model(self, ids_BP: torch.Tensor, mask_BP: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rebuild for a model moved or cast since the last call (model.to(...)), and re-fuse changed weights."""
        first = next(self.model.parameters())
        if (first.device, first.dtype) != (self.decoder.device, self.decoder.dtype):
            self._build()
            ids_BP, mask_BP = ids_BP.to(self.device), mask_BP.to(self.device)
        self.decoder.refresh()
        return ids_BP, mask_BP

    def _start(self, call: _Call, keys: list[int], temperature: float, top_p: float) -> _State:
        """The state of this call's padded batch size and length, its settings written into the graphs' inputs."""
        self._temperature.fill_(temperature if temperature > 0 else 1.0)
        self._top_p.fill_(top_p)
        state = self._state(_pow2(call.batch) if self.use_graphs else call.batch, call.prompt_len + call.max_new)
        state.eos_E.fill_(-1)
        state.eos_E[: len(call.eos)] = torch.tensor(call.eos, dtype=torch.long)
        state.pad.fill_(call.pad)
        state.done_B.fill_(True)  # batch padding rows count as finished
        state.done_B[: call.batch] = False
        state.keys_B.zero_()
        state.keys_B[: call.batch] = torch.tensor(keys, dtype=torch.long)
        state.start_1.fill_(call.prompt_len)
        return state

    def _decode(self, state: _State, call: _Call) -> torch.Tensor:
        """The steps after the prompt pass, host syncs every `check_every` steps (streaming, EOS, stop strings); the
        output trimmed and streamed as HF's."""
        batch, prompt_len, eos = call.batch, call.prompt_len, call.eos
        streamed, stopped = 0, {}  # rows checked for stop strings: _check_stops
        n = 1  # new tokens so far
        while n < call.max_new:
            if n % self.check_every == 0 or (n == 1 and eos):  # also right after the prompt: EOS first
                streamed = self._stream_out(state, batch, prompt_len, streamed, n, eos, call.on_token)
                self._check_stops(state, batch, prompt_len, n, eos, call.stops, stopped)
                if (eos or call.stops) and bool(state.done_B.all()):
                    break
            self._run_step(state, call.key)
            n += 1
        self._check_stops(state, batch, prompt_len, n, eos, call.stops, stopped)
        out_BS = _trim(state.ids_BT[:batch, : prompt_len + n].clone(), prompt_len, eos, stopped, call.pad)
        self._stream_out(state, batch, prompt_len, streamed, out_BS.shape[1] - prompt_len, eos, call.on_token)
        return out_BS

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _check_stops(self, state: _State, batch: int, prompt_len: int, n: int, eos: list[int],
                     stops: StopStrings | None, stopped: dict[int, int | None]) -> None:  # fmt: skip
        """Rows whose new text (up to their EOS) now contains a stop string finish: `stopped[row]` is the new tokens
        up to the one that completed it (they emit pad from the next step on); None: ended by EOS before one."""
        if stops is None or len(stopped) == batch:
            return
        new_BN = state.ids_BT[:batch, prompt_len : prompt_len + n].cpu()
        done_B = state.done_B[:batch].cpu()
        for r in (r for r in range(batch) if r not in stopped):
            ids = new_BN[r].tolist()
            end_eos = next((i for i, t in enumerate(ids) if t in eos), None) if bool(done_B[r]) else None
            stopped[r] = end = stops.find(ids if end_eos is None else ids[:end_eos])
            if end is not None:
                state.done_B[r] = True
            elif end_eos is None:
                del stopped[r]  # still generating

    def _check(self, ids_BP: torch.Tensor, mask_BP: torch.Tensor, max_new_tokens: int, eos: list[int]) -> int:
        """The longest prompt's real tokens; a ValueError naming what is wrong with the arguments."""
        if ids_BP.ndim != 2 or ids_BP.shape[1] == 0 or mask_BP.shape != ids_BP.shape:
            raise ValueError(f"input_ids must be a non-empty (batch, length) tensor, got {tuple(ids_BP.shape)}")
        if not bool(mask_BP[:, -1].all()):
            raise ValueError("prompts must be left-padded: the last column of attention_mask has padding")
        if not bool(mask_BP.any(-1).all()):
            raise ValueError("a prompt is empty: its attention_mask row is all zeros")
        if len(eos) > MAX_EOS_IDS:
            raise ValueError(f"at most {MAX_EOS_IDS} eos ids are supported, got {len(eos)}")
        limit = context_length(self.model.config)
        longest = int(mask_BP.sum(-1).max())
        if limit is not None and longest + max_new_tokens > limit:
            raise ValueError(
                f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's context of "
                f"{limit} positions: shorten the prompt or lower max_new_tokens"
            )
        return longest

    def _state(self, batch: int, length: int) -> _State:
        state = self._states.get(batch)
        if state is not None and state.capacity >= length:
            return state
        self._states.pop(batch, None)  # frees the old cache and its graphs
        capacity = max(MIN_CAPACITY, _pow2(length))
        dev = self.device
        state = _State(
            cache=self.decoder.new_cache(batch, capacity),
            ids_BT=torch.zeros((batch, capacity), dtype=torch.long, device=dev),
            bias_B11T=torch.zeros((batch, 1, 1, capacity), dtype=self.decoder.dtype, device=dev),
            pos_B=torch.zeros(batch, dtype=torch.long, device=dev),
            slot_1=torch.zeros(1, dtype=torch.long, device=dev),
            done_B=torch.zeros(batch, dtype=torch.bool, device=dev),
            keys_B=torch.zeros(batch, dtype=torch.long, device=dev),
            start_1=torch.zeros(1, dtype=torch.long, device=dev),
            eos_E=torch.full((MAX_EOS_IDS,), -1, dtype=torch.long, device=dev),
            pad=torch.zeros((), dtype=torch.long, device=dev),
        )
        self._states[batch] = state
        return state

    def _prefill(self, state: _State, ids_BP: torch.Tensor, mask_BP: torch.Tensor, key: tuple) -> None:
        batch, prompt_len = ids_BP.shape
        rows, capacity = state.ids_BT.shape
        if rows > batch:  # batch padding: copies of row 0, already finished
            ids_BP = torch.cat([ids_BP, ids_BP[:1].expand(rows - batch, -1)])
            mask_BP = torch.cat([mask_BP, mask_BP[:1].expand(rows - batch, -1)])
        real_BP = mask_BP.bool()
        state.ids_BT[:, :prompt_len].copy_(ids_BP)
        # HF generate's positions: count real tokens only, so left padding does not shift a row's positions
        pos_BP = (mask_BP.long().cumsum(-1) - 1).masked_fill(~real_BP, 1)
        state.pos_B.copy_(pos_BP[:, -1] + 1)
        state.slot_1.fill_(prompt_len)
        real_BT = torch.zeros((rows, capacity), dtype=torch.bool, device=self.device)
        real_BT[:, :prompt_len] = real_BP
        state.bias_B11T.copy_(torch.zeros_like(state.bias_B11T).masked_fill(~real_BT[:, None, None], float("-inf")))
        logits_BV = self.decoder.prefill(ids_BP, pos_BP, real_BP, state.cache)  # in chunks: no (P, P) mask
        self._commit(state, state.slot_1, self._select(logits_BV, *key, row_uniform(state.keys_B, 0)))

    def _step(self, state: _State, sample: bool, top_k: int) -> None:
        """One decode step on tensors whose addresses never change, with no host sync: capturable."""
        slot_1 = state.slot_1
        state.bias_B11T.index_fill_(-1, slot_1, 0.0)  # the token fed now becomes visible to itself and later ones
        ids_B1 = state.ids_BT.index_select(1, slot_1)
        logits_BV = self.decoder.forward(ids_B1, state.pos_B[:, None], slot_1, state.cache, state.bias_B11T)
        next_slot_1 = slot_1 + 1
        u_B = row_uniform(state.keys_B, next_slot_1 - state.start_1) if sample else None  # the new token's step
        self._commit(state, next_slot_1, self._select(logits_BV, sample, top_k, u_B))
        state.pos_B.add_(1)
        slot_1.copy_(next_slot_1)

    def _commit(self, state: _State, slot_1: torch.Tensor, next_B: torch.Tensor) -> None:
        next_B = torch.where(state.done_B, state.pad, next_B)  # HF: finished rows emit pad
        state.ids_BT.index_copy_(1, slot_1, next_B[:, None])
        state.done_B.logical_or_((next_B[:, None] == state.eos_E[None, :]).any(-1))

    def _select(self, logits_BV: torch.Tensor, sample: bool, top_k: int, u_B: torch.Tensor | None) -> torch.Tensor:
        if not sample:
            return logits_BV.argmax(-1)  # first index among ties, like HF's argmax on float32 scores
        logits_BV = logits_BV / self._temperature  # HF's order: temperature, top-k, top-p
        if top_k > 0:
            kth_B1 = logits_BV.topk(min(top_k, logits_BV.shape[-1])).values[:, -1:]
            logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
        # top-p as HF's TopPLogitsWarper: drop the low tail whose total probability is at most 1 - top_p
        sorted_BV, order_BV = logits_BV.sort(-1)
        drop_sorted_BV = sorted_BV.softmax(-1).cumsum(-1) <= (1 - self._top_p)
        drop_sorted_BV[:, -1] = False
        logits_BV = logits_BV.masked_fill(drop_sorted_BV.scatter(-1, order_BV, drop_sorted_BV), float("-inf"))
        # one draw per row with the row's own uniform number (sampling.py), without multinomial's host sync: graph-safe
        return draw(logits_BV.float().softmax(-1), u_B)

    def _run_step(self, state: _State, key: tuple) -> None:
        if not self.use_graphs:
            self._step(state, *key)
            return
        graph = state.graphs.get(key)
        if graph is None:
            if key not in state.warm:
                # the first step of a kind runs eagerly on the capture stream: lazy inits (cuBLAS handle and
                # workspace for that stream, kernel loads) must not happen inside a capture
                start = time.perf_counter()
                self._on_capture_stream(lambda: self._step(state, *key))
                state.warm.add(key)
                self.capture_seconds += time.perf_counter() - start
                return
            graph = self._capture(state, key)
            if graph is None:
                self._step(state, *key)
                return
        graph.replay()

    def _capture(self, state: _State, key: tuple) -> torch.cuda.CUDAGraph | None:
        start = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        try:
            # capture_begin rather than `torch.cuda.graph`: that one runs gc.collect() and empty_cache() per capture
            def capture():
                graph.capture_begin(pool=self._pool)
                try:
                    self._step(state, *key)
                finally:
                    graph.capture_end()

            self._on_capture_stream(capture)
        except RuntimeError as e:
            log.warning("fast generation: CUDA graph capture failed (%s); decoding without graphs from now on", e)
            log.debug("capture failure", exc_info=True)
            self.use_graphs = False
            return None  # a capture only records, so no step ran: the caller runs it eagerly
        state.graphs[key] = graph
        self.capture_seconds += time.perf_counter() - start
        return graph

    def _on_capture_stream(self, fn: Callable[[], None]) -> None:
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            fn()
        current.wait_stream(self._stream)

    def _stream_out(self, state: _State, batch: int, prompt_len: int, streamed: int, upto: int, eos: list[int],
                    on_token: Callable[[list[int]], None] | None) -> int:  # fmt: skip
        """Hand new columns [streamed, upto) to `on_token`, stopping after the step where the last row finished."""
        if on_token is None or upto <= streamed:
            return upto
        cols_BN = state.ids_BT[:batch, prompt_len + streamed : prompt_len + upto].cpu()
        finished_B = torch.zeros(batch, dtype=torch.bool)
        if streamed and eos:  # rows already done before this burst
            finished_B = torch.isin(state.ids_BT[:batch, prompt_len : prompt_len + streamed].cpu(), torch.tensor(eos))
            finished_B = finished_B.any(-1)
        for col_B in cols_BN.t():
            if bool(finished_B.all()):
                break
            on_token(col_B.tolist())
            if eos:
                finished_B |= torch.isin(col_B, torch.tensor(eos))
        return upto

    def _hf_generate(self, ids_BP, mask_BP, max_new_tokens, sampling, eos, pad, on_token, keys, stops):
        """HF `generate` with the same arguments, for models the fast path does not support: greedy, with the
        sampling (HF's warpers, then the rows' own draws: sampling.hf_sampling) and stop strings as processors."""
        config = copy.deepcopy(self.model.generation_config)  # every setting in it: transformers >= 5.17 warns
        config.eos_token_id = eos or None  # about a generation_config passed beside generation arguments
        config.pad_token_id = pad
        config.max_new_tokens, config.do_sample = max_new_tokens, False
        # HF's neutral values (None would be refilled from the model's own generation config: an Instruct model's
        # sampling settings, then a warning that greedy decoding ignores them)
        config.temperature, config.top_p, config.top_k = 1.0, 1.0, 50
        streamer = None if on_token is None else _CallbackStreamer(on_token)
        prompt_len = ids_BP.shape[1]
        return self.model.generate(ids_BP, attention_mask=mask_BP, generation_config=config, streamer=streamer,
                                   logits_processor=hf_sampling(*sampling, keys, prompt_len),
                                   stopping_criteria=[StopOnText(stops, prompt_len)] if stops else None)  # fmt: skip


def _trim(seq_BS: torch.Tensor, prompt_len: int, eos: list[int], stopped: dict[int, int | None],
          pad: int) -> torch.Tensor:  # fmt: skip
    """Pad after each stop string (HF's criterion stops the row there), and cut after the step where the last row
    finished, as HF stops there (later columns hold only pad)."""
    ends = [None] * seq_BS.shape[0]  # new tokens of each finished row
    if eos:
        is_eos_BN = torch.isin(seq_BS[:, prompt_len:].cpu(), torch.tensor(eos))
        ends = [int(row.int().argmax()) + 1 if bool(row.any()) else None for row in is_eos_BN]
    for row, end in stopped.items():
        if end is not None:  # a stop string before any EOS
            ends[row] = end
            seq_BS[row, prompt_len + end :] = pad
    if any(end is None for end in ends):
        return seq_BS
    return seq_BS[:, : prompt_len + max(ends)]
