"""LoRA on fused MoE experts that keeps no adapted weight for backward.

transformers 5 holds an MoE layer's experts as 3-D parameters (gate_up_proj [E, 2I, H], down_proj [E, H, I]) and
peft adapts them in place (`lora.ParamWrapper`, one per parameter, nested): each forward builds the whole adapted
weight W' = W + scaling * lhs @ rhs (one baddbmm over the experts: peft's `get_delta_factors`), and the experts'
grouped matmuls save W' (a view of it) for backward. Under a plan that keeps the layers' activations autograd then
holds a weight-sized tensor per layer until backward: 1.2 GB a layer at the Qwen3-30B-A3B shape in bf16, 58 GB over
its 48 layers.

Here the wrappers over one experts module run as one forward (`_forward`, installed on the outermost wrapper by
`lora.set_fast_forward`). Where transformers runs the experts with its grouped matmul (its default experts
implementation) and the wrappers are plain, no W' is made at all: the adapters act on the activations, two thin
grouped matmuls per projection (model/expert_lora_act.py; traced whole by dynamo). Elsewhere (eager or batched_mm
experts, expert parallelism, `expert_lora_act.enabled` off) the recipes run (`_recipes`): each W' is made as peft
makes it, by a function whose backward keeps A and B alone (not their copies in the weight's dtype), and handed to
the experts module in place of its parameter for the call, as model/experts.py hands it bf16 copies; a saved-tensor
hook stores a recipe in place of every saved view of a W' (the frozen weight, A, B, the view's geometry). Backward
remakes W' when the first matmul that saved it unpacks it, and frees it with the last: one W' of one layer at a
time, beside the weight-sized gradient the grouped matmul's backward computes for it (`fold_bytes`). A backward that
builds a graph (create_graph=True: double backward, a gradient penalty) remakes W' on the adapters' graph, as peft's
forward kept it. The experts' forward stays transformers' own.

Every other saved tensor goes to the hooks around the call (a checkpoint of the layer, the lean RMSNorm's,
offload's), or is kept with autograd's check for in-place writes, which installed hooks switch off. peft's own
forward runs where a wrapper is not plain (merged, disabled, several adapters, a base of a dtype peft upcasts) and
where saved-tensor hooks are disabled (torch.func). Under torch.compile (each decoder layer compiled) `_recipes`'s
own frame and the setup of its hooks run eagerly (torch.compiler.disable: one graph break in the layer), and the
experts' forward it calls compiles as a graph of its own: traced, dynamo broke at the hooks' torch._C calls,
recompiled their setup every step (guards on the step's weights' storage pointers) up to its limit, and its tracing
state held each step's recipes in reference cycles that only the cyclic garbage collector freed; with the whole call
eager, the experts' elementwise work lost compile's fusion.
"""

from __future__ import annotations

import types
import weakref

import torch
from torch import nn

from fasttune.model import expert_lora_act
from fasttune.model import experts as experts_autocast
from fasttune.model.norm import check_version


def set_forward(model: nn.Module, enabled: bool = True) -> int:
    """Install (or with enabled=False remove) `_forward` on the outermost peft `ParamWrapper` of each adapted experts
    module of `model`; returns how many have it."""
    from peft.tuners.lora.layer import ParamWrapper

    wrappers = [m for m in model.modules() if type(m) is ParamWrapper and _of_experts(m)]
    inner = {id(m.base_layer) for m in wrappers}
    count = 0
    for module in wrappers:
        module.__dict__.pop("forward", None)  # peft's class forward again
        if enabled:
            expert_lora_act.register(module)
        if enabled and id(module) not in inner:
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count


