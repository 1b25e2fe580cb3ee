"""What torchtitan's step runs on a GPU that the CPU runs differently, with a GPU's allocations.

torchtitan 0.3.0's language models reach four code paths whose CUDA and CPU versions allocate
differently, or which cannot run on fake tensors at all. :func:`stand_in` replaces each, for the
referee's fake-tensor step (:mod:`mst_referee.titan`), with one that allocates what the GPU run does
(the outputs and the saved tensors; the internal scratch of a fused kernel is not seen by a dispatch
mode on a GPU either, and is not recorded here):

* ``torch.nn.RMSNorm`` calls ``aten._fused_rms_norm`` on every device (torch 2.15,
  ``aten/src/ATen/native/layer_norm.cpp``, ``rms_norm_symint``). On CUDA that op has its own kernel and
  autograd formula (``derivatives.yaml``: it saves the input, the weight and ``result1``, the fp32
  reciprocal RMS of each row; its backward ``_fused_rms_norm_backward`` returns the input's and the
  weight's gradients). On the CPU it has none and decomposes into an fp32 upcast, a product, a mean
  and casts, each saved for backward. :class:`FusedRmsNorm` is the CUDA op's allocations: ATen's own
  kernel, which a torch wheel runs. (torch 2.15 also has a CuTe-DSL override of the op, in
  ``torch/_native/ops/norm``, active only where the ``nvidia-cutlass-dsl`` package is installed; its
  backward allocates an fp32 partial buffer of its own, which is not stood in for.)
* ``FlexAttention`` calls ``torch.compile(flex_attention)``, which inductor lowers to Triton kernels on
  a GPU; compiled for the CPU on fake tensors it crashes (it reads their storage). Its allocations
  are the lowering's (``torch/_inductor/kernel/flex/flex_attention.py``, torch 2.15): in forward the
  fp32 ``logsumexp`` and ``max_scores`` [B, Hq, S] and the output [B, Hq, S, Dv] in the query's fill
  order (here [B, S, Hq, Dv], the transpose of the query's layout); ``max_scores`` is no output of
  the compiled graph (torchtitan asks for no auxiliary output) and dies with it; AOT autograd saves
  q, k, v, the output and ``logsumexp`` for backward. Backward: ``delta`` (fp32 [B, Hq, S], the
  row sums of ``out * grad_out``, dead after the kernel), then ``grad_query`` in the query's order and
  the value's and the key's gradients in their own ([B, Hkv, S, D]: GQA broadcasts only the batch
  dimension in 2.15, whose ``sum`` is not taken when the batches are equal). :class:`FlexAttention`
  is that. The attention's values are not computed (fake tensors have none).
* transformers' ``flex_attention_forward`` (the transformers backend's attention) asks the compiled
  kernel for its logsumexp on a GPU and not on the CPU: :func:`hf_flex_attention_forward` is the GPU's
  branch (the kernel above with the fp32 logsumexp as an output, its bf16 cast returned beside the
  output; transformers' own ``repeat_kv`` first where the head count is no power of two).
* The block mask: ``torch.compile(create_block_mask)`` likewise. What survives the compiled call is
  the ``BlockMask``'s eight int32 tensors (``kv_num_blocks`` [B, H, Q/128], ``kv_indices`` [B, H,
  Q/128, KV/128], the ``full_`` pair, and the ``q_`` pair and its ``full_`` pair with the block
  counts swapped: ``_create_sparse_block_from_block_mask``), made before the first layer and held to
  the step's end; without ``separate_full_blocks`` the ``full_`` ones are None. :func:`block_mask`
  makes them (the compiled call's transient tensors die before the forward begins, and are not
  recorded).
* Expert parallelism's token counts: ``AllToAllTokenDispatcher`` exchanges each expert's count of
  routed pairs and brings the sums per rank to the host (``tolist``) to size its all-to-alls: values,
  which fake tensors do not have. :func:`token_counts` stands in with routing as mst-plan plans it:
  this rank's N = T x top_k pairs sent evenly to the ep ranks, and the pairs its experts receive
  (N under uniform routing, ``moe_imbalance`` x N on the rank the plan calls busiest, at most ep x N,
  as ``TrainingSetup::expert_rows``) received evenly from them. Every buffer the dispatcher makes
  from those sizes is its own.
"""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Any, Iterator, Optional, Sequence, Tuple

