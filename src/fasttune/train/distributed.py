"""Data-parallel training on torch.distributed (DDP, or FSDP2 with --training.fsdp), started by torchrun; one process
is the same code with world 1.

    torchrun --nproc_per_node 8 main.py --experiment full            # one node, 8 GPUs (NCCL)
    torchrun --nproc_per_node 8 main.py --experiment full --training.fsdp           # sharded (FSDP2)
    torchrun --nproc_per_node 2 main.py --experiment quick --training.device cpu   # CPU processes (gloo)

Each optimizer step takes grad_accum x world micro-batches from the same deterministic stream on every rank; rank r
trains micro-batches r, r + world, ... of them. Every rank sees the whole step's plan, so the loss normalisation
(targets of the whole step) needs no communication; DDP averages gradients, so each rank scales its loss by world to
get the sum. Two scalar all-reduces per step: the loss, and a stop flag (Ctrl-C / SIGTERM on any rank stops all
ranks after the same step). Rank 0 alone writes checkpoints, metrics and logs; every rank reads the run folder, so
several nodes need a shared filesystem. Start-up is serial (rank 0 checks the folder, tokenizes and builds the
model first; the others then load the cached tokenizer), hence the long process-group timeout.

Under FSDP2 no rank holds the whole model on its GPU, and one process reads the weights: rank 0 builds it (on the CPU
when it loads weight files), the other ranks on the meta device (no memory, no file read), and `wrap` shards it and
sends each rank its shards from rank 0 (torch's set_model_state_dict, broadcast_from_rank0).
"""

from __future__ import annotations

import datetime as dt
import gc
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fasttune.errors import ConfigError, PeerFailed

log = logging.getLogger("fasttune")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    fsdp: bool = False  # shard (FSDP2) rather than replicate (DDP)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1

    def strategy(self) -> str:
        """What trains under torchrun, for the log: 'DDP over 2 ranks (gloo)', 'FSDP2 over 8 ranks (nccl)' (the
        process group's backend); '' in one process."""
        if not self.on:
            return ""
        backend = dist.get_backend() if dist.is_initialized() else "no process group"
        return f"{'FSDP2' if self.fsdp else 'DDP'} over {self.world} ranks ({backend})"

    def barrier(self) -> None:
        if self.on:
            dist.barrier()

    def sum_(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum over ranks (identity for one process)."""
        return self._reduce(values, device, "SUM")

    def max_(self, value: float, device: torch.device) -> float:
        """The largest `value` over ranks (a collective; identity for one process)."""
        return self._reduce([value], device, "MAX")[0]

    def _reduce(self, values: list[float], device: torch.device, op: str) -> list[float]:
        if not self.on:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
        return t.tolist()

    def build_device(self, device: torch.device, reads_weights: bool) -> torch.device:
        """Where this rank builds the model before `wrap`: under FSDP2 on several ranks, rank 0 on the CPU when it
        `reads_weights` files (a model larger than one GPU still loads; FSDP2 moves it there a layer at a time) and
        on `device` otherwise (a fresh init is faster there), the other ranks on the meta device; `device` otherwise
        (DDP replicates the whole model)."""
        if not (self.on and self.fsdp):
            return device
        if self.rank > 0:
            return torch.device("meta")
        return torch.device("cpu") if reads_weights else device

    def wrap(self, model: torch.nn.Module, device: torch.device, compute_dtype: torch.dtype | None = None):
        """The module to train: DDP around `model`, or `model` itself sharded in place by FSDP2 (each decoder layer,
        then the rest), every rank's shards sent from rank 0's model (the others built theirs on the meta device:
        build_device). Build the optimizer after this: FSDP2 replaces the parameters. `compute_dtype`: the autocast
        dtype when the weights are kept in fp32 (FSDP2 then gathers them in it and reduces gradients in fp32)."""
        if not self.on:
            return model
        if self.fsdp:
            _adopt_layout(model, self.rank)
            full = model.state_dict() if self.main else {}  # rank 0's weights (its CPU copy, when built there)
            model = _shard(model, compute_dtype)
            _fill_from_rank0(model, full, device)
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # gradients as views into the all-reduce buckets: no copy into and out of them, and no second gradient copy
        return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)

    def gather_rng(self) -> list | None:
        """Every rank's random state (a collective), for the checkpoint; None in one process."""
        if not self.on:
            return None
        from fasttune.train.checkpoint import rng_state

        states: list = [None] * self.world
        dist.all_gather_object(states, rng_state())
        return states

    def full_state(self, model, optimizer) -> tuple[dict | None, dict]:
        """(weights for save_pretrained, None = the model's own; optimizer state) as rank 0 writes them. Under FSDP2
        both are gathered from the shards (a collective: every rank calls this), so a checkpoint is the same files
        whatever the number of ranks. Frozen weights (a LoRA base) are left out: a checkpoint holds the adapters."""
        if not (self.on and self.fsdp):
            return None, optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return self.full_weights(model, frozen=False), get_optimizer_state_dict(
            model, optimizer, options=_full_options()
        )

    def full_weights(self, model, frozen: bool = True) -> dict | None:
        """The weights of `model` (frozen ones too, unless `frozen` is False), gathered onto rank 0's CPU under FSDP2
        (a collective; the other ranks get {}); None otherwise (the model holds them itself)."""
        if not (self.on and self.fsdp):
            return None
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(model, options=_full_options(ignore_frozen_params=not frozen))
        # a tied parameter comes back under each of its names (lm_head.weight beside embed_tokens.weight): keep the
        # one save_pretrained keeps, so the files are those one process writes (not +1 GB at a 128k vocabulary)
        unique = {name for name, _ in model.named_parameters()}
        aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)} - unique
        return {k: v for k, v in state.items() if k not in aliases}

    def load_optimizer(self, model, optimizer, state: dict) -> None:
        """Load a checkpoint's optimizer state, whichever way it was written: by position (one process, DDP) or by
        parameter name (FSDP2), onto any number of ranks."""
        by_name = _keyed_by_name(state)
        if not (self.on and self.fsdp):
            optimizer.load_state_dict(_by_position(model, optimizer, state) if by_name else state)
            return
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        state = state if by_name else _by_name(model, optimizer, state)  # FSDP2 loads the form it writes
        set_optimizer_state_dict(model, optimizer, state, options=_full_options(cpu_offload=False))


