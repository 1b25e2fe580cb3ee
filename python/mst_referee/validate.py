"""The referee checked against a plain CPU step measured by ``torch.profiler``.

The referee observes a step through a dispatch mode on fake tensors; a plain step runs on
real tensors with no mode at all. Both run the same job through :func:`mst_referee.step.run_step`
(a small model on the CPU, the same warm-up). The profiler's CPU allocator events of the plain
step (``profile_memory``: every allocation with its address and size, nested in the aten op
that made it) must contain the referee's events, in order and byte for byte; what the
profiler sees beyond them must be one of what a dispatch mode cannot see and a GPU does not
allocate as device memory:

* an allocation freed before the outermost aten op that made it returns (a kernel's scratch,
  e.g. a Python scalar wrapped into a 0-dim tensor inside ``mul``, the CPU flash-attention
  kernel's buffers);
* an allocation outside every aten op (a Python scalar wrapped before the op is called; the
  CPU RNG state that checkpointing saves), or a constant ``torch.tensor(1.0)`` makes (an
  ``empty`` of at most 8 bytes; torch.optim's step increment, a host scalar on a GPU).

:func:`align` returns what was matched and what was skipped, so a test states both.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .jobs import Job


@dataclass
class _Alloc:
    kind: str              # "alloc" or "free"
    nbytes: int
    alloc: Optional[int]   # for a free: the index of its allocation
    top: Any               # the outermost aten op it happened in (None: outside every op)
    ops: Tuple[str, ...]   # the aten ops it happened in, outermost first ("_softmax", not "aten::_softmax")

    def made_by(self, name: str) -> bool:
        """Whether a dispatch mode could see op ``name`` make it: one of the ops it was made in,
        down to the first that is a kernel (the mode sees what a composite such as ``softmax``
        or ``linear`` decomposes into, and nothing of what happens inside a kernel such as
        ``bmm``)."""
        for op in self.ops:
            if op == name:
                return True
            if _kind(op) == "kernel":
                return False
        return False


@dataclass
class Alignment:
    matched: int                         # referee events found in the profile, in order
    referee_events: int
    profiled_events: int
    skipped: Counter = field(default_factory=Counter)   # (bytes, op) of the profile's extra allocations
    problems: List[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return not self.problems and self.matched == self.referee_events


_KINDS: Dict[str, str] = {}


def _kind(name: str) -> str:
    """``composite`` when aten::name is CompositeImplicitAutograd (decomposed before any dispatch
    mode sees it), ``kernel`` when it is not, ``mixed`` when some overloads are (the profiler does
    not name the overload it ran); ``out=`` variants do not count."""
    if name not in _KINDS:
        import torch

        packet = getattr(torch.ops.aten, name, None)
        kinds = []
        for o in packet.overloads() if packet is not None else []:
            if o.endswith("out"):
                continue
            try:  # TorchScript-only overloads (to.prim_Device) are not in the dispatcher
                kinds.append(torch._C._dispatch_has_kernel_for_dispatch_key(
                    f"aten::{name}" + ("" if o == "default" else f".{o}"), "CompositeImplicitAutograd"))
            except RuntimeError:
                pass
        _KINDS[name] = "composite" if kinds and all(kinds) else "mixed" if any(kinds) else "kernel"
    return _KINDS[name]


def profiled_allocations(prof: Any) -> List[_Alloc]:
    """Every CPU allocation and free of a ``torch.profiler.profile(profile_memory=True)`` run, in order."""
    from torch._C._profiler import _EventType

    raw: List[Tuple[int, int, int, Any, Tuple[str, ...]]] = []

    def walk(e: Any, chain: Tuple[Any, ...]) -> None:
        if e.tag == _EventType.Allocation:
            raw.append((e.start_time_ns, e.extra_fields.ptr, e.extra_fields.alloc_size, chain[0] if chain else None,
                        tuple(op.name[len("aten::"):] for op in chain)))
        is_aten = e.tag == _EventType.TorchOp and e.name.startswith("aten::")
        for c in e.children:
            walk(c, chain + (e,) if is_aten else chain)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root, ())
    raw.sort(key=lambda a: a[0])
    live: Dict[int, int] = {}
    out: List[_Alloc] = []
    for _, ptr, size, top, ops in raw:
        if size > 0:
            live[ptr] = len(out)
            out.append(_Alloc("alloc", size, None, top, ops))
        elif ptr in live:  # a block allocated before profiling started is not ours
            out.append(_Alloc("free", -size, live.pop(ptr), top, ops))
    return out


def align(profiled: Sequence[_Alloc], referee: Sequence[Sequence[Any]]) -> Alignment:
    """Find the referee's events (``[kind, tensor, bytes, ...]``, init excluded) in the profile.

    An allocation of the profile may match the referee's next allocation when it has the same
    size and was made by the op the referee names (:meth:`_Alloc.made_by`); a free must then
    free the tensor its allocation matched. Everything passed over must be freed inside the
    outermost op that made it, or lie outside every op. A kernel can make scratch of the size
    and in the op of its output (``bmm``'s contiguous copy of an operand): where such scratch
    could match, it is matched first and passed over instead if the alignment breaks later.
    """
    free_at = {a.alloc: i for i, a in enumerate(profiled) if a.kind == "free"}

    def scratch(i: int) -> bool:
        f = free_at.get(i)
        return f is not None and profiled[i].top is not None and profiled[f].top is profiled[i].top

    def constant(i: int) -> bool:  # torch.tensor(1.0): an `empty` outside every other op, a host scalar
        return profiled[i].ops == ("empty",) and profiled[i].nbytes <= 8

    # State: (next profile event, next referee event, matched tensors, passed-over allocations).
    choices: List[Tuple[int, int, Dict[int, int], frozenset]] = []
    i, j, tensor_of, passed_over = 0, 0, {}, frozenset()
    best = (0, "")
    while i < len(profiled):
        a = profiled[i]
        r = referee[j] if j < len(referee) else None
        problem = ""
        if a.kind == "alloc":
            if r is not None and r[0] == "alloc" and r[2] == a.nbytes and a.made_by(r[9].split(" ")[0]):
                if scratch(i):
                    choices.append((i, j, dict(tensor_of), passed_over | {i}))
                tensor_of = dict(tensor_of)
                tensor_of[i] = r[1]
                j += 1
            else:
                passed_over = passed_over | {i}
        elif a.alloc in passed_over:
            start = profiled[a.alloc].top
            if start is not None and start is not a.top and not constant(a.alloc):
                problem = (f"profile event {i}: {a.nbytes} bytes allocated in {start.name} outlive it, but the "
                           f"referee has no such tensor")
        elif r is not None and r[0] == "free" and r[2] == a.nbytes and tensor_of.get(a.alloc) == r[1]:
            j += 1
        else:
            op = a.top.name if a.top is not None else "-"
            problem = f"profile event {i}: free of {a.nbytes} bytes ({op}); the referee's next event is {r}"
        if problem:
            if j > best[0] or not best[1]:
                best = (j, problem)
            if not choices:
                break
            i, j, tensor_of, passed_over = choices.pop()  # pass that scratch over instead
        i += 1
    result = Alignment(j if not best[1] or i >= len(profiled) else best[0], len(referee), len(profiled))
    if i < len(profiled) or j < len(referee):
        result.problems.append(best[1] or f"the referee's events from {j} on are not in the profile")
    for k in passed_over:
        result.skipped[(profiled[k].nbytes, profiled[k].top.name if profiled[k].top is not None else "-")] += 1
    return result


def profile_plain_step(job: Job) -> List[_Alloc]:
    """The job's step on real tensors on the CPU, no dispatch mode, measured by torch.profiler
    after the same warm-up as the referee's."""
    import torch

    import mst_hf

    from .flash import stand_in
    from .referee import patched_model, warm_up
    from .step import run_step
    from .train import step_batches

    cfg = mst_hf.load_config(job.mst_config)
    model, _ = patched_model(job, cfg)
    optimizer = mst_hf.make_optimizer(model, cfg, lr=job.lr)
    next_step = step_batches(job)
    with stand_in():
        warm_up(job, model, optimizer, cfg, next_step, "cpu")
        batches = next_step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            run_step(model, optimizer, cfg, batches, "cpu", keep_loss=False, trainer=job.trainer)
    return profiled_allocations(prof)


def memtracker_peak(job: Job) -> int:
    """Peak bytes of the job's fake-tensor step as PyTorch's own tracker reports it
    (``torch.distributed._tools.mem_tracker.MemTracker``, parameters, buffers, gradients and
    optimizer states registered with ``track_external``), after the referee's warm-up."""
    from torch.distributed._tools.mem_tracker import MemTracker

    import mst_hf

    from .fake import session
    from .referee import _optimizers, patched_model, warm_up
    from .step import run_step
    from .train import step_batches

    cfg = mst_hf.load_config(job.mst_config)
    with session():
        model, _ = patched_model(job, cfg)
        optimizer = mst_hf.make_optimizer(model, cfg, lr=job.lr)
        next_step = step_batches(job)
        warm_up(job, model, optimizer, cfg, next_step, "fake")
        batches = next_step()
        tracker = MemTracker()
        tracker.track_external(model, *_optimizers(optimizer))
        with tracker:
            run_step(model, optimizer, cfg, batches, "fake", keep_loss=False, trainer=job.trainer)
        return int(sum(dev["Total"] for dev in tracker.get_tracker_snapshot("peak").values()))
