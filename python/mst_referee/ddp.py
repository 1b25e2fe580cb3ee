"""DistributedDataParallel on fake tensors: one data-parallel rank's memory, with torch's own Reducer.

A plan with ``dp`` > 1 (and no ZeRO or sequence parallelism) trains as the Hugging Face Trainer
(through accelerate) or a hand-written loop does: the model wrapped in
``torch.nn.parallel.DistributedDataParallel`` with its defaults (25 MiB buckets, a 1 MiB first
bucket, ``gradient_as_bucket_view=False``). Each rank holds the same tensors whatever the number
of ranks, so the referee runs the rank alone, on a ``fake`` process group of one: the real
Reducer allocates its gradient buckets, copies each gradient into its bucket slice and back, and
rebuilds the buckets after the first iteration in the order the gradients became ready. Three
places need data that fake tensors do not have; each is answered as a real run would answer it:

* DDP's constructor checks that every rank holds parameters of the same shapes (an all-gather of
  shape metadata) and broadcasts rank 0's weights (``init_sync``): neither allocates anything the
  step keeps, and both read tensor data. The check is skipped and ``init_sync`` is off.
* The all-reduce of a full bucket runs in place (NCCL's own buffers are outside PyTorch's caching
  allocator): a communication hook hands the bucket back as it is, where the fake process group's
  collective would return no tensor.
* The rebuild exchanges the new bucket order as small int32 index tensors whose values the Reducer
  reads: those are real tensors (:class:`_RealIndexTensors`), the buckets stay fake.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _process_group() -> bool:
    """The default process group: a ``fake`` one of a single rank (the rank the plan is for).
    Returns whether it was made here (and is to be destroyed after the run)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        return False
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=1)
    return True


class _RealIndexTensors(TorchDispatchMode):
    """Inside the bucket rebuild: int32/int64 tensors the Reducer makes (and everything computed
    from real tensors only) are real, so their values can be read; the buckets stay fake."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

        kwargs = kwargs or {}
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        real_inputs = bool(tensors) and not any(isinstance(t, FakeTensor) for t in tensors)
        index = func is torch.ops.aten.empty.memory_format and kwargs.get("dtype") in (torch.int32, torch.int64)
        if real_inputs or index:
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        return func(*args, **kwargs)


class Ddp:
    """A model wrapped in DistributedDataParallel for the referee; ``module`` is what it trains."""

    def __init__(self, model: Any) -> None:
        import torch.nn.parallel.distributed as distributed

        self._own_group = _process_group()
        verify = distributed._verify_param_shape_across_processes
        distributed._verify_param_shape_across_processes = lambda *args, **kwargs: None
        try:
            self.module = distributed.DistributedDataParallel(model, init_sync=False)
        finally:
            distributed._verify_param_shape_across_processes = verify
        self.buckets: Dict[int, Any] = {}  # index -> flat buffer, as the last backward reduced them
        buckets = self.buckets

        def all_reduce_in_place(_state, bucket):  # (no annotations: DDP checks the hook's)
            buckets[bucket.index()] = bucket.buffer()
            done = torch.futures.Future()
            done.set_result(bucket.buffer())
            return done

        self.module.register_comm_hook(None, all_reduce_in_place)
        # DDP rebuilds its buckets as the first forward after the first backward begins (the
        # second micro-step's, with accumulation): ahead of its own call, with real index tensors.
        self._rebuild_hook = self.module.register_forward_pre_hook(self._rebuild_buckets)

    def _rebuild_buckets(self, _module: Any, _args: Any) -> None:
        self.buckets.clear()  # (refilled by the backward; the old buckets go as the Reducer replaces them)
        with _RealIndexTensors():
            self.module.reducer._rebuild_buckets()

    def rebuilt(self) -> None:
        """After the warm-up: the buckets are the ones every later step holds."""
        self._rebuild_hook.remove()

    def close(self) -> None:
        """Lets go of the wrapper, and of the process group if it was made for it (code that checks
        ``torch.distributed.is_initialized()`` then runs as on one GPU again)."""
        import torch.distributed as dist

        self.buckets.clear()
        self.module = None
        if self._own_group and dist.is_initialized():
            dist.destroy_process_group()

    def bucket_tensors(self) -> List[Tuple[str, Any]]:
        """The buckets every step after the rebuild holds, in the Reducer's order."""
        return [(f"ddp.bucket.{i}", self.buckets[i]) for i in sorted(self.buckets)]
