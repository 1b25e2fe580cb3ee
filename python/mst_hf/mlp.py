"""MLP mini-sequences: run a decoder layer's MLP over the tokens in chunks.

The MLP (gate/up -> act(gate) * up -> down) acts on every token on its own, so
any split of the tokens gives the same result. Chunks are taken over the
flattened tokens of a micro-batch, ``T = B * S`` (what mst-plan's simulator
calls the tokens per rank), with the sizes of :func:`mst_hf.config.chunk_sizes`.
A Mixture-of-Experts block (Mixtral, Qwen3-MoE, gpt-oss: a module with
``experts``) routes each token on its own too, so MsT splits the tokens before
routing and every routing and dispatch buffer shrinks with the chunk; such
blocks unpack [B, S, d], so each chunk is handed to them as a [1, n, d] view.
gpt-oss's block also returns its router scores, which its decoder layer
discards: a chunk keeps only its output, and the chunked block returns
``(y, None)`` in their place.

* ``loop`` (MsT reference): each chunk runs under autograd and the outputs are
  concatenated; no custom backward. Every chunk's intermediates ([n, I] each)
  stay saved until backward, so the saved bytes equal the unchunked MLP; what
  shrinks by the chunk count is a no-grad forward (a checkpointed layer's first
  pass) and the backward's gradient temporaries.
* ``tiled`` (DeepSpeed ALST TiledMLP): an autograd Function whose forward runs
  the chunks without autograd and saves only the input x [T, d]; its backward
  recomputes each chunk with autograd, writes the chunk's input gradient into a
  preallocated dx [T, d] and adds up the parameter gradients.
  Under ZeRO-3 the parameters are partitioned (empty) whenever the MLP's own
  submodules are not running, so they cannot be the Function's inputs: as ALST's
  TiledMLP, each chunk's backward accumulates into the parameters' ``.grad``
  itself, and DeepSpeed's gradient hook is told to wait for the last chunk
  (``ds_grad_is_ready``).
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ._torch import AutocastState, ForwardPatch, autocast_as, autocast_state
from .config import MLP_IMPLS, chunk_spans

Span = Tuple[int, int]
MlpFn = Callable[[Tensor], Tensor]


def _spans(tokens: int, chunks: int) -> List[Span]:
    # Fewer tokens than chunks (a decoding step, a short eval batch): one token per chunk.
    return chunk_spans(tokens, min(chunks, tokens))


def batched(fn: MlpFn) -> MlpFn:
    """``fn`` on [n, d] for a block whose forward takes [B, S, d] (a [1, n, d] view in, [n, d_out] out)."""
    return lambda x: fn(x.unsqueeze(0)).squeeze(0)


def _run_no_grad(fn: MlpFn, x: Tensor, spans: Sequence[Span]) -> Tensor:
    """x: [T, d] -> y: [T, d_out], written chunk by chunk into one preallocated y."""
    y: Optional[Tensor] = None
    for start, end in spans:
        part = fn(x[start:end])  # [n, d_out]
        if y is None:
            y = part.new_empty((x.shape[0], part.shape[-1]))
        y[start:end] = part
        del part
    assert y is not None
    return y


def loop_mlp(fn: MlpFn, x: Tensor, chunks: int) -> Tensor:
    """MsT reference loop. x: [..., d] -> [..., d_out]; ``fn`` is the MLP's own forward.

    With autograd on, the chunk outputs are joined with ``torch.cat`` (its
    backward only slices the gradient); without it they are written into one
    preallocated output.
    """
    flat = x.reshape(-1, x.shape[-1])  # [T, d]
    if flat.shape[0] == 0:
        y = fn(flat)
        return y.view(*x.shape[:-1], y.shape[-1])
    spans = _spans(flat.shape[0], chunks)
    if torch.is_grad_enabled():
        y = torch.cat([fn(flat[start:end]) for start, end in spans], dim=0)
    else:
        y = _run_no_grad(fn, flat, spans)
    return y.view(*x.shape[:-1], y.shape[-1])


def _tiled_forward(ctx: Any, fn: MlpFn, spans: List[Span], amp: AutocastState, params: Sequence[Tensor],
                   x: Tensor) -> Tensor:
    """A tiled Function's forward: the chunks without autograd into one output [T, d_out]; x alone saved."""
    ctx.fn, ctx.spans, ctx.amp, ctx.params = fn, spans, amp, params
    ctx.save_for_backward(x)
    return _run_no_grad(fn, x, spans)


def _replay(ctx: Any, x: Tensor, start: int, end: int, need_x: bool) -> Tuple[Tensor, Tensor]:
    """A tiled Function's chunk [start, end) of x [T, d] again, with autograd, on a detached leaf:
    (xc [n, d], yc [n, d_out]), under the forward's autocast state."""
    xc = x[start:end].detach().requires_grad_(need_x)
    with torch.enable_grad(), autocast_as(x.device.type, ctx.amp):
        return xc, ctx.fn(xc)