def _of_experts(wrapper: nn.Module) -> bool:
    """Whether a peft `ParamWrapper` adapts a fused experts parameter (3-D), not a linear layer's weight (shared
    experts and dense MLPs: `lora.set_fast_forward` gives those the linear layers' fast forward)."""
    layer = wrapper
    while hasattr(layer, "base_layer"):
        layer = layer.base_layer
    param = layer._parameters.get(wrapper.parameter_name)
    return param is not None and param.dim() == 3


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The experts module's forward with its adapters: on the activations (model/expert_lora_act.py) where the experts
    run transformers' grouped matmul, else on the adapted weights, each saved as a recipe (`_recipes`)."""
    chain = None if kwargs or len(args) != 2 else _chain(self)  # (x, top-k index, top-k weights) only
    if _on_activations(chain):
        wrappers, module = chain
        own = {n: p for n, p in module._parameters.items() if p is not None and p.is_floating_point()}
        dtype = _compute_dtype(module, own[wrappers[0][0].parameter_name])
        weights = {n: p.to(dtype) for n, p in own.items()}  # autocast's copies (model/experts.py), else p itself
        adapters = {w.parameter_name: expert_lora_act.factors(w, adapter, dtype) for w, adapter in wrappers}
        return expert_lora_act.forward(module, adapters, weights, x, *args)
    return _recipes(self, x, *args, **kwargs)


@torch.compiler.disable(recursive=False)  # this frame runs eagerly; the experts' forward it calls still compiles
def _recipes(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The experts module's forward on the adapted weights, each saved as a recipe (see the module's docstring)."""
    prepared = _prepare(self, kwargs)
    if prepared is None:
        return type(self).forward(self, x, *args, **kwargs)
    module, own, adapted, hooks, recipes = prepared  # recipes: alive through the call (the hooks hold them weakly)
    module._parameters.update(adapted)  # what nn.Module.__getattr__ returns during the call
    try:
        with hooks:
            return module(x, *args, **kwargs)
    finally:
        module._parameters.update(own)


@torch.compiler.disable  # dynamo cannot trace the hooks' state (see the module's docstring)
def _prepare(self, kwargs: dict) -> tuple[nn.Module, dict, dict, _Hooks, list] | None:
    """(the experts module, its own weights, their adapted W', the hooks that save each W' as a recipe, the
    recipes), or None where peft's own forward must run."""
    chain = None if kwargs.get("adapter_names") is not None else _chain(self)
    if chain is None or not _hooks_enabled():
        return None
    wrappers, module = chain
    own = {w.parameter_name: module._parameters[w.parameter_name] for w, _ in wrappers}
    recipes, adapted = [], {}
    for wrapper, adapter in wrappers:
        weight = own[wrapper.parameter_name]
        a, b = wrapper.lora_A[adapter].weight, wrapper.lora_B[adapter].weight
        fold = _Factors(wrapper, adapter, weight, a, b, _compute_dtype(module, weight))
        adapted[wrapper.parameter_name] = _Fold.apply(weight, a, b, fold)
        recipes.append(_Recipe(fold, weight, a, b))
    made = {w.untyped_storage().data_ptr(): weakref.ref(r) for w, r in zip(adapted.values(), recipes, strict=True)}
    return module, own, adapted, _Hooks(made), recipes


_forward.__name__ = "forward"  # pickle (torch.save of the model) stores the bound method by this name


def _chain(outer: nn.Module) -> tuple[list[tuple[nn.Module, str]], nn.Module] | None:
    """([(wrapper, its one active adapter)] from the outermost in, the experts module they wrap), or None where
    peft's own forward must run."""
    from peft.tuners.lora.layer import ParamWrapper

    wrappers, layer = [], outer
    while isinstance(layer, ParamWrapper):
        adapter = _plain(layer)
        if adapter is None:
            return None
        wrappers.append((layer, adapter))
        layer = layer.base_layer
    if any(not isinstance(layer._parameters.get(w.parameter_name), torch.Tensor) for w, _ in wrappers):
        return None  # not a parameter of the module (parametrized by someone else, ...)
    return wrappers, layer


