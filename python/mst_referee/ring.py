"""Ring attention as PyTorch's context parallelism runs it: one rank's allocations, on fake tensors.

``torch.distributed.tensor.experimental.context_parallel`` shards the sequence over cp ranks with
the head-tail load balancer (rank r holds chunks r and 2cp-1-r of 2cp) and sends every SDPA call
through PyTorch's ring attention (``torch/distributed/tensor/experimental/_context_parallel/
_attention.py``: ``_templated_ring_attention`` and its backward, torch 2.15's defaults: the K/V
all-gathered once per call, partial outputs merged in fp32, load balance on). That is what
accelerate 1.15's ``cp_backend="torch"`` runs (the Hugging Face Trainer with
``ParallelismConfig(cp_size=...)``; its default ``cp_comm_strategy`` is "allgather") for
transformers' sdpa attention. This module runs that code itself, unchanged, for one attention
call of one layer on one rank, and records every storage it allocates and frees, in order. It is
the referee of mst-plan's ring rule (``attn.ring``, ``src/core/sim/ring.cpp``). (torchtitan 0.3.0's
language models run context parallelism another way: FlexAttention over all-gathered K/V.)

What stands in for what (each the allocation of the real thing, nothing computed):

* The process group is torch's ``fake`` backend of cp ranks; under ``FakeTensorMode`` its
  functional collectives (the K/V all-gather, the dK/dV permutation) allocate their outputs as
  on a GPU. The wait on a collective returns the tensor it waited for (on fake tensors it
  returns a copy: recorded as the same storage).
* The SDPA kernel is aten's FlashAttention-2 on CUDA (``_scaled_dot_product_flash_attention``),
  given the [B, S, H, D] views aten makes of its [B, H, S, D] arguments: the output like q and
  the fp32 logsumexp [B, H, S] (its RNG seeds are host tensors). Its backward makes the output's
  gradient and the output contiguous (``_flash_attention_backward``), allocates dq, dk, dv like
  q, k, v and the scratch of ``mha_bwd`` (:func:`mst_referee.flash._backward`).
* On CUDA ``log_sigmoid_forward`` allocates no buffer (``LogSigmoid.cu``); the fake kernel's
  is not recorded.
* Around the call, the caller (transformers' ``sdpa_attention_forward``: grouped-query heads
  through ``enable_gqa``, the mask dropped for ``is_causal``) hands q, k, v as transposes of the
  [B, S, H, D] projections and makes the output contiguous again before ``o_proj``: that copy is
  recorded too.

The inputs (q, k, v; in backward the saved tensors and the output's gradient) exist before the
recording starts and are not events.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import flash

_WAIT = torch.ops._c10d_functional.wait_tensor.default
_LOG_SIGMOID = torch.ops.aten.log_sigmoid_forward.default


@dataclass
class Recording:
    """One phase's events: (+bytes) for an allocation, (-bytes) for a free, in order, and what
    made each (the aten op and the tensor, or "free")."""

    events: List[int] = field(default_factory=list)
    names: List[str] = field(default_factory=list)
    peak: int = 0  # above what was live when the recording started


class _Recorder(TorchDispatchMode):
    def __init__(self, known: List[torch.Tensor]) -> None:
        super().__init__()
        self._seen = {t.untyped_storage()._cdata for t in known}
        self._live: Dict[int, int] = {}
        self._current = 0
        self._open = True
        self.recording = Recording()

    def __exit__(self, *exc: Any) -> Any:
        self._open = False  # what dies afterwards is the caller's
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: Tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func is _WAIT:  # a wait hands back the collective's own output: the same buffer
            before, after = args[0].untyped_storage()._cdata, out.untyped_storage()._cdata
            if before in self._live and after != before:
                self._live[after] = self._live.pop(before)
                weakref.finalize(out.untyped_storage(), self._free, after)
            return out
        if func is _LOG_SIGMOID:  # on CUDA its second output, the backward's buffer, is empty
            out = (out[0], out[1].new_empty((0,)))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._seen or key in self._live or storage.nbytes() == 0:
                continue
            self._live[key] = storage.nbytes()
            self._current += storage.nbytes()
            self.recording.peak = max(self.recording.peak, self._current)
            self.recording.events.append(storage.nbytes())
            self.recording.names.append(f"{func.__name__} {str(t.dtype)[6:]}{list(t.shape)}")
            weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        if self._open and key in self._live:
            nbytes = self._live.pop(key)
            self._current -= nbytes
            self.recording.events.append(-nbytes)
            self.recording.names.append("free")


def _flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False, **_: Any) -> Tuple[Any, ...]:
    """aten._scaled_dot_product_flash_attention on CUDA, as its allocations: (out, logsumexp, ...)."""
    batch, heads, seq_q, _ = q.shape
    out = torch.empty((batch, seq_q, heads, v.shape[3]), dtype=q.dtype, device=q.device)  # like q's [B, S, H, D] view
    lse = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    return out.transpose(1, 2), lse, None, None, 0, 0, None, None, None  # the RNG seeds stay on the host


def _flash_backward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor,
                    logsumexp: torch.Tensor, is_causal: bool = False, grad_out: Any = None, **_: Any) -> Tuple[Any, ...]:
    """aten._scaled_dot_product_flash_attention_backward on CUDA, as its allocations: (dq, dk, dv)."""
    q, k, v, o, g = (x.transpose(1, 2) for x in (query, key, value, out, grad_out))
    g, o = g.contiguous(), o.contiguous()  # _flash_attention_backward: "CUDA code assumes that dout is contiguous"
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    softmax_d = flash._backward(g, q, k, v, o, logsumexp, None)
    del softmax_d
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


@contextlib.contextmanager
def _group(cp: int, rank: int) -> Iterator[Any]:
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("mst_referee.ring: a process group already exists")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=cp)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def record(cp: int, rank: int, batch: int, heads: int, kv_heads: int, local_seq: int, head_dim: int) -> Tuple[Recording, Recording]:
    """One layer's attention on rank ``rank`` of ``cp``: the forward's and the backward's recordings.

    ``local_seq`` is the rank's tokens per sequence (seq_len / cp, an even number: head-tail
    sharding gives each rank two halves). Forward: from q, k, v to the caller's contiguous output.
    Backward: from the output's gradient to dq, dk, dv.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.tensor.experimental._context_parallel import _attention as ring

    if cp < 2 or not 0 <= rank < cp or local_seq % 2:
        raise ValueError(f"mst_referee.ring: cp >= 2, 0 <= rank < cp and an even local_seq, got {cp}, {rank}, {local_seq}")
    options = ring._cp_options
    if not (options.convert_to_f32 and options.enable_load_balance and options.rotate_method == ring._RotateMethod.ALL_GATHER):
        raise RuntimeError("mst_referee.ring: torch's context-parallel options are not its defaults")
    bf16 = torch.bfloat16
    with _group(cp, rank) as group, FakeTensorMode():
        def projection(h: int) -> torch.Tensor:  # the [B, S, H, D] projection, handed to SDPA as [B, H, S, D]
            return torch.empty(batch, local_seq, h, head_dim, dtype=bf16).transpose(1, 2)

        q, k, v = projection(heads), projection(kv_heads), projection(kv_heads)
        with _Recorder([q, k, v]) as forward:
            out, lse, *_ = ring._templated_ring_attention(group, 2, _flash_forward, q, k, v, is_causal=True)
            attn_out = out.transpose(1, 2).contiguous()  # the caller's [B, S, H, D] copy before o_proj
        grad = torch.empty(batch, local_seq, heads, head_dim, dtype=bf16).transpose(1, 2)  # wo's input gradient
        with _Recorder([q, k, v, out, lse, attn_out, grad]) as backward:
            grads = ring._templated_ring_attention_backward(group, 2, _flash_backward, grad, "grad_out", q, k, v, out, lse,
                                                            is_causal=True)
        del grads, attn_out
    return forward.recording, backward.recording
