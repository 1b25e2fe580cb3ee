"""A training step at full model size on the CPU with fake tensors.

Under ``FakeTensorMode`` every tensor has its real shape, dtype, strides and lifetime but no
storage, so the real ``transformers`` + PyTorch step of an 8B model runs on a laptop-sized
CPU in seconds. Two places of that step branch on the *values* of tensors, which fake
tensors do not have; :func:`session` answers them as the real data of a run would, with the
same ops (so the same allocations), and documents each:

* transformers' packed-sequence detection (``masking_utils.find_packed_sequence_indices``)
  asks whether the position ids hold one sequence per row. The referee's batches are single
  sequences (the model's own ``arange`` positions), so the answer is "yes": no packed mask.
  Fake tensors cannot answer, and transformers then builds and keeps a [B, 1, S, S] mask
  that a real run does not have.
* ``torch.autograd.graph.save_on_cpu`` copies saved tensors to host memory and back. On a
  CPU run the copy back is a no-op, so a CUDA run's reload allocation would be missing; the
  emulation allocates the host copy as host memory (:func:`mst_referee.recorder.host_memory`)
  and the reload as a device copy, as on a GPU.

The plan's "flash" attention is transformers' flash_attention_2, whose flash_attn kernels need a
GPU: :mod:`mst_referee.flash` stands in for that package with its exact allocations (its
scratch buffers included) and answers the flash path's own packed-sequence question.

Everything else runs unchanged. Fake CUDA tensors fail in backward without a device, so the
device is the CPU; what differs between the CPU and CUDA code paths is kept to what a
dispatch mode can see (aten ops and their outputs; the internal scratch of PyTorch's own
kernels is not seen).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Tuple

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from . import flash, sdpa
from .recorder import host_memory


def _single_sequence_per_row(position_ids: torch.Tensor) -> None:
    """transformers' ``find_packed_sequence_indices`` for a batch of single sequences.

    position_ids: [B, S]. The same ops as transformers (so the same tensors are allocated),
    and the answer its data-dependent check gives for single sequences: no packing (None).
    """
    first = position_ids[:, :1] - 1
    diff = torch.diff(position_ids, prepend=first, dim=-1)
    starts = (diff != 1).cumsum(-1)
    (starts[:, -1] == 0).all()  # the check itself allocates its two booleans
    return None


class _SaveOnDevicesHost(torch.autograd.graph.saved_tensors_hooks):
    """``save_on_cpu`` as it behaves on a GPU: a host copy in forward, a device copy in backward."""

    def __init__(self, pin_memory: bool = False, device_type: str = "cuda") -> None:
        def pack(tensor: torch.Tensor) -> Tuple[torch.device, torch.Tensor]:
            with host_memory():
                packed = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout)
            packed.copy_(tensor)
            return tensor.device, packed

        def unpack(packed: Tuple[torch.device, torch.Tensor]) -> torch.Tensor:
            return packed[1].clone()

        super().__init__(pack, unpack)


@contextlib.contextmanager
def session() -> Iterator[FakeTensorMode]:
    """Fake tensors on the CPU, with the value-dependent branches answered as for real data."""
    import transformers.masking_utils as masking

    saved = (masking.find_packed_sequence_indices, torch.autograd.graph.save_on_cpu)
    masking.find_packed_sequence_indices = _single_sequence_per_row
    torch.autograd.graph.save_on_cpu = _SaveOnDevicesHost  # type: ignore[misc]
    try:
        with flash.stand_in(), sdpa.stand_in(), FakeTensorMode() as mode:
            yield mode
    finally:
        masking.find_packed_sequence_indices, torch.autograd.graph.save_on_cpu = saved


def fake_available() -> Tuple[bool, Any]:
    """Whether this torch can run the referee (fake tensors and the hooks it needs), and why not."""
    needed = ("_current_autograd_node", "_current_graph_task_id")
    missing = [n for n in needed if not hasattr(torch._C, n)]
    if missing or not hasattr(torch.autograd.graph, "node_creation_hook"):
        return False, f"torch {torch.__version__} lacks {', '.join(missing) or 'node_creation_hook'}"
    return True, None