SINGLE = Dist()  # one process


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**{"full_state_dict": True, "cpu_offload": True, **kw})


def _shard(model: torch.nn.Module, compute_dtype: torch.dtype | None, mesh=None) -> torch.nn.Module:
    """FSDP2 in place: each decoder layer, then the rest (embeddings, norm, head) at the root. Frozen weights (a
    LoRA base) are sharded too and get no gradients: only the trainable ones are reduce-scattered. `mesh`: FSDP2's
    default (the process group over the machine's accelerator) unless given (in-process CPU tests on a GPU host)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # fp32 master weights under bf16 autocast: all-gather them in bf16 (half the traffic, and the dtype the matmuls
    # use anyway) and reduce-scatter the gradients in fp32 (no precision lost summing over ranks).
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype else None
    from fasttune.model.build import decoder_blocks

    kw = {**({"mp_policy": mp} if mp else {}), **({"mesh": mesh} if mesh is not None else {})}
    layers = decoder_blocks(model)  # transformers' decoder layer classes
    for i, layer in enumerate(layers):
        # The last layer is the first one backward needs: keeping it gathered saves one all-gather per step.
        fully_shard(layer, reshard_after_forward=i < len(layers) - 1, **kw)
    fully_shard(model, **kw)
    for layer, following in zip(layers, layers[1:], strict=False):
        # Gather the next layer's weights while this one computes, rather than when the next one starts (which,
        # when the CPU does not run ahead of the GPU, leaves the all-gather exposed).
        layer.set_modules_to_forward_prefetch([following])
    return model


def _adopt_layout(model: torch.nn.Module, rank: int) -> None:
    """Check that every rank built rank 0's model (the names and shapes of its parameters and buffers) and give the
    meta-device ones rank 0's dtypes and tied weights: from_pretrained keeps some modules in fp32, and unties a head
    its files hold apart from the embeddings, where a model built from its config does neither. FSDP2's shards and
    collectives need them equal."""
    box = [_layout(model) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    want, mine = box[0], _layout(model)
    odd = [name for name in sorted(mine.keys() | want.keys()) if mine.get(name, ())[:1] != want.get(name, ())[:1]]
    if odd:
        raise RuntimeError(f"rank {rank} built another model than rank 0 (first differences: {', '.join(odd[:3])})")
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, (shape, dtype, first) in want.items():
        t = params.get(name) if first != mine[name][2] else None  # tied on one rank, not the other
        if t is not None and t.is_meta:
            prefix, _, leaf = name.rpartition(".")
            tied = model.get_parameter(first) if first != name else None
            fresh = tied if tied is not None else torch.nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"),
                                                                     t.requires_grad)  # fmt: skip
            setattr(model.get_submodule(prefix), leaf, fresh)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta and t.dtype != want[name][1]:
            t.data = t.data.to(want[name][1])


def _layout(model: torch.nn.Module) -> dict:
    """{name: (shape, dtype, the first name of the same tensor)} of every parameter and buffer, tied ones included."""
    first: dict = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {name: (tuple(t.shape), t.dtype, first.setdefault(id(t), name)) for name, t in named}


def _fill_from_rank0(model: torch.nn.Module, full: dict, device: torch.device) -> None:
    """Every rank's shards of `model` (sharded by FSDP2; on the meta device on ranks other than 0) from rank 0's
    `full` weights, and the buffers a state dict leaves out (RoPE's inverse frequencies) from rank 0's."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        model.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def _keyed_by_name(state: dict) -> bool:
    groups = state.get("param_groups") or []
    first = next((p for g in groups for p in g["params"]), None)
    return isinstance(first, str)


def _param_names(model, optimizer) -> list[str]:
    """The parameter names in the optimizer's order (torch numbers them in param-group order)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _by_name(model, optimizer, state: dict) -> dict:
    """torch's positional optimizer state (params numbered in param-group order) keyed by parameter names instead."""
    order = _param_names(model, optimizer)
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {order[i]: s for i, s in state["state"].items()}, "param_groups": groups}


