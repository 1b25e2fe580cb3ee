"""transformers' ``sdpa`` attention as a GPU runs it, for runs on fake CPU tensors.

transformers' default attention (``attn_implementation="sdpa"``, ``integrations/sdpa_attention.py``)
calls ``torch.nn.functional.scaled_dot_product_attention`` on q, k, v as [B, H, S, D] transposes
of the [B, S, H, D] projections, causal and without a mask (``is_causal``; a model with a sliding
window passes a mask, which this does not stand in for) and, with grouped-query heads,
``enable_gqa``. On a GPU, for bf16 inputs with head dimensions a multiple of 8 up to 256, PyTorch
dispatches that to its FlashAttention-2 kernel, ``aten._scaled_dot_product_flash_attention``
(``sdp_utils.cpp``: flash is the first backend that takes them); on the CPU it would pick another
kernel. :func:`stand_in` sends the call to that CUDA op, so that autograd records its own node
(``ScaledDotProductFlashAttentionBackward0``) with what it saves, and the op's fake kernel makes
its outputs as the CUDA kernel lays them out: the output [B, S, H, D] (returned as its [B, H, S, D]
transpose), the fp32 logsumexp [B, H, S], and the RNG seeds, which on a GPU are host tensors
(:mod:`mst_referee.recorder` does not count them). Its backward's outputs (dq, dk, dv like q, k, v)
come from the fake kernel too; the scratch of ``mha_bwd`` inside it is added by the recorder
(:func:`mst_referee.recorder.StorageRecorder`, as :func:`mst_referee.flash._backward` allocates it).

Under autocast, ``scaled_dot_product_attention`` is a lower-precision op: its fp32 arguments are
cast to bf16 first (q and k, the rotated ones, in AMP; v leaves its linear in bf16). The stand-in
casts them as autocast would, in argument order.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
          dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False,
          **kwargs: Any) -> torch.Tensor:
    if attn_mask is not None or dropout_p or kwargs:
        raise NotImplementedError("mst_referee's SDPA stand-in: causal attention without a mask, dropout or other "
                                  "arguments (PyTorch's flash kernel)")
    if query.shape[-1] % 8 or query.shape[-1] > 256:
        raise NotImplementedError("mst_referee's SDPA stand-in: head dimensions a multiple of 8, at most 256")
    if torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu"):
        query, key, value = (x.to(torch.bfloat16) if x.dtype == torch.float32 else x for x in (query, key, value))
    # (enable_gqa: the flash kernel takes fewer key/value heads as they are)
    return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, is_causal, False,
                                                              scale=scale)[0]


@contextlib.contextmanager
def stand_in() -> Iterator[None]:
    """torch.nn.functional.scaled_dot_product_attention as CUDA runs transformers' call of it."""
    saved = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _sdpa  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = saved  # type: ignore[assignment]