class _TiledMlp(torch.autograd.Function):
    """Forward without autograd saving only x; backward recomputes chunk by chunk.

    Inputs: fn (the MLP forward), spans, the autocast state, x [T, d], then the
    MLP's trainable parameters. They are inputs so that their gradients leave
    this node once per backward, summed over the chunks (as post-accumulate-grad
    hooks, DDP and optimizer-in-backward expect), rather than from a nested
    backward per chunk. They are kept on ctx, not saved: a checkpoint's
    recompute hands saved tensors back detached.
    """

    @staticmethod
    def forward(ctx: Any, fn: MlpFn, spans: List[Span], amp: AutocastState,
                x: Tensor, *params: Tensor) -> Tensor:
        return _tiled_forward(ctx, fn, spans, amp, params, x)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> Tuple[Optional[Tensor], ...]:
        # dy: [T, d_out] -> dx: [T, d], and one gradient per parameter.
        (x,) = ctx.saved_tensors
        need_x = ctx.needs_input_grad[3]
        need_params = ctx.needs_input_grad[4:]
        wanted = [p for p, need in zip(ctx.params, need_params) if need]
        dx = torch.empty_like(x) if need_x else None
        sums: List[Optional[Tensor]] = [None] * len(wanted)
        for start, end in ctx.spans:
            xc, yc = _replay(ctx, x, start, end, need_x)
            inputs = ([xc] if need_x else []) + wanted
            grads = list(torch.autograd.grad(yc, inputs, dy[start:end], allow_unused=True))
            del yc
            if need_x:
                dx[start:end] = grads.pop(0)
            for i, g in enumerate(grads):
                if g is None:
                    continue
                if sums[i] is None:
                    sums[i] = g  # the first chunk's gradient becomes the sum
                else:
                    sums[i].add_(g)
            del grads
        it = iter(sums)
        return (None, None, None, dx) + tuple(next(it) if need else None for need in need_params)


class _TiledMlpZero3(torch.autograd.Function):
    """ZeRO-3's tiled MLP (ALST's TiledMLP): x [T, d] is the only tensor input; the parameters'
    gradients are accumulated into their ``.grad`` by each chunk's own backward, DeepSpeed's
    reduction held back (``ds_grad_is_ready``) until the last chunk's."""

    @staticmethod
    def forward(ctx: Any, fn: MlpFn, spans: List[Span], amp: AutocastState, params: Sequence[Tensor],
                x: Tensor) -> Tensor:
        return _tiled_forward(ctx, fn, spans, amp, params, x)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> Tuple[Optional[Tensor], ...]:
        (x,) = ctx.saved_tensors
        need_x = ctx.needs_input_grad[4]
        dx = torch.empty_like(x) if need_x else None
        last = len(ctx.spans) - 1
        try:
            for i, (start, end) in enumerate(ctx.spans):
                for p in ctx.params:
                    p.ds_grad_is_ready = i == last
                xc, yc = _replay(ctx, x, start, end, need_x)
                torch.autograd.backward(yc, dy[start:end])
                del yc
                if need_x:
                    dx[start:end] = xc.grad
                del xc
        finally:  # DeepSpeed's default again, also when a chunk raised
            for p in ctx.params:
                p.ds_grad_is_ready = True
        return None, None, None, None, dx


def tiled_mlp(fn: MlpFn, module: nn.Module, x: Tensor, chunks: int, zero3: bool = False) -> Tensor:
    """ALST TiledMLP. x: [..., d] -> [..., d_out]; ``module`` owns the parameters ``fn`` uses.
    ``zero3``: its parameters are DeepSpeed ZeRO-3's, gathered only while its submodules run."""
    flat = x.reshape(-1, x.shape[-1])  # [T, d]
    params = tuple(p for p in module.parameters() if p.requires_grad)
    # (ZeRO-3's Function has x as its only input: without x's gradient it would never run backward, and
    # the parameters' gradients are made by the loop)
    if flat.shape[0] == 0 or not torch.is_grad_enabled() or not (flat.requires_grad or (params and not zero3)):
        return loop_mlp(fn, x, chunks)
    spans = _spans(flat.shape[0], chunks)
    if zero3:
        y = _TiledMlpZero3.apply(fn, spans, autocast_state(flat.device.type), params, flat)
    else:
        y = _TiledMlp.apply(fn, spans, autocast_state(flat.device.type), flat, *params)
    return y.view(*x.shape[:-1], y.shape[-1])


class ChunkedMlpForward(ForwardPatch):
    """Replacement ``forward`` of a decoder layer's MLP: hidden [B, S, d] -> [B, S, d]."""

    def __init__(self, mlp: nn.Module, chunks: int, impl: str, zero3: bool = False) -> None:
        if impl not in MLP_IMPLS:
            raise ValueError(f"mlp.impl: expected one of {', '.join(MLP_IMPLS)}, got {impl!r}")
        super().__init__(mlp)
        self.chunks = chunks
        self.impl = impl
        self.zero3 = zero3
        self.returns_tuple = False  # the block returns (output, router scores): gpt-oss
        # Mixture-of-Experts blocks (transformers' *SparseMoeBlock, GptOssMLP) unpack a [B, S, d] input.
        self.fn = batched(self._block) if isinstance(getattr(mlp, "experts", None), nn.Module) else self.inner

    def _block(self, x: Tensor) -> Tensor:
        out = self.inner(x)
        if isinstance(out, tuple):  # gpt-oss: (hidden, router scores); the scores die here
            self.returns_tuple = True
            return out[0]
        return out

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:  # an MLP that takes more than the hidden states: not ours to split
            return self.inner(x, *args, **kwargs)
        if self.impl == "tiled":
            y = tiled_mlp(self.fn, self.module, x, self.chunks, self.zero3)
        else:
            y = loop_mlp(self.fn, x, self.chunks)
        return (y, None) if self.returns_tuple else y
