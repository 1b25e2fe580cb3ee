"""FlashAttention-2 as its allocations, for runs where the ``flash_attn`` package cannot run.

The plan's "flash" attention is what Hugging Face runs with ``attn_implementation=
"flash_attention_2"``: transformers' own ``flash_attention_forward`` and
``_flash_attention_forward`` (unchanged here) call ``flash_attn.flash_attn_func``, whose CUDA
kernels need a GPU. This module stands in for that one package. Its functions take the same
arguments and allocate, in the same order, exactly what flash-attn 2.8 allocates
(``flash_attn/flash_attn_interface.py`` ``FlashAttnFunc`` and ``csrc/flash_attn/flash_api.cpp``
``mha_fwd`` / ``mha_bwd``, non-deterministic backward, no dropout), through ordinary torch
ops so that a dispatch mode or the profiler sees them:

* forward: the output [B, S, H, Dv] in q's dtype (``empty_like(q)``: in q's memory order, so a q
  that is [B, H, S, D] in memory, as Phi-3's concatenated one, makes an output transformers'
  reshape then copies), the softmax logsumexp [B, H, S] fp32 and
  the dropout RNG state int64[2]; the autograd node saves q, k, v, the output, the logsumexp
  and the RNG state.
* backward: dq, dk, dv like q, k, v (``empty_like``: q's and k's keep the strides of the
  transposed inputs transformers passes); inside ``mha_bwd`` the row sums of dO * O
  [B, H, round128(S)] fp32, the fp32 dQ accumulator [B, round128(S), H, round32(D)] and,
  with grouped-query attention, dK and dV for every query head [B, S, H, D] (summed into dk
  and dv), which die at its return (dV's expansion first, then dK's, then the accumulator);
  the row sums are returned and dropped by the caller. The node's saved tensors are locals of
  its backward, as in flash-attn (under checkpointing they die when it returns, in order).

The values are not computed (the outputs are uninitialised memory): the referee runs on fake
tensors, and the plain-CPU validation only compares allocations.

transformers asks one value-dependent question on this path: whether the position ids of a
single-row batch hold packed sequences (``_is_packed_sequence``). The referee's batches are
single sequences, so :func:`stand_in` answers "no" after the same ops.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional, Tuple

import torch

IMPLEMENTATION = "flash_attention_2"


def _round(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mha_fwd's allocations: (out, softmax_lse, rng_state)."""
    batch, seq_q, heads, _ = q.shape
    # empty_like(q): q's memory order (Phi-3's joined q is [B, H, S, D] in memory, its transpose too)
    out = torch.empty_like(q) if v.shape[3] == q.shape[3] else \
        torch.empty((batch, seq_q, heads, v.shape[3]), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    rng_state = torch.empty((2,), dtype=torch.int64, device=q.device)
    return out, lse, rng_state


def _backward(dout: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              out: Optional[torch.Tensor], softmax_lse: Optional[torch.Tensor], rng_state: Optional[torch.Tensor],
              empty: Optional[Callable[[Tuple[int, ...], torch.dtype, str], torch.Tensor]] = None) -> torch.Tensor:
    """mha_bwd's allocations (its dq, dk, dv are the caller's): returns softmax_d. ``empty(shape,
    dtype, name)`` makes each buffer: torch.empty on q's device, unless the caller records them
    itself (the recorder, for aten's own copy of this kernel, whose fake kernel makes none)."""
    if empty is None:
        def empty(shape: Tuple[int, ...], dtype: torch.dtype, name: str) -> torch.Tensor:
            return torch.empty(shape, dtype=dtype, device=q.device)
    batch, seq_q, heads, head_dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    head_rounded = _round(head_dim, 32) if head_dim <= 192 else 256
    softmax_d = empty((batch, heads, _round(seq_q, 128)), torch.float32, "softmax_d")
    dq_accum = empty((batch, _round(seq_q, 128), heads, head_rounded), torch.float32, "dq_accum")
    if kv_heads != heads:
        dk_expanded = empty((batch, seq_k, heads, head_dim), q.dtype, "dk_expanded")
        dv_expanded = empty((batch, seq_k, heads, v.shape[3]), q.dtype, "dv_expanded")
        del dv_expanded, dk_expanded
    del dq_accum
    return softmax_d


def _maybe_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous() if x.stride(-1) != 1 else x


class _FlashAttnFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out, lse, rng_state = _forward(*(_maybe_contiguous(x) for x in (q, k, v)))
        ctx.save_for_backward(q, k, v, out, lse, rng_state)
        return out[..., : q.shape[-1]]

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, out, softmax_lse, rng_state = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _backward(*(_maybe_contiguous(x) for x in (dout, q, k, v, out)), softmax_lse, rng_state)
        return dq, dk, dv


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                    softmax_scale: Optional[float] = None, causal: bool = False,
                    window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes: Any = None,
                    deterministic: bool = False, return_attn_probs: bool = False) -> torch.Tensor:
    """flash_attn.flash_attn_func's signature; q [B, S, H, D], k and v [B, S, H_kv, D]."""
    if dropout_p or alibi_slopes is not None or deterministic or return_attn_probs:
        raise NotImplementedError("mst_referee's FlashAttention-2 stand-in: no dropout, ALiBi, "
                                  "deterministic backward or returned probabilities")
    if q.shape[-1] % 8:
        raise NotImplementedError("mst_referee's FlashAttention-2 stand-in: head dimensions are multiples of 8")
    return _FlashAttnFunc.apply(q, k, v)


def flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                           dropout_p: float = 0.0, softmax_scale: Optional[float] = None, causal: bool = False,
                           window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes: Any = None,
                           deterministic: bool = False, return_attn_probs: bool = False,
                           block_table: Any = None) -> torch.Tensor:
    """flash_attn.flash_attn_varlen_func's signature (transformers reads which keywords it takes);
    padded and packed batches are not what the referee runs."""
    raise NotImplementedError("mst_referee's FlashAttention-2 stand-in: no variable-length (padded or packed) batches")


def _single_sequence(position_ids: Optional[torch.Tensor], batch_size: int) -> bool:
    """transformers' ``_is_packed_sequence`` for single sequences: its ops, and the answer "no"."""
    if position_ids is None or batch_size != 1 or position_ids.shape[-1] == 1:
        return False
    increasing = torch.arange(position_ids.shape[1], device=position_ids.device) + position_ids.min()
    (increasing - position_ids).abs().sum().bool()  # the check's allocations; its value is not read
    return False


@contextlib.contextmanager
def stand_in() -> Iterator[None]:
    """transformers' flash_attention_2 path with this module in place of the flash_attn package."""
    import transformers.modeling_flash_attention_utils as fa

    process = fa._lazy_define_process_function(flash_attn_varlen_func)
    functions = (flash_attn_func, flash_attn_varlen_func, None, fa._pad_input, fa._unpad_input)

    def lazy_import(implementation: Optional[str], *args: Any, **kwargs: Any) -> Any:
        if implementation != IMPLEMENTATION:
            raise ValueError(f"mst_referee: attention {implementation!r} is not the FlashAttention-2 stand-in")
        return functions, (process, dict)

    saved = (fa.lazy_import_flash_attention, fa._is_packed_sequence)
    fa.lazy_import_flash_attention, fa._is_packed_sequence = lazy_import, _single_sequence
    try:
        yield
    finally:
        fa.lazy_import_flash_attention, fa._is_packed_sequence = saved


def use_flash(model: Any, planned: str) -> str:
    """Run the model's attention as the plan says: "flash" becomes transformers'
    flash_attention_2 (inside :func:`stand_in`); returns the implementation the model runs."""
    if planned == "flash":
        model.config._attn_implementation = IMPLEMENTATION
    return model.config._attn_implementation
