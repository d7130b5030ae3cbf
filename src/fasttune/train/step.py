"""The parts of one optimizer step that hold no run state: the batch copied to the device, the forward and backward
passes over a step's micro-batches (its loss normalisation), an MoE router's auxiliary loss, and the device-timeline
marks and host reading that time a step without waiting for it. Run.step (fasttune.train.run) puts them together;
benchmarks and tests call them on their own."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from fasttune.attention.layout import packed_without_sync
from fasttune.data.packing import count_targets
from fasttune.data.sample import Sample
from fasttune.model.build import base_model


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device`. To a GPU through pinned memory: a copy from pageable memory first waits for
    everything queued on the stream (the previous step's optimizer), a pinned one does not, so the host goes on
    queuing the forward pass while the update finishes."""
    pin = device.type == "cuda"
    out = {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
           for k, v in batch.items()}  # fmt: skip
    if isinstance(batch.get("labels"), torch.Tensor):  # counted here, the loss selects its rows without a host sync
        out["labels"].fasttune_targets = count_targets(batch)
    return out


def split_samples(samples: list[Sample], parts: int) -> list[list[Sample]]:
    """A micro-batch as `parts` pieces (the OOM retry's micro_split), every sample in one of them."""
    parts = min(parts, len(samples))
    return [samples[i::parts] for i in range(parts)]


def forward_backward(
    model, batches: list[dict], n_targets: int, amp_dtype: torch.dtype | None, world: int = 1
) -> torch.Tensor:
    """Sum of the micro-batches' token-mean losses, each normalised by the targets of the whole step (all ranks), so
    the sum over ranks is the exact per-token mean whatever the split into micro-batches, ranks or padding. Under DDP
    (which averages gradients over `world` ranks) the backward pass scales by world, and gradients are synchronised
    once, on the last micro-batch. An MoE router's auxiliary loss counts as its mean over the micro-batches and
    ranks (HF adds it whole to every forward's loss: its weight grew with --training.grad-accum)."""
    total = torch.zeros((), device=next(model.parameters()).device)
    for i, b in enumerate(batches):
        last = i == len(batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()  # DDP
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter once, after the last micro-batch
            model.set_requires_gradient_sync(last)
        with sync:
            with torch.autocast(b["input_ids"].device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                with packed_without_sync(b):  # no host sync in transformers' mask preparation
                    out = model(**b, use_cache=False, num_items_in_batch=n_targets)
            loss = out.loss
            if (router := router_loss(model, out)) is not None:  # HF adds it per forward: average it over the step
                loss = loss - router * (1 - 1 / (len(batches) * world))
            (loss * world if world > 1 else loss).backward()
        total += loss.detach().float()
    return total


def router_loss(model, out) -> torch.Tensor | None:
    """The router's auxiliary loss an MoE model adds to `out.loss` with output_router_logits (its
    router_aux_loss_coef x out.aux_loss), or None."""
    aux = getattr(out, "aux_loss", None)
    coef = getattr(base_model(getattr(model, "module", model)), "router_aux_loss_coef", None)
    return None if aux is None or coef is None or out.loss is None else coef * aux.to(out.loss.device)


def mark(device: torch.device) -> float | torch.cuda.Event:
    """Now on the device's timeline: on CUDA an event behind everything queued so far on `device` (not the current
    device: a single process may train on cuda:N), else the host's clock."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(device))
    return event


def step_end(end, backward_done, wait: bool):
    """Where a step ends on the device's timeline: after its update (`end`) when that has run or `wait` (evaluation,
    a checkpoint or the end follow: the host waits anyway), else where its backward pass ended (`backward_done`):
    a step read at once (DDP, FSDP2) need not wait for its own update, which then counts in the next step's time."""
    if isinstance(end, float) or wait or backward_done is None or end.query():
        return end
    return backward_done


@dataclass
class Reading:
    """A step's loss and gradient norm (float64, on the host or being copied there). `backward_done` (CUDA): an event
    behind the step's backward pass and that copy, ahead of its optimizer update."""

    host: torch.Tensor
    backward_done: torch.cuda.Event | None = None

    def values(self) -> tuple[float, float]:
        if self.backward_done is not None:
            self.backward_done.synchronize()  # the copy was queued before the update: this does not wait for it
        loss_f, gn = self.host.tolist()
        return loss_f, gn
