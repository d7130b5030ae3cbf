"""What a model's forward does between its backbone and its loss, read from the forward's source, so that fasttune's
loss (model/loss.py) computes the same loss or is not used.

transformers' `*ForCausalLM.forward` computes `logits = self.lm_head(hidden)`, sometimes changes them, then calls
`self.loss_function`. The changes in use: a scale (Granite `logits / self.config.logits_scaling`, Cohere `logits *
self.logit_scale`, HyperCLOVAX `logits * self.config.logits_scaling`, Falcon-H1 `self.lm_head(h) *
self.model.lm_head_multiplier`) and Gemma's softcap (`logits / c`, `torch.tanh(logits)`, `logits * c` with c =
`self.config.final_logit_softcapping`, skipped when c is None). Each `logits = ...` of the forward is read as one of
those steps, the values taken from the model instance; anything else (a slice, another module, a local variable, a
loss that is not `self.loss_function`, such as Bart's unshifted one or Bamba's z-loss) means fasttune's loss does
not apply, and `supports_chunked_loss` says why. A router's auxiliary loss (`loss += ... aux_loss`) is added only
with `output_router_logits`, which is checked on the config. Reading the source means a model class added to
transformers later is checked too, rather than trusted.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import numbers
import textwrap

import torch
from torch import nn

_TANH = {("torch", "tanh"), ("nn", "functional", "tanh"), ("torch", "nn", "functional", "tanh")}


@dataclasses.dataclass(frozen=True)
class LogitTransform:
    """logits -> softcap * tanh(scale * logits / softcap) (no softcap: scale * logits)."""

    scale: float = 1.0
    softcap: float | None = None

    def describe(self) -> str:
        """'' for none, else '; logits scaled by S, softcapped at C (as the model's forward does)'."""
        parts = ([f"scaled by {self.scale:g}"] if self.scale != 1.0 else []) + (
            [f"softcapped at {self.softcap:g}"] if self.softcap else [])  # fmt: skip
        return f"; logits {', '.join(parts)} (as the model's forward does)" if parts else ""

    def scaled(self, hidden_TH: torch.Tensor, targets_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The head is linear and bias-free (checked): scaling its input rows scales the logits."""
        return (hidden_TH if self.scale == 1.0 else hidden_TH * self.scale), targets_T


@dataclasses.dataclass(frozen=True)
class _Step:
    op: str  # "mul", "div", "tanh"
    operand: tuple[str, ...] = ()  # the attribute path from `self` of the scale or cap


def _chain(node: ast.AST) -> tuple[str, ...] | None:
    """`self.a.b` -> ("a", "b"); `torch.tanh` -> ("torch", "tanh") with root kept; else None."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return (node.id, *reversed(names)) if isinstance(node, ast.Name) else None


def _is_head(node: ast.AST) -> bool:
    """`self.lm_head(h)`, `self.lm_head(h[...])` or `self.lm_head(h.to(dtype))`: the head on the hidden states as
    they are (anything computed inside the call is not)."""
    if not (isinstance(node, ast.Call) and _chain(node.func) == ("self", "lm_head") and len(node.args) == 1):
        return False
    arg = node.args[0]
    if isinstance(arg, ast.Call) and isinstance(arg.func, ast.Attribute) and arg.func.attr == "to":
        arg = arg.func.value
    return isinstance(arg, ast.Name) or (isinstance(arg, ast.Subscript) and isinstance(arg.value, ast.Name))


def _head_input(tree: ast.AST) -> str | None:
    """The name of the variable the head is called on (`hidden_states` in transformers' models)."""
    for node in ast.walk(tree):
        if _is_head(node):
            arg = node.args[0]
            arg = arg.func.value if isinstance(arg, ast.Call) else arg
            return arg.id if isinstance(arg, ast.Name) else arg.value.id
    return None


def _hidden_steps(value: ast.AST, name: str) -> list[_Step] | None:
    """The steps of one `hidden_states = <value>` (the head's input): the backbone's output
    (`outputs.last_hidden_state`, `outputs[0]`), `slice_logits_to_keep(...)` of it (all of it in training), or a scale
    by a `self.` value (MiniCPM3 divides by `logits_scaling`: the head is linear, so it scales the logits); None for
    anything else."""
    if isinstance(value, ast.IfExp):
        both = [_hidden_steps(v, name) for v in (value.body, value.orelse)]
        return both[0] if both[0] == both[1] else None
    if isinstance(value, (ast.Attribute, ast.Subscript)):
        root = value
        while isinstance(root, (ast.Attribute, ast.Subscript)):
            root = root.value
        backbone = isinstance(root, ast.Call) and _chain(root.func) == ("self", "model")  # self.model(...)[0]
        ok = backbone or (isinstance(root, ast.Name) and (root.id == name or root.id.endswith(("outputs", "output"))))
        return [] if ok else None
    if isinstance(value, ast.Call) and _chain(value.func) == ("slice_logits_to_keep",) and value.args:
        return _hidden_steps(value.args[0], name)
    if isinstance(value, ast.Name) and value.id == name:
        return []
    if isinstance(value, ast.BinOp):
        inner, step = _hidden_steps(value.left, name), _scale_step(value)
        return None if inner is None or step is None else [*inner, step]
    return None


def _scale_step(value: ast.BinOp) -> _Step | None:
    """`x * self.a.b` or `x / self.a.b`: a scale by the value at self.a.b; None for any other operation."""
    path = _chain(value.right)
    if not isinstance(value.op, (ast.Mult, ast.Div)) or path is None or path[0] != "self":
        return None
    return _Step("mul" if isinstance(value.op, ast.Mult) else "div", path[1:])


def _is_logits(node: ast.AST) -> bool:
    """`logits` or the head's call, or either `.float()` / `.contiguous()` (no change to the values)."""
    if isinstance(node, ast.Call) and not node.args and isinstance(node.func, ast.Attribute):
        return node.func.attr in ("float", "contiguous") and _is_logits(node.func.value)
    return (isinstance(node, ast.Name) and node.id == "logits") or _is_head(node)


def _steps(value: ast.AST) -> list[_Step] | None:
    """The steps of one `logits = <value>`; None when it is none of the known ones."""
    if _is_logits(value):
        return []
    if isinstance(value, ast.BinOp):
        step = _scale_step(value)
        return [step] if step is not None and _is_logits(value.left) else None
    if isinstance(value, ast.Call) and _chain(value.func) in _TANH and len(value.args) == 1:
        return [_Step("tanh")] if _is_logits(value.args[0]) else None
    return None


def _loss_line_ok(node: ast.AST, line: str) -> bool:
    """`loss = None`, `loss = self.loss_function(...)`, or a router's `loss += ... aux_loss ...`."""
    if isinstance(node, ast.AugAssign):
        return "aux_loss" in line
    value = node.value
    if isinstance(value, ast.Constant) and value.value is None:
        return True
    return isinstance(value, ast.Call) and _chain(value.func) == ("self", "loss_function")


@functools.cache
def read_forward(cls: type) -> tuple[_Step, ...] | str:
    """The logit steps of `cls.forward` in source order, or the first line fasttune's loss cannot reproduce."""
    try:
        src = textwrap.dedent(inspect.getsource(cls.forward))
    except (OSError, TypeError, AttributeError):
        return "its forward's source cannot be read"
    tree = ast.parse(src)
    hidden = _head_input(tree)
    if hidden is None:
        return "the head is not called on the hidden states as they are"
    steps: list[_Step] = []
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AugAssign))]
    for node in sorted(nodes, key=lambda n: (n.lineno, n.col_offset)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        names = {t.id for t in targets if isinstance(t, ast.Name)}
        line = ast.get_source_segment(src, node) or ""
        unpacked = {e.id for t in targets if isinstance(t, ast.Tuple) for e in t.elts if isinstance(e, ast.Name)}
        if unpacked & {"loss", "logits", hidden}:  # `loss, logits = ...`: not one of the known steps
            return line
        if "loss" in names and not _loss_line_ok(node, line):
            return line
        for name, read in (("logits", _steps), (hidden, functools.partial(_hidden_steps, name=hidden))):
            if name in names:
                found = read(node.value) if isinstance(node, ast.Assign) else None
                if found is None:
                    return line
                steps += found
    return tuple(steps)


def _value(model: nn.Module, path: tuple[str, ...]) -> float | None | str:
    """The number at `model.<path>` (None when unset), or why it is not one."""
    obj = model
    for name in path:
        obj = getattr(obj, name, None)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return float(obj)
    if obj is None or (isinstance(obj, numbers.Real) and not isinstance(obj, bool)):
        return obj if obj is None else float(obj)
    return f"self.{'.'.join(path)} is not a number"


def logit_transform(model: nn.Module) -> LogitTransform | str:
    """What the model's forward does to its head's logits, with this instance's values; or why fasttune cannot say."""
    name = type(model).__name__
    steps = read_forward(type(model))
    if isinstance(steps, str):
        return f"{name}.forward does what fasttune's loss does not: {steps.splitlines()[0][:80]}"
    scale, softcap, i = 1.0, None, 0
    while i < len(steps):
        step = steps[i]
        is_cap = steps[i : i + 3] == (_Step("div", step.operand), _Step("tanh"), _Step("mul", step.operand))
        if not is_cap and (step.op == "tanh" or softcap is not None):
            return f"{name}.forward changes its logits with a tanh that is not a softcap, or after the softcap"
        value = _value(model, step.operand)
        if isinstance(value, str):
            return f"{name}.forward scales its logits by {value}"
        if is_cap:
            softcap, i = value, i + 3  # None: the forward skips the softcap
            continue
        if value is not None:  # None: a step the forward skips (guarded by the setting)
            scale = scale * value if step.op == "mul" else scale / value
        i += 1
    return LogitTransform(scale, softcap or None)


def supports_chunked_loss(model: nn.Module) -> str | None:
    """None when fasttune's loss computes this model's loss, else why not."""
    if type(getattr(model, "lm_head", None)) is not nn.Linear or not isinstance(getattr(model, "model", None),
                                                                                 nn.Module):  # fmt: skip
        return "no plain `lm_head` Linear over a `model` backbone"
    if getattr(model.config, "output_router_logits", False):
        return "the model adds its router's auxiliary loss (output_router_logits)"
    transform = logit_transform(model)
    if isinstance(transform, str):
        return transform
    if transform.scale != 1.0 and model.lm_head.bias is not None:
        return "a scaled head with a bias"
    return None
