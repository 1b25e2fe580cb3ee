"""LM head + cross-entropy mini-sequences, without ever holding [T, V] logits.

Shapes: hidden [T, d] (T = B * S tokens, flattened), weight [V, d], targets [T]
(the labels already shifted for next-token prediction), logits [n, V] per chunk
of n tokens. Chunks follow :func:`mst_hf.config.chunk_sizes`, so every token
counts, also when T is not a multiple of the chunk count.

* ``recompute`` (MsT reference): forward runs each chunk without autograd and
  keeps only the loss; it saves hidden and targets. Backward recomputes each
  chunk's logits in fp32, turns them into the gradient in place (softmax minus
  one-hot, scaled), casts to the compute dtype and accumulates d_hidden (the
  chunk's rows) and d_weight.
* ``fused`` (Liger fused-linear-cross-entropy / ALST tiled logits): forward
  does the same per chunk and computes d_hidden [T, d] and d_weight [V, d]
  right away; backward only scales them by the incoming gradient.

The loss is the one of Hugging Face's ``ForCausalLMLoss``: logits upcast to
fp32, labels shifted left by one with ``ignore_index`` appended, cross-entropy
summed over the targets that are not ``ignore_index`` and divided by their
count (or by ``num_items_in_batch`` when given, as the Trainer does under
gradient accumulation). Gemma-2's ``final_logit_softcapping`` is applied to
the fp32 logits: ``cap * tanh(z / cap)``, derivative ``1 - tanh(z / cap)**2``.
No targets at all give a NaN loss, as in Hugging Face.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ._torch import compute_dtype, no_autocast
from .config import LM_HEAD_IMPLS, chunk_spans

Span = Tuple[int, int]
IGNORE_INDEX = -100


def _chunk_logits(h: Tensor, w: Tensor, softcap: Optional[float]) -> Tuple[Tensor, Optional[Tensor]]:
    """h: [n, d], w: [V, d] in the compute dtype -> (z [n, V] fp32 logits, tanh [n, V] or None).

    The matmul result is upcast to fp32 as Hugging Face does; with a softcap, z
    holds the capped logits and the second tensor tanh(z_raw / cap).
    """
    z = F.linear(h, w).float()
    if softcap is None:
        return z, None
    t = z.div_(softcap).tanh_()
    return t * softcap, t


def _loss_and_grad_(z: Tensor, t: Optional[Tensor], targets: Tensor, ignore_index: int,
                    scale: Optional[Tensor]) -> Tensor:
    """Summed cross-entropy of one chunk; with ``scale``, z becomes its gradient in place.

    z: [n, V] fp32 logits, t: [n, V] fp32 softcap tanh or None, targets: [n],
    scale: 0-dim fp32 (dloss/dsum) or None. Returns a 0-dim fp32 sum over the
    valid targets. Afterwards z holds d(scale * sum)/d(logits before the softcap).
    """
    valid = targets != ignore_index  # [n]
    safe = targets.masked_fill(~valid, 0).unsqueeze(1)  # [n, 1]
    picked = z.gather(1, safe).squeeze(1)  # [n]
    peak = z.amax(dim=1, keepdim=True)  # [n, 1]
    z.sub_(peak).exp_()
    total = z.sum(dim=1, keepdim=True)  # [n, 1]
    lse = (peak + total.log()).squeeze(1)  # [n]
    loss = (lse - picked).masked_fill(~valid, 0.0).sum()
    if scale is None:
        return loss
    weight = valid.to(z.dtype).unsqueeze(1)  # [n, 1]
    z.div_(total)  # softmax
    z.scatter_add_(1, safe, -weight)  # minus one-hot on the valid rows
    z.mul_(weight * scale)  # ignored rows get no gradient
    if t is not None:
        z.mul_(t.mul_(t).neg_().add_(1.0))
    return loss


def _chunk_backward(h: Tensor, w: Tensor, targets: Tensor, softcap: Optional[float], ignore_index: int,
                    scale: Tensor, d_hidden: Optional[Tensor], d_weight: Optional[Tensor]) -> Tensor:
    """One chunk's loss and gradients. h: [n, d], w: [V, d] (compute dtype), targets: [n].

    Writes d_hidden [n, d] (a slice of the full gradient) and adds into
    d_weight [V, d]; returns the chunk's summed loss (0-dim fp32). A function of
    its own so the [n, V] temporaries are freed before the next chunk starts.
    """
    z, t = _chunk_logits(h, w, softcap)
    loss = _loss_and_grad_(z, t, targets, ignore_index, scale)
    del t
    g = z.to(w.dtype)  # [n, V]: the GEMMs run in the compute dtype
    del z
    if d_hidden is not None:
        if d_hidden.dtype == g.dtype:
            torch.mm(g, w, out=d_hidden)
        else:
            d_hidden.copy_(g @ w)
    if d_weight is not None:
        d_weight.addmm_(g.t(), h)
    return loss


def _loss_sum(hidden: Tensor, weight: Tensor, targets: Tensor, spans: List[Span], softcap: Optional[float],
              ignore_index: int, dtype: torch.dtype) -> Tensor:
    """Summed cross-entropy over all chunks, no gradients. hidden: [T, d] -> 0-dim fp32."""
    w = weight.to(dtype)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    with no_autocast(hidden.device.type):
        for start, end in spans:
            z, t = _chunk_logits(hidden[start:end].to(dtype), w, softcap)
            total += _loss_and_grad_(z, t, targets[start:end], ignore_index, None)
            del z, t
    return total


class _RecomputeLoss(torch.autograd.Function):
    """MsT reference: saves hidden [T, d] and targets [T]; logits recomputed in backward."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor, denominator: Tensor,
                spans: List[Span], softcap: Optional[float], ignore_index: int, dtype: torch.dtype) -> Tensor:
        ctx.spans, ctx.softcap, ctx.ignore_index, ctx.dtype = spans, softcap, ignore_index, dtype
        ctx.save_for_backward(hidden, weight, targets, denominator)
        return _loss_sum(hidden, weight, targets, spans, softcap, ignore_index, dtype) / denominator

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> Tuple[Optional[Tensor], ...]:
        hidden, weight, targets, denominator = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        scale = grad_loss.float() / denominator
        w = weight.to(ctx.dtype)  # under AMP the recompute's own low-precision copy
        d_hidden = torch.empty_like(hidden) if need_hidden else None
        d_weight = torch.zeros_like(w) if need_weight else None
        with no_autocast(hidden.device.type):
            for start, end in ctx.spans:
                _chunk_backward(hidden[start:end].to(ctx.dtype), w, targets[start:end], ctx.softcap,
                                ctx.ignore_index, scale, None if d_hidden is None else d_hidden[start:end], d_weight)
        if d_weight is not None:
            d_weight = d_weight.to(weight.dtype)
        return d_hidden, d_weight, None, None, None, None, None, None