def _plain(layer: nn.Module) -> str | None:
    """The one adapter a wrapper applies as peft's single-adapter fold does (`_LoraFactorsProxy`: W + scaling * lhs
    @ rhs in the weight's dtype), or None."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    adapter = layer.active_adapters[0]
    if adapter not in layer.lora_A or adapter in layer.lora_variant or layer.lora_bias.get(adapter):
        return None
    weight = layer.get_param()
    if layer.num_experts < 2 or weight.dim() != 3:
        return None
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):  # fp8 and the like: peft upcasts them
        return None
    return adapter


def _compute_dtype(module: nn.Module, weight: torch.Tensor) -> torch.dtype:
    """The dtype W' is made in: the weight's, as peft makes it; the autocast dtype where model/experts.py runs the
    module under autocast (it would copy a W' of another dtype, and the grouped matmul would keep that copy)."""
    device = weight.device.type
    if experts_autocast.runs_autocast(module) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _hooks_enabled() -> bool:
    return bool(getattr(torch._C._autograd, "_saved_tensors_hooks_is_enabled", lambda: True)())


class _Factors:
    """How one wrapper's adapters A [experts x r, in] and B [out, r x experts] fold into its weight, as peft's
    `ParamWrapper.get_delta_factors` does: lhs @ rhs per expert, in the weight's dtype, times the scaling."""

    __slots__ = ("experts", "swapped", "scaling", "weight_dtype", "dtype")

    def __init__(self, wrapper, adapter: str, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, dtype):
        self.experts, self.scaling, self.weight_dtype, self.dtype = wrapper.num_experts, wrapper.scaling[adapter], \
            weight.dtype, dtype  # fmt: skip
        # transformers stores most experts as [experts, out, in]: peft swapped its in and out features for them
        self.swapped = getattr(wrapper, "_did_swap_in_out_features", weight.shape[1:] == (b.shape[0], a.shape[-1]))

    def factors(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a_ERI = a.reshape(self.experts, -1, a.shape[-1])
        b_EOR = b.reshape(b.shape[0], -1, self.experts).permute(2, 0, 1)
        lhs, rhs = (b_EOR, a_ERI) if self.swapped else (a_ERI.transpose(-2, -1), b_EOR.transpose(-2, -1))
        return lhs.to(self.weight_dtype), rhs.to(self.weight_dtype)

    def fold(self, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        lhs, rhs = self.factors(a, b)
        with torch.autocast(weight.device.type, enabled=False):  # peft's fold: in the weight's dtype
            return torch.baddbmm(weight, lhs, rhs, alpha=self.scaling).to(self.dtype)


class _Fold(torch.autograd.Function):
    """W' from the weight and the adapters themselves, keeping A and B (parameters: no bytes of their own) for
    backward, not the factors' copies in the weight's dtype that a baddbmm on them keeps (at the Qwen3-30B-A3B shape,
    rank 16, bf16: 41 MB a layer)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, fold: _Factors) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        ctx.fold = fold
        return fold.fold(weight, a, b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        fold = ctx.fold
        grad_weight = grad.to(fold.weight_dtype) if ctx.needs_input_grad[0] else None
        if torch.is_grad_enabled():  # backward(create_graph=True): gradients that are differentiable again
            return grad_weight, *_graph_grads(fold, a, b, grad, ctx.needs_input_grad[1:3]), None
        with torch.enable_grad():  # the factors' reshapes and casts carry the gradients back to A and B
            a_, b_ = a.detach().requires_grad_(), b.detach().requires_grad_()
            lhs, rhs = fold.factors(a_, b_)
            g = grad.to(lhs.dtype)  # baddbmm's own backward:
            grads = (g.bmm(rhs.detach().transpose(-2, -1)) * fold.scaling,
                     lhs.detach().transpose(-2, -1).bmm(g) * fold.scaling)  # fmt: skip
            grad_a, grad_b = torch.autograd.grad((lhs, rhs), (a_, b_), grads)
        return grad_weight, grad_a, grad_b, None


def _graph_grads(fold: _Factors, a: torch.Tensor, b: torch.Tensor, grad: torch.Tensor, needs: tuple[bool, bool]):
    """The gradients of A and B (None where not needed) of peft's fold, on a graph of A, B and `grad`."""
    wanted = [t for t, need in zip((a, b), needs, strict=True) if need]
    if not wanted:
        return None, None
    lhs, rhs = fold.factors(a, b)
    with torch.autocast(grad.device.type, enabled=False):  # as fold.fold: W + scaling * lhs @ rhs, the W-free part
        delta = (lhs.bmm(rhs) * fold.scaling).to(fold.dtype)
    got = iter(torch.autograd.grad(delta, wanted, grad, create_graph=True))
    return tuple(next(got) if need else None for need in needs)


class _Recipe:
    """How to remake one adapted weight W' in backward: its fold, the weight, the adapters; `out`, the W' remade,
    lives as long as the saved views that hold the recipe. A backward that builds a graph (create_graph=True) gets a
    W' on the adapters' graph instead (`graph_out`), as peft's forward would have kept it: its gradients then are
    differentiable again (double backward, gradient penalties)."""

    __slots__ = ("fold", "weight", "a", "b", "dtype", "out", "graph_out", "__weakref__")

    def __init__(self, fold: _Factors, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
        self.fold, self.weight, self.a, self.b, self.dtype = fold, weight.detach(), a, b, fold.dtype
        self.out = self.graph_out = None

    def remake(self) -> torch.Tensor:
        if torch.is_grad_enabled():  # unpacked by a backward with create_graph=True
            if self.graph_out is None:
                self.graph_out = _Fold.apply(self.weight, self.a, self.b, self.fold)
            return self.graph_out
        if self.out is None:  # once for all the views saved of it (the eager experts loop saves one per expert)
            with torch.no_grad():
                self.out = self.fold.fold(self.weight, self.a, self.b)
        return self.out


def _storage(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:  # a tensor without storage (a functional wrapper): no W'
        return None


class _Hooks(torch.autograd.graph.saved_tensors_hooks):
    """Saved views of the adapted weights `made` ({storage pointer: weak reference to its recipe}) as recipes; every
    other saved tensor to the hooks around these (their top one, read as these are installed), or kept as it is."""

    def __init__(self, made: dict[int, weakref.ref]):
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        outer_pack, outer_unpack = top if top is not None else (None, None)

        def pack(t: torch.Tensor):
            ref = made.get(_storage(t))
            recipe = ref() if ref is not None else None
            if recipe is not None and t.dtype == recipe.dtype:
                return recipe, (t.shape, t.stride(), t.storage_offset())
            return None, (outer_pack(t) if outer_pack is not None else (t, t._version))

        def unpack(saved):
            recipe, kept = saved
            if recipe is not None:
                return recipe.remake().as_strided(*kept)
            if outer_unpack is not None:
                return outer_unpack(kept)
            check_version(*kept)
            return kept[0]

        super().__init__(pack, unpack)

    @torch.compiler.disable
    def __enter__(self):
        return super().__enter__()

    @torch.compiler.disable
    def __exit__(self, *exc):
        return super().__exit__(*exc)


def _installed(model: nn.Module):
    """(the outermost wrapper, its chain or None) of each experts module `_forward` runs, and whether it runs on the
    activations (model/expert_lora_act.py)."""
    for module in model.modules():
        if getattr(vars(module).get("forward"), "__func__", None) is _forward:
            chain = _chain(module)
            yield module, chain, _on_activations(chain)


def _on_activations(chain) -> bool:
    """Whether the experts module of a wrapper `chain` (_chain's, or None) runs its adapters on the activations."""
    return chain is not None and expert_lora_act.runs(chain[1], [w.parameter_name for w, _ in chain[0]])


def fold_bytes(model: nn.Module) -> int:
    """Bytes of the adapted weights of the largest experts module that `_forward` runs on recipes (0: none): what
    backward remakes at once, beside their gradient of the same size (train/estimate.py counts both)."""
    largest = 0
    for module, _, act in _installed(model):
        if act:
            continue
        total, layer = 0, module
        while hasattr(layer, "parameter_name"):  # the nested ParamWrappers
            weight = layer.get_param()
            total += weight.numel() * weight.element_size()
            layer = layer.base_layer
        largest = max(largest, total)
    return largest


def act_bytes(model: nn.Module, autocast: bool = False) -> int:
    """Bytes of the stacked adapter factors that the experts modules `_forward` runs on the activations keep for
    backward, all layers together: in bf16 under `autocast` (model/experts.py), else in the experts' weights' dtype."""
    total = 0
    for _, chain, act in _installed(model):
        if act:
            for wrapper, _ in chain[0]:
                dtype = torch.bfloat16 if autocast else wrapper.get_param().dtype
                total += expert_lora_act.copy_bytes(wrapper, dtype)
    return total