import torch


class FusedRmsNorm(torch.autograd.Function):
    """``aten._fused_rms_norm`` as CUDA runs it: the output, the fp32 reciprocal RMS per row; backward
    the input's and the weight's gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: Optional[torch.Tensor], shape: Tuple[int, ...],
                eps: Optional[float]) -> Tuple[torch.Tensor, torch.Tensor]:
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        rows = tuple(x.shape[:x.dim() - len(shape)])
        rstd = torch.empty(rows + (1,) * len(shape), dtype=torch.float32, device=x.device)
        ctx.save_for_backward(x, weight, rstd)
        ctx.mark_non_differentiable(rstd)
        ctx.set_materialize_grads(False)  # (the C++ formula takes an undefined gradient of rstd as it is)
        return y, rstd

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor, _grad_rstd: Any) -> Tuple[Any, ...]:
        x, weight, _rstd = ctx.saved_tensors
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty_like(weight) if weight is not None and ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None, None


_COMPOSITE_RMS_NORM = torch.nn.functional.rms_norm  # (torch's own, before stand_in replaces it)


def rms_norm(input: torch.Tensor, normalized_shape: Sequence[int], weight: Optional[torch.Tensor] = None,
             eps: Optional[float] = None) -> torch.Tensor:
    """``torch.nn.functional.rms_norm`` as it runs on a GPU: the fused op's output; where the weight's dtype is
    not the input's, ATen's composite on every device (``rms_norm_symint``), torch's own code here too."""
    if weight is not None and weight.dtype != input.dtype:
        return _COMPOSITE_RMS_NORM(input, normalized_shape, weight, eps)
    return FusedRmsNorm.apply(input, weight, tuple(normalized_shape), eps)[0]


def _like_transposed(t: torch.Tensor, last: int, dtype: torch.dtype) -> torch.Tensor:
    """A new [B, H, S, last] tensor in the fill order of ``t``, as inductor's ``infer_dense_strides`` lays it out:
    stored as [B, S, H, last] where ``t`` is a transposed view of a [B, S, H, D] projection (torchtitan's and
    transformers' queries), else as [B, H, S, last]."""
    b, h, s, _ = t.shape
    if h > 1 and s > 1 and t.stride(1) > t.stride(2):
        return torch.empty(b, h, s, last, dtype=dtype, device=t.device)
    return torch.empty(b, s, h, last, dtype=dtype, device=t.device).transpose(1, 2)


