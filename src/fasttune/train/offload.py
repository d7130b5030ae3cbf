"""The `offload` memory plan's hooks: what `full` keeps on the GPU, each decoder layer's input, lives in pinned host
memory from the forward to the backward that needs it.

torch's non-reentrant checkpoint (train/recompute.py) saves a layer's positional inputs through autograd's default
saved-tensor hooks before it installs its own for the layer's inside (torch 2.13: `_CheckpointFrame.save_inputs`;
earlier ones: `_NoopSaveInputs`); keyword inputs (RoPE's cos/sin, masks, position ids: shared by every layer) are
held by its closure. `HostOffload` is installed around each checkpoint call, so what it packs is exactly the layer's
hidden states: one [tokens, hidden] tensor per layer, nothing inside the layer (the checkpoint's hooks are on top
there) and nothing outside the layers (embeddings, final norm, loss: their saves are the lean RMSNorm's or plain).

It is torch.autograd.graph.save_on_cpu(pin_memory=True) with two changes, both for the GPU's time:
- save_on_cpu copies into pinned memory with a blocking copy on the compute stream: the host waits for every
  queued kernel at each layer, and the GPU idles while it launches the next ones. Here the device-to-host copy runs
  on a side stream after the compute stream's work so far (an event), and the layer's tensor is marked used by that
  stream (record_stream), so the allocator cannot hand its memory out before the copy has read it.
- backward recomputes the layers last to first, and each unpacks its input when its recompute starts: unpacking one
  also starts copying back the input packed before it (the next one backward needs), on the side stream, so that
  copy overlaps a whole layer's recompute and backward instead of holding up the compute stream. That is one more
  layer input on the GPU (counted by the estimate: train/activations.py).
The compute stream waits on the copy's event before it reads a tensor; the pinned buffer is the caching host
allocator's, which records the copies' streams before it reuses a block. Tensors under MIN_BYTES and parameters
stay where they are. On a CPU (tests) the "host copy" is a clone, so the same path runs and is counted.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch

MIN_BYTES = 1 << 20
"""Smaller saved tensors stay on the device: a copy's launch costs more than it frees."""


@dataclass
class Stats:
    """What the hooks moved in this process (tests and the benchmark read them)."""

    tensors: int = 0
    bytes: int = 0
    live: int = 0
    """Bytes held on the host now (packed, not yet freed with their autograd graph)."""
    peak: int = 0
    prefetched: int = 0
    """Unpacks served by a copy started ahead (on CUDA)."""

    def reset(self) -> None:
        self.tensors = self.bytes = self.live = self.peak = self.prefetched = 0


stats = Stats()
_local = threading.local()  # .last: weak reference to the entry packed last in this thread


class _Entry:
    """One packed tensor: its host copy, the event after which that copy is complete (CUDA), the entry packed
    before it (weakly: a graph freed after its backward must not keep older ones alive), and a copy back started
    ahead of its unpack."""

    __slots__ = ("device", "host", "event", "before", "ahead", "nbytes", "__weakref__")

    def __init__(self, t: torch.Tensor):
        self.device, self.nbytes, self.ahead = t.device, t.numel() * t.element_size(), None
        self.event = None
        if t.device.type == "cuda":
            side = _side_stream(t.device)
            side.wait_stream(torch.cuda.current_stream(t.device))  # t is computed
            with torch.cuda.stream(side):
                self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                self.host.copy_(t, non_blocking=True)
                self.event = side.record_event()
            t.record_stream(side)  # its memory is not reused before the copy has read it
        else:
            self.host = t.detach().clone(memory_format=torch.contiguous_format)
        last = getattr(_local, "last", None)
        self.before = last
        _local.last = weakref.ref(self)
        stats.tensors, stats.bytes, stats.live = stats.tensors + 1, stats.bytes + self.nbytes, stats.live + self.nbytes
        stats.peak = max(stats.peak, stats.live)

    def __del__(self):
        if stats is not None:  # None at interpreter exit
            stats.live -= self.nbytes

    def fetch_ahead(self) -> None:
        """Start the copy back on the side stream (CUDA), for an unpack that comes later."""
        if self.device.type != "cuda" or self.ahead is not None:
            return
        compute, side = torch.cuda.current_stream(self.device), _side_stream(self.device)
        gpu = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)  # on the compute stream
        side.wait_stream(compute)  # whatever used this memory before is done
        with torch.cuda.stream(side):
            gpu.copy_(self.host, non_blocking=True)  # after the pack's copy: the same stream
            self.ahead = (gpu, side.record_event())
        gpu.record_stream(side)  # freed unread (a backward that raises), its memory waits for the copy

    def unpack(self) -> torch.Tensor:
        before = self.before() if self.before is not None else None
        if self.device.type != "cuda":
            return self.host.clone()
        compute = torch.cuda.current_stream(self.device)
        if self.ahead is not None:
            gpu, done = self.ahead
            self.ahead = None  # a second unpack (retain_graph) copies again
            compute.wait_event(done)
            stats.prefetched += 1
        else:
            compute.wait_event(self.event)
            gpu = self.host.to(self.device, non_blocking=True)
        if before is not None:
            before.fetch_ahead()
        return gpu


_streams: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]


def _pack(t: torch.Tensor):
    # numel 0: the checkpoint's own empty marker tensor (torch <= 2.12 saves it beside the inputs)
    if isinstance(t, torch.nn.Parameter) or t.numel() == 0 or t.numel() * t.element_size() < MIN_BYTES or t.is_sparse:
        return t
    return _Entry(t)


def _unpack(saved):
    return saved.unpack() if isinstance(saved, _Entry) else saved


class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors into host memory (pinned on CUDA), back for backward: see the module's docstring."""

    def __init__(self) -> None:
        super().__init__(_pack, _unpack)