def _by_position(model, optimizer, state: dict) -> dict:
    """The inverse of _by_name: a by-name state (FSDP2's) as torch's positional one, for one process or DDP."""
    index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
    return {"state": {index[n]: s for n, s in state["state"].items()}, "param_groups": groups}


_CREATED = []  # the process group fasttune started (and so closes)


def from_env(fsdp: bool = False) -> Dist:
    """The process's place in a torchrun launch (RANK/WORLD_SIZE/LOCAL_RANK), or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE  # --training.fsdp in one process: train() says it trains unsharded
    return Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")), fsdp)


def check_device(d: Dist, device_name: str) -> None:
    """--training.device under torchrun: each rank picks its own GPU."""
    if d.on and ":" in device_name:
        raise ConfigError(
            f"training.device={device_name} under torchrun: each rank trains on cuda:<its local rank>; pass "
            "--training.device cuda (or auto, or cpu), and pick GPUs with CUDA_VISIBLE_DEVICES"
        )


def init(d: Dist, device_name: str) -> str:
    """Start the process group for `d` and return the device name this rank trains on ('cuda:<local rank>')."""
    if not d.on:
        return device_name
    check_device(d, device_name)
    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        if torch.cuda.device_count() <= d.local_rank:
            raise ConfigError(
                f"torchrun started local rank {d.local_rank} but this machine shows {torch.cuda.device_count()} "
                "GPU(s): lower --nproc_per_node, or pass --training.device cpu for CPU processes"
            )
        torch.cuda.set_device(d.local_rank)
        device_name = f"cuda:{d.local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=dt.timedelta(hours=2))
        _CREATED.append(True)
    return device_name


def close(d: Dist) -> None:
    """Destroy the process group this process created. Drop the DDP model first (the caller's references): a DDP
    reducer that outlives its gloo group destroys the group from its own deallocation with the GIL held while it
    joins gloo's threads, which may need the GIL to free a tensor (a hang at exit, now and then). The collection
    frees one held in a reference cycle now, not at some later point after the group is gone."""
    if _CREATED and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        _CREATED.clear()


class StartGate:
    """Rank 0 runs the start-up checks (run folder, data, model) before the other ranks, which wait at the gate and
    then start with it, or stop quietly when its checks failed: one error line (rank 0's), not a traceback from
    every rank that lost its peer; or end with it, when a resumed run has no step left to train. Once started, every
    rank meets the others at `agree` before the first collective of training: a rank whose own start-up failed after
    the gate opened (a file missing on its node, a model it could not load) left the others waiting there for good."""

    def __init__(self, d: Dist):
        self.d, self.opened, self.started, self.agreed = d, False, False, False

    def open(self, error: BaseException | None = None, done: object = None) -> None:
        """Rank 0: the checks passed (error None) or failed with `error`, or the run has nothing to train (`done`:
        its result, which the other ranks return too); idempotent."""
        if self.opened or not self.d.main:
            return
        self.opened = True
        if not self.d.on:
            return
        self.started = error is None and done is None
        try:
            dist.broadcast_object_list([done if error is None else getattr(error, "exit_code", 1)], src=0)
        except Exception:  # noqa: BLE001 - the peers are gone (Ctrl-C reaches every rank): rank 0's error stands
            if error is None:
                raise

    def wait(self) -> object:
        """The other ranks: None to start; rank 0's result when the run has nothing to train; raise PeerFailed (with
        rank 0's exit code) when its checks failed."""
        if self.d.main or not self.d.on:
            return None
        box: list = [None]
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], int):
            raise PeerFailed("rank 0 stopped before the run started (its error above)", exit_code=box[0])
        self.started = box[0] is None
        return box[0]

    def agree(self, error: BaseException | None = None) -> None:
        """Every started rank: its start-up is done (error None, at the end of it) or failed (`error`, from the
        failure's handler). One all-reduce of each rank's failed flag: when any failed, the failing ranks go on with
        their own error and the others raise PeerFailed (exit 2), rank 0 saying once which ranks failed. Called
        once (again, or where the gate never opened, or in one process: nothing)."""
        if self.agreed or not self.started or not self.d.on:
            return
        self.agreed = True
        own = [float(rank == self.d.rank and error is not None) for rank in range(self.d.world)]
        try:
            flags = self.d.sum_(own, _flag_device())
        except Exception:  # noqa: BLE001 - the peers are gone: this rank's own error stands
            if error is None:
                raise
            return
        failed = [rank for rank, flag in enumerate(flags) if flag]
        if failed and error is None:
            ranks = f"rank{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))}"
            if self.d.main:  # the one line of the ranks that started well (the others' loggers are quiet)
                log.error("stopping every rank: %s failed to start (its own error says why)", ranks)
            raise PeerFailed(f"{ranks} failed to start", exit_code=2)


def _flag_device() -> torch.device:
    """Where a collective's tensor lives: NCCL reduces GPU tensors only, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