class _FusedLoss(torch.autograd.Function):
    """Liger-style: gradients computed in forward for grad_loss = 1, held until backward."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor, denominator: Tensor,
                spans: List[Span], softcap: Optional[float], ignore_index: int, dtype: torch.dtype) -> Tensor:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        scale = denominator.reciprocal()
        w = weight.to(dtype)
        d_hidden = torch.empty_like(hidden) if need_hidden else None
        d_weight = torch.zeros_like(w) if need_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with no_autocast(hidden.device.type):
            for start, end in spans:
                total += _chunk_backward(hidden[start:end].to(dtype), w, targets[start:end], softcap, ignore_index,
                                         scale, None if d_hidden is None else d_hidden[start:end], d_weight)
        if d_weight is not None:
            d_weight = d_weight.to(weight.dtype)
        ctx.has = (d_hidden is not None, d_weight is not None)
        ctx.save_for_backward(*(g for g in (d_hidden, d_weight) if g is not None))
        return total / denominator

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> Tuple[Optional[Tensor], ...]:
        saved = iter(ctx.saved_tensors)
        d_hidden = next(saved) if ctx.has[0] else None
        d_weight = next(saved) if ctx.has[1] else None
        # Scaled by the incoming gradient (1, or 1 / grad_accum) in place: no second copy of
        # either gradient, and no branch on the gradient's value (a GPU sync, which fake tensors
        # of the referee cannot answer either).
        for g in (d_hidden, d_weight):
            if g is not None:
                g.mul_(grad_loss)
        return d_hidden, d_weight, None, None, None, None, None, None


def shift_targets(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """labels: [B, S] -> targets [B, S]: token t is trained to predict labels[t + 1].

    The last position of every sequence gets ``ignore_index`` (Hugging Face's
    ``ForCausalLMLoss`` shift).
    """
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def causal_lm_loss(hidden: Tensor, weight: Tensor, labels: Optional[Tensor] = None, *, chunks: int,
                   impl: str = "recompute", softcap: Optional[float] = None, ignore_index: int = IGNORE_INDEX,
                   num_items_in_batch: Optional[Union[int, Tensor]] = None,
                   shift_labels: Optional[Tensor] = None) -> Tensor:
    """Mean next-token cross-entropy of ``hidden @ weight.T``, computed in mini-sequences.

    hidden: [B, S, d] (or [T, d]), weight: [V, d], labels: [B, S] (unshifted,
    as given to a Hugging Face model) or shift_labels: [B, S] (already shifted).
    Returns a 0-dim fp32 loss equal to ``ForCausalLMLoss`` on the full logits.
    """
    if impl not in LM_HEAD_IMPLS:
        raise ValueError(f"lm_head.impl: expected one of {', '.join(LM_HEAD_IMPLS)}, got {impl!r}")
    if shift_labels is None:
        if labels is None:
            raise ValueError("causal_lm_loss: expected labels or shift_labels")
        shift_labels = shift_targets(labels, ignore_index)
    d = hidden.shape[-1]
    flat = hidden.reshape(-1, d)  # [T, d]
    if not flat.is_contiguous():
        flat = flat.contiguous()
    targets = shift_labels.reshape(-1).to(device=flat.device, dtype=torch.long)  # [T]
    if targets.shape[0] != flat.shape[0]:
        raise ValueError(f"causal_lm_loss: labels hold {targets.shape[0]} tokens, hidden states "
                         f"{flat.shape[0]} ({tuple(hidden.shape)})")
    if weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"causal_lm_loss: expected weight [V, {d}], got {tuple(weight.shape)}")
    if num_items_in_batch is None:
        denominator = (targets != ignore_index).sum().to(torch.float32)
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=flat.device).to(torch.float32)
    tokens = flat.shape[0]
    if tokens == 0:
        return torch.zeros((), dtype=torch.float32, device=flat.device) / denominator
    spans = chunk_spans(tokens, min(chunks, tokens))
    dtype = compute_dtype(weight)
    if not torch.is_grad_enabled() or not (flat.requires_grad or weight.requires_grad):
        return _loss_sum(flat, weight, targets, spans, softcap, ignore_index, dtype) / denominator
    fn = _FusedLoss if impl == "fused" else _RecomputeLoss
    return fn.apply(flat, weight, targets, denominator, spans, softcap, ignore_index, dtype)