class FlexAttention(torch.autograd.Function):
    """The compiled ``flex_attention``'s forward and backward graphs: their allocations, no values."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: bool = False) -> Any:
        """The output; with ``lse`` (an ``AuxRequest(lse=True)``) the output and the logsumexp, which is then an output
        of the compiled graph too (not differentiated: no gradient is made for it)."""
        b, hq, s, _ = q.shape
        logsumexp = torch.empty(b, hq, s, dtype=torch.float32, device=q.device)
        max_scores = torch.empty(b, hq, s, dtype=torch.float32, device=q.device)
        out = _like_transposed(q, v.shape[-1], q.dtype)
        del max_scores  # (not an output of the compiled graph)
        ctx.save_for_backward(q, k, v, out, logsumexp)
        if not lse:
            return out
        ctx.mark_non_differentiable(logsumexp)
        ctx.set_materialize_grads(False)
        return out, logsumexp

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, *_grad_lse: Any) -> Tuple[Any, ...]:
        q, k, v, _out, _logsumexp = ctx.saved_tensors
        b, hq, s, _ = q.shape
        delta = torch.empty(b, hq, s, dtype=torch.float32, device=q.device)
        grad_query = _like_transposed(q, q.shape[-1], q.dtype)
        grad_value = _like_transposed(v, v.shape[-1], v.dtype)
        grad_key = _like_transposed(k, k.shape[-1], k.dtype)
        del delta  # (dead after the backward kernel)
        return grad_query, grad_key, grad_value, None


def compiled_flex_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, score_mod: Any = None, block_mask: Any = None,
                       scale: Any = None, enable_gqa: bool = False, return_aux: Any = None,
                       kernel_options: Any = None) -> Tuple[torch.Tensor, Any]:
    """torchtitan's ``FlexAttention.compiled_flex_attn``: the output, no auxiliary outputs (torchtitan's
    language models ask for none: ``out_transform`` is None)."""
    if score_mod is not None or kernel_options or (return_aux is not None and (
            getattr(return_aux, "lse", False) or getattr(return_aux, "max_scores", False))):
        raise NotImplementedError("referee: flex attention with a score_mod, kernel options (another backend) or "
                                  "auxiliary outputs is not stood in for")
    return FlexAttention.apply(q, k, v), None


def hf_flex_attention_forward(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
                              scaling: Any = None, softcap: Any = None, s_aux: Any = None, position_bias: Any = None,
                              **kwargs: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``flex_attention_forward`` (transformers 5.24, integrations/flex_attention.py) as a GPU runs it,
    which torchtitan's transformers backend calls: on the CPU it asks for no logsumexp, on a GPU it does. A head
    count that is no power of two has its key and value heads repeated (transformers' own ``repeat_kv``); the
    compiled kernel returns the output and the fp32 logsumexp (a soft-capping ``score_mod`` is fused into it: the
    same allocations), the logsumexp is cast to the value's dtype and returned beside the output, which is
    transposed back to [B, S, H, D] (its fill order already: no copy)."""
    from torch.nn.attention.flex_attention import BlockMask
    from transformers.integrations.flex_attention import repeat_kv

    if (not isinstance(attention_mask, BlockMask) or s_aux is not None or position_bias is not None
            or kwargs.get("kernel_options") or kwargs.get("dropout", 0.0) > 0):
        raise NotImplementedError("referee: transformers' flex attention with a score mask, attention sinks, a position "
                                  "bias, kernel options or dropout is not stood in for")
    heads = query.shape[1]
    if heads & (heads - 1):
        key = repeat_kv(key, heads // key.shape[1])
        value = repeat_kv(value, heads // value.shape[1])
    out, lse = FlexAttention.apply(query, key, value, True)
    return out.transpose(1, 2).contiguous(), lse.to(value.dtype)


def block_mask(mask_mod: Any, B: Optional[int], H: Optional[int], Q_LEN: int, KV_LEN: int, device: Any = None,
               BLOCK_SIZE: Any = 128, _compile: bool = False, separate_full_blocks: bool = True, **_kwargs: Any) -> Any:
    """The ``BlockMask`` the compiled ``create_block_mask`` returns: its eight int32 tensors (no values)."""
    from torch.nn.attention.flex_attention import BlockMask

    b, h = B or 1, H or 1
    bq, bk = (BLOCK_SIZE, BLOCK_SIZE) if isinstance(BLOCK_SIZE, int) else BLOCK_SIZE
    nq, nk = -(-Q_LEN // bq), -(-KV_LEN // bk)

    def i32(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, dtype=torch.int32, device=device)

    def full(*shape: int) -> Optional[torch.Tensor]:
        return i32(*shape) if separate_full_blocks else None
    kv = [i32(b, h, nq), i32(b, h, nq, nk), full(b, h, nq), full(b, h, nq, nk)]
    q = [i32(b, h, nk), i32(b, h, nk, nq), full(b, h, nk), full(b, h, nk, nq)]
    return BlockMask((Q_LEN, KV_LEN), *kv, *q, BLOCK_SIZE=(bq, bk), mask_mod=mask_mod)


def even_splits(total: int, parts: int) -> list:
    """``total`` in ``parts`` sizes that differ by at most one, the larger first."""
    return [total // parts + (1 if r < total % parts else 0) for r in range(parts)]


def received_pairs(pairs: int, ep: int, imbalance: float) -> int:
    """The pairs a rank's experts receive (mst-plan's ``TrainingSetup::expert_rows``): ``pairs`` under uniform
    routing, ``imbalance`` times as many on the busiest rank, at most every rank's."""
    if ep == 1:
        return pairs
    return min(pairs * ep, max(pairs, math.ceil(imbalance * pairs * (1.0 - 1e-12))))


def token_counts(imbalance: float) -> Any:
    """``AllToAllTokenDispatcher._sync_token_count_exchange`` without values: the splits of this module's
    docstring (the counts themselves stay fake tensors, whose sizes are the real ones)."""
    def sync(self: Any, local_counts: torch.Tensor, global_counts: torch.Tensor, ep_size: int) -> Tuple[Any, list, list]:
        global_counts = torch.ops._c10d_functional.wait_tensor(global_counts).reshape(-1)
        pairs = self.mst_pairs  # (token_reorder's N, as dispatch made it)
        return (global_counts, even_splits(pairs, ep_size),
                even_splits(received_pairs(pairs, ep_size, imbalance), ep_size))
    return sync


def token_reorder(original: Any) -> Any:
    """``_local_reorder``, noting the count of pairs it sorted (N = T x top_k) for :func:`token_counts`."""
    def reorder(self: Any, x: torch.Tensor, scores: torch.Tensor, expert_ids: torch.Tensor) -> Any:
        self.mst_pairs = expert_ids.numel()
        return original(self, x, scores, expert_ids)
    return reorder


@contextlib.contextmanager
def stand_in(imbalance: float = 1.0) -> Iterator[None]:
    """torchtitan's step with a GPU's RMSNorm, flex attention and block mask, and expert parallelism's token
    counts by routing as planned (``imbalance``: the plan's ``moe_imbalance``, this rank the busiest; this
    module's docstring)."""
    import torch.nn.functional as F
    import torchtitan.models.common.attention as attention
    import torchtitan.models.common.decoder as decoder
    from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher, LocalTokenDispatcher

    saved = (F.rms_norm, attention.FlexAttention.__dict__["compiled_flex_attn"], attention.create_attention_mask,
             decoder.create_attention_mask)
    F.rms_norm = rms_norm
    dispatcher_saved = (AllToAllTokenDispatcher.__dict__["_sync_token_count_exchange"],
                        LocalTokenDispatcher.__dict__["_local_reorder"])
    AllToAllTokenDispatcher._sync_token_count_exchange = token_counts(imbalance)
    LocalTokenDispatcher._local_reorder = token_reorder(dispatcher_saved[1])
    attention.FlexAttention.compiled_flex_attn = staticmethod(compiled_flex_attn)
    attention.create_attention_mask = decoder.create_attention_mask = block_mask
    # the transformers backend (where a config has loaded it): its own imports of the block mask and of
    # transformers' flex attention
    backend = sys.modules.get("torchtitan.experiments.transformers_modeling_backend.model")
    backend_saved = (backend.create_attention_mask, backend.flex_attention_forward) if backend else None
    if backend:
        backend.create_attention_mask, backend.flex_attention_forward = block_mask, hf_flex_attention_forward
    try:
        yield
    finally:
        F.rms_norm = saved[0]
        AllToAllTokenDispatcher._sync_token_count_exchange, LocalTokenDispatcher._local_reorder = dispatcher_saved
        attention.FlexAttention.compiled_flex_attn = saved[1]
        attention.create_attention_mask, decoder.create_attention_mask = saved[2], saved[3]
        if backend:
            backend.create_attention_mask, backend.flex_attention_forward = backend_saved
