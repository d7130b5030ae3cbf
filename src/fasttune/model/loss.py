"""Chunked linear + cross-entropy: the causal-LM loss without ever holding the full logits.

A 16k-token step at a 32k vocabulary holds 16k x 32k logits in bf16, their fp32 upcast and its gradient: ~5 GB, and
four times that at Llama 3's 128k vocabulary (docs/BENCHMARKS.md, "Memory"). Here the tokens are cut into chunks of
about 256 MiB of fp32 logits; each chunk's logits are computed, reduced to its loss, and turned straight into the
gradients of the hidden states and the head weight (softmax minus one-hot), so only one chunk of logits exists at a
time and the backward pass has nothing left to recompute (the approach of Liger's fused linear cross-entropy, in
plain PyTorch so it works with no optional package).

Only the tokens with a target go through the head: prompt tokens (SFT trains the response), padding and each packed
document's last token are dropped before the matmul (the training loop counts them on the host; other callers pay
a host sync for the count). On an alpaca-style SFT set about half the tokens are prompt, and at Llama 3's 128k
vocabulary the head is ~20% of a 1B model's FLOPs: on gsm8k at that vocabulary `full` trains 17% faster with this
loss and 10% faster with Liger's fused kernel, which gets the same selection when Liger is on (3% at 32k;
docs/BENCHMARKS.md).

What a model's forward does to its logits before the loss is done here too (`LogitTransform`: scales such as
Granite's, Cohere's or Falcon-H1's, Gemma's softcap); a forward that does anything else there keeps its own loss
(model/head.py reads the forward's source, so a model added to transformers later is checked too).

Semantics are Hugging Face's `ForCausalLMLoss` exactly: labels shifted left by one (or `shift_labels` given),
-100 ignored, the logits computed in the compute dtype and upcast to fp32, the sum over targets divided by
`num_items_in_batch` when given (the loop's whole-step target count over micro-batches and ranks), else the mean.
Shapes: T tokens, H hidden, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import types

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from fasttune.data.packing import IGNORE
from fasttune.model.head import LogitTransform, logit_transform, supports_chunked_loss

# The outputs' KV-cache field: `cache` since transformers 5.2x (the old name `past_key_values` still works there but
# warns on every run), `past_key_values` on 5.17.
_CACHE = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"

log = logging.getLogger("fasttune")

CHUNK_LOGITS_BYTES = 256 * 2**20
"""fp32 logits per chunk: 2048 tokens at a 32k vocabulary, 512 at 128k (matmuls of that size still run at full
tensor-core speed; the lm head is ~6% of a Llama step's FLOPs)."""


def chunk_tokens(vocab: int, budget: int = CHUNK_LOGITS_BYTES) -> int:
    """Tokens per chunk: the largest power of two whose fp32 logits fit `budget` (at least 64)."""
    n = max(64, budget // (4 * vocab))
    return 1 << (n.bit_length() - 1)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over valid targets of CE(hidden_TH @ weight_VH^T + bias_V, targets_T) * scale, gradients computed in the
    forward pass chunk by chunk (then scaled by the incoming gradient in backward)."""

    @staticmethod
    def forward(ctx, hidden_TH, weight_VH, bias_V, targets_T, scale, chunk: int, dtype: torch.dtype, grad: bool,
                softcap: float | None = None):  # fmt: skip
        need_h, need_w, need_b = (grad and n for n in ctx.needs_input_grad[:3])
        w_VH = weight_VH.to(dtype)
        b_V = bias_V.to(dtype) if bias_V is not None else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden_TH.device)
        grad_h_TH = torch.empty_like(hidden_TH) if need_h else None
        # fp32 accumulators: a bf16 sum over up to 64 chunks (32k tokens at 128k vocab) would lose ~1% of the gradient
        grad_w_VH = torch.zeros(weight_VH.shape, dtype=torch.float32, device=weight_VH.device) if need_w else None
        grad_b_V = torch.zeros(bias_V.shape, dtype=torch.float32, device=bias_V.device) if need_b else None
        for start in range(0, hidden_TH.shape[0], chunk):
            # the previous chunk's logits and gradient are let go before this chunk's are made: the peak is one
            # chunk's 6 bytes a logit (fp32 logits beside their bf16 matmul output), not 12 (tests/test_memory_layers)
            logits_CV = grad_CV = tanh_CV = None
            h_CH = hidden_TH[start : start + chunk].to(dtype)
            y_C = targets_T[start : start + chunk]
            logits_CV = (h_CH @ w_VH.T if b_V is None else torch.addmm(b_V, h_CH, w_VH.T)).float()
            if softcap:  # Gemma's softcap * tanh(logits / softcap), in fp32
                tanh_CV = torch.tanh(logits_CV / softcap)
                logits_CV = torch.mul(tanh_CV, softcap, out=logits_CV)
            valid_C = y_C != IGNORE
            y_C = torch.where(valid_C, y_C, 0)
            lse_C = torch.logsumexp(logits_CV, dim=-1)
            picked_C = logits_CV.gather(1, y_C[:, None]).squeeze(1)
            loss += torch.where(valid_C, lse_C - picked_C, 0.0).sum()
            if not (need_h or need_w or need_b):
                continue
            # d loss / d logits = (softmax - one_hot) * scale on valid rows, 0 elsewhere (in place: one buffer)
            grad_CV = logits_CV.sub_(lse_C[:, None]).exp_()
            grad_CV[torch.arange(len(y_C), device=y_C.device), y_C] -= 1.0
            grad_CV.mul_(torch.where(valid_C, scale, 0.0)[:, None])
            if softcap:  # d softcap * tanh(z / softcap) / dz = 1 - tanh^2
                grad_CV.mul_(tanh_CV.square_().neg_().add_(1.0))
            if need_b:
                grad_b_V += grad_CV.sum(0)
            grad_CV = grad_CV.to(dtype)
            if need_h:
                grad_h_TH[start : start + chunk] = grad_CV @ w_VH
            if need_w:
                grad_w_VH += grad_CV.T @ h_CH
        ctx.save_for_backward(grad_h_TH, grad_w_VH, grad_b_V)
        ctx.weight_dtype = weight_VH.dtype
        return loss * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        out = [None] * 9
        if grad_h is not None:
            out[0] = grad_h * grad_out.to(grad_h.dtype)
        if grad_w is not None:
            out[1] = (grad_w * grad_out).to(ctx.weight_dtype)
        if grad_b is not None:
            out[2] = (grad_b * grad_out).to(ctx.weight_dtype)
        return tuple(out)


def trained_rows(hidden_BSH: torch.Tensor, labels_BS: torch.Tensor | None, shift_labels: torch.Tensor | None,
                 none_ok: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(hidden_TH, targets_T) of the tokens that have a target (labels shifted left by one here, or `shift_labels`
    already shifted): every token when all have one, or none does and not `none_ok` (Liger's kernel takes no empty
    input); the gradient of the dropped rows is zero either way. The count sets the shapes: the training loop's
    labels carry it from the host (`fasttune_targets`, step.to_device), other labels cost a host sync."""
    known = getattr(labels_BS, "fasttune_targets", None) if shift_labels is None else None
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels_BS, (0, 1), value=IGNORE)[..., 1:]
    hidden_TH = hidden_BSH.reshape(-1, hidden_BSH.shape[-1])
    targets_T = shift_labels.reshape(-1).to(hidden_TH.device)
    valid_T = targets_T != IGNORE
    count = int(valid_T.sum()) if known is None else known
    if count == len(targets_T) or (count == 0 and not none_ok):
        return hidden_TH, targets_T
    keep_K = torch.nonzero_static(valid_T, size=count).squeeze(1)
    return hidden_TH.index_select(0, keep_K), targets_T.index_select(0, keep_K)


def _scale(targets_T: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """1 / the loss's divisor: the step's target count when given, else this batch's (the mean; 0/0 = nan with no
    target, as in HF)."""
    if num_items_in_batch is None:
        return 1.0 / (targets_T != IGNORE).sum().float()
    return 1.0 / torch.as_tensor(num_items_in_batch, device=targets_T.device).float()


def linear_cross_entropy(hidden_BSH: torch.Tensor, head: nn.Linear, labels_BS: torch.Tensor | None = None,
                         num_items_in_batch: int | torch.Tensor | None = None, shift_labels: torch.Tensor | None = None,
                         chunk: int | None = None, logits: LogitTransform | None = None) -> torch.Tensor:  # fmt: skip
    """HF's causal-LM loss of `head(hidden)`, scaled and softcapped as `logits` says, against `labels` (shifted here)
    or `shift_labels` (already shifted)."""
    logits = logits or LogitTransform()
    hidden_TH, targets_T = logits.scaled(*trained_rows(hidden_BSH, labels_BS, shift_labels, none_ok=True))
    device = hidden_TH.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden_TH.dtype
    scale = _scale(targets_T, num_items_in_batch)
    chunk = chunk or chunk_tokens(head.weight.shape[0])
    grad = torch.is_grad_enabled()  # evaluation (no_grad) computes the loss only
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(hidden_TH, head.weight, head.bias, targets_T, scale, chunk, dtype, grad,
                                         logits.softcap)  # fmt: skip


def _liger_chunk(rows: int, vocab: int, hidden: int, budget: int) -> int:
    """The rows per chunk of Liger's fused linear cross-entropy (liger_kernel/ops/fused_linear_cross_entropy.py)."""
    per = -(-rows // -(-vocab // (budget * hidden)))
    return min(rows, 1 << (per - 1).bit_length())


def liger_chunk_budget(rows: int, kept: int, vocab: int, hidden: int) -> int:
    """The smallest power-of-two `chunk_mem_const` that gives `kept` rows the chunk size Liger gives all `rows`."""
    want, budget = min(kept, _liger_chunk(rows, vocab, hidden, 1)), 1
    while _liger_chunk(kept, vocab, hidden, budget) < want:
        budget *= 2
    return budget


def liger_linear_cross_entropy(hidden_BSH: torch.Tensor, head: nn.Linear, labels_BS: torch.Tensor | None = None,
                               num_items_in_batch: int | torch.Tensor | None = None,
                               shift_labels: torch.Tensor | None = None,
                               logits: LogitTransform | None = None) -> torch.Tensor:  # fmt: skip
    """The same loss through Liger's fused linear cross-entropy kernel (liger-kernel installed, CUDA), called as
    Liger's own model forward calls it (a sum divided by `num_items_in_batch`, else the mean), on the trained rows."""
    if not torch.is_grad_enabled():  # evaluation: the loss only (Liger's kernels before 0.8.3 fill gradients anyway)
        return linear_cross_entropy(hidden_BSH, head, labels_BS, num_items_in_batch, shift_labels, logits=logits)
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    from fasttune.model.liger import quiet_other_backends

    quiet_other_backends()
    logits = logits or LogitTransform()
    hidden_TH, targets_T = logits.scaled(*trained_rows(hidden_BSH, labels_BS, shift_labels))
    kwargs = {"ignore_index": IGNORE, "reduction": "mean" if num_items_in_batch is None else "sum",
              "softcap": logits.softcap}  # fmt: skip
    if "chunk_mem_const" in inspect.signature(liger_fused_linear_cross_entropy).parameters:
        # Liger sizes its chunks in proportion to the rows it is given; fewer rows would mean skinnier matmuls that
        # re-read the head weight more often (-5% at a 128k vocabulary, measured): keep the whole batch's chunk size
        kwargs["chunk_mem_const"] = liger_chunk_budget(hidden_BSH[..., 0].numel(), len(targets_T), *head.weight.shape)
    loss = liger_fused_linear_cross_entropy(hidden_TH, head.weight, targets_T, head.bias, **kwargs)
    return loss if num_items_in_batch is None else loss / num_items_in_batch


def _head_loss_forward(self, *args, labels=None, fasttune_loss=None, fasttune_fallback=None, **kwargs):
    """`*ForCausalLM.forward` with labels: the backbone, then `fasttune_loss` (no logits returned). Without labels
    (generation) or when the head was wrapped later (LoRA on lm_head), the forward this one replaced."""
    if args or (labels is None and kwargs.get("shift_labels") is None) or type(self.lm_head) is not nn.Linear:
        return fasttune_fallback(self, *args, labels=labels, **kwargs)
    shift_labels, n_items = kwargs.pop("shift_labels", None), kwargs.get("num_items_in_batch")
    kwargs.pop("logits_to_keep", None)
    out = self.model(**kwargs)  # the backbone gets what HF's forward gives it (num_items_in_batch included)
    loss = fasttune_loss(out.last_hidden_state, self.lm_head, labels, n_items, shift_labels)
    return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=out.hidden_states, attentions=out.attentions,
                                  **{_CACHE: getattr(out, _CACHE, None)})  # fmt: skip


def apply_chunked_loss(model: nn.Module, liger: bool = False) -> bool:
    """Route this model instance's training loss through `linear_cross_entropy`, or with `liger` (Liger's kernels
    already patched in) through Liger's fused kernel, both on the trained tokens only; False, with the reason logged,
    when the model does not allow it (with `liger`, Liger's own forward then stays)."""
    why = supports_chunked_loss(model)
    if why is not None:
        then = "Liger's own loss runs on every token" if liger else "the model's own loss materialises the logits"
        log.info("%s: not applied (%s); %s", "trained-token loss" if liger else "chunked loss", why, then)
        return False
    transform = logit_transform(model)
    loss = functools.partial(liger_linear_cross_entropy if liger else linear_cross_entropy, logits=transform)
    replaced = vars(model).get("forward")  # Liger's, bound to this instance; else the class's
    fallback = replaced.__func__ if isinstance(replaced, types.MethodType) else type(model).forward
    forward = functools.partial(_head_loss_forward, fasttune_loss=loss, fasttune_fallback=fallback)
    forward.__name__ = "forward"  # pickle (torch.save of the model) stores the bound method by this name
    model.forward = types.MethodType(forward, model)
    if liger:
        log.info("loss: Liger's fused linear cross-entropy on the tokens with a target only%s", transform.describe())
    else:
        chunk = chunk_tokens(model.lm_head.weight.shape[0])
        log.info("chunked loss: linear + cross-entropy in %d-token chunks on the tokens with a target (the full "
                 "logits are never held)%s", chunk, transform.describe())  # fmt: skip
    return True
