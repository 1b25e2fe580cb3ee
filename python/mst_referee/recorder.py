"""Every storage a PyTorch training step allocates and frees, in order.

``StorageRecorder`` is a ``TorchDispatchMode``: it sees the output of every aten op,
tracks each new untyped storage by weak reference (the free is the moment the storage
dies, exactly as a caching allocator gets the block back) and writes one event per
allocation and per free, in the format of mst-plan's timelines (``mst-timeline/1``
events): kind, tensor id (allocation order), bytes, category, device, phase, decoder
layer, micro-step, op and name. It works the same on real and on fake tensors
(``FakeTensorMode``: every tensor has its real shape, dtype and lifetime, no storage),
which is how the full-size step of an 8B model is observed on a CPU.

Where each event comes from:

* phase: set by the driver (``forward``, ``backward``, ``optimizer``); forward code that a
  backward runs with grad mode on is ``recompute`` (checkpointing's replay of a layer, a tiled
  MLP's per-chunk replay).
* layer and op: in forward and recompute, the innermost module whose forward is
  running (global module hooks; ``always_call`` so that the early stop of non-reentrant
  checkpointing, an exception, keeps the stack right). In backward, the module that
  created the autograd node being evaluated (a node-creation hook tags every node).
* name: the aten op and the tensor it made (``mm bf16[16, 64]``); for a free, the op running
  when the storage died ("-" between ops).
* category: decided when the step ends, from what each storage turned out to be
  (see :meth:`StorageRecorder.timeline`).

Two things differ between this observation and a plain GPU run, and are corrected here:

1. While any dispatch mode is active (and every fake tensor is a tensor subclass),
   autograd's ``InputBuffer`` sums two gradients of one tensor out of place
   (``old + new``) where a plain run adds in place (``old.add_(new)``) whenever the
   buffer holds the last reference to ``old``
   (torch/csrc/autograd/input_buffer.cpp, ``accumulate``). Such an add is recognised
   (an ``aten.add.Tensor`` of two same-shaped tensors issued by the engine between
   node applications, not inside a module's forward or a Python Function's backward)
   and, when ``old`` dies right after it (so the buffer did hold the last reference),
   the pair "allocate the sum, free old" is recorded as what the plain run does:
   nothing; the sum continues old's tensor id.
2. The storages that existed before recording starts (weights, optimizer states) are
   registered by the driver as ``init`` allocations, in a fixed order.

The recording runs on the CPU, whose autocast casts fewer ops than CUDA's: an op with a CUDA
autocast policy and none on the CPU (``pow``, ``rsqrt``, ``sum``, ``cumsum``, ``log`` ...) that
receives a bf16/fp16 floating input inside an autocast region would run in fp32 on a GPU. The
recorder refuses such a step (:class:`CudaAutocastMismatch`) rather than record what a GPU run
does not allocate.

A storage can also change size in place: ``UntypedStorage.resize_``, which FSDP2 uses to free
each parameter's unsharded copy after its unit's forward and backward (``free_storage``) and to
allocate it again before the next all-gather (``alloc_storage``). While a recorder is active,
a resize to zero is the free of the storage's bytes and a resize from zero the allocation of a
new tensor; between two non-zero sizes the new block is allocated before the old one goes back
(CUDA's ``resize_bytes_cuda`` copies from one to the other).

Not recorded: tensors on the ``meta`` device (shapes only: DeepSpeed keeps one per parameter); constants made from Python data (``torch.tensor(1.0)``: ``aten.lift_fresh`` on
fake tensors), which the code the referee runs keeps on the host (torch.optim's step
increment); and zero-byte storages.
"""

from __future__ import annotations

import contextlib
import re
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Set, Tuple

import torch
from torch.autograd.graph import node_creation_hook
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import flash

PHASES = ("init", "forward", "recompute", "backward", "optimizer")
CATEGORIES = ("weights", "master_weights", "gradients", "optimizer_state", "saved_activation", "transient",
              "checkpoint", "offloaded", "workspace")

_ADD = torch.ops.aten.add.Tensor
_LIFT_FRESH = torch.ops.aten.lift_fresh.default
# PyTorch's FlashAttention-2 SDPA kernel (mst_referee.sdpa sends transformers' sdpa there): on a GPU
# its RNG seeds (outputs 6 and 7) are host tensors, and its backward's mha_bwd allocates scratch
# the fake kernel does not (added by _sdpa_flash_scratch).
_SDPA_FLASH = torch.ops.aten._scaled_dot_product_flash_attention.default
_SDPA_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_backward.default
_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.int64: "i64",
           torch.int32: "i32", torch.bool: "bool", torch.uint8: "u8"}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
_MODULE_KEY = "mst_referee_module"


_host_depth = [0]

# UntypedStorage.resize_ as torch has it, and the recorders active now (the patched resize_ tells
# them; it is installed while any is).
_RESIZE = torch.UntypedStorage.resize_
_resize_listeners: List["StorageRecorder"] = []


def _recorded_resize(storage: Any, size: int) -> Any:
    before = storage.nbytes()
    out = _RESIZE(storage, size)
    for recorder in list(_resize_listeners):
        recorder._resized(storage, before)
    return out


@contextlib.contextmanager
def host_memory() -> Iterator[None]:
    """Storages created inside are host memory (an offloaded copy), not device memory."""
    _host_depth[0] += 1
    try:
        yield
    finally:
        _host_depth[0] -= 1


def layer_of(path: str) -> int:
    """The decoder layer a module path belongs to (``model.layers.7.mlp`` -> 7), or -1."""
    m = _LAYER.search(path)
    return int(m.group(1)) if m else -1


@dataclass
class _Storage:
    """A storage being tracked: its tensor id and what is known about it."""

    tensor: int
    nbytes: int
    phase: str                     # phase of the allocation
    device: str = "gpu"
    category: Optional[str] = None  # fixed at registration or by what the step shows
    freed_phase: Optional[str] = None


@dataclass
class Event:
    alloc: bool
    tensor: int
    bytes: int
    device: str
    phase: str
    layer: int
    micro_step: int
    op: str
    name: str
    category: str = ""

    # to_list's fields, as an mst-timeline/1 file's "columns" names them (mst-plan's reader refuses another order)
    COLUMNS = ("kind", "tensor", "bytes", "category", "device", "phase", "layer", "micro_step", "op", "name")

    def to_list(self) -> List[Any]:
        return ["alloc" if self.alloc else "free", self.tensor, self.bytes, self.category, self.device, self.phase,
                self.layer, self.micro_step, self.op, self.name]


@dataclass
class _PendingSum:
    """An InputBuffer sum recorded out of place, waiting to see whether old dies next."""

    key: int               # the sum's storage, by id
    storage: _Storage
    old: _Storage          # the old gradient's storage (no reference to the storage itself: it must die)
    event: Event           # the sum's allocation event, not yet written


class CudaAutocastMismatch(RuntimeError):
    """An op CUDA's autocast would cast (and the CPU's does not) met an input it casts."""


# CUDA's autocast policies the check needs to tell apart, read from the installed torch's own
# lists (torch/include/ATen/autocast_mode.h, AT_FORALL_*): lower_precision_fp ops cast fp32 inputs
# down, promote ops only mixed inputs; every other CUDA policy (fp32, fp32_set_opt_dtype,
# fp32_append_dtype) casts bf16/fp16 inputs up. _cudnn_rnn is registered by hand (lower precision).
def _autocast_list(macro: str) -> Set[str]:
    header = Path(torch.__file__).parent / "include" / "ATen" / "autocast_mode.h"
    text = header.read_text() if header.is_file() else ""
    start = text.find(f"#define {macro}(_)")
    if start < 0:
        raise RuntimeError(f"referee: {header}: no {macro}: cannot tell CUDA's autocast policies apart")
    body = []
    for line in text[start:].splitlines()[1:]:
        body.append(line)
        if not line.rstrip().endswith("\\"):
            break
    return set(re.findall(r"_\((\w+)", "\n".join(body)))


_CUDA_LOWER_PRECISION = _autocast_list("AT_FORALL_LOWER_PRECISION_FP") | {"_cudnn_rnn"}
_CUDA_PROMOTE = _autocast_list("AT_FORALL_PROMOTE")
_LOW = (torch.bfloat16, torch.float16)
_CUDA_ONLY_AUTOCAST: Dict[str, bool] = {}


def _cuda_only_autocast(func: Any) -> bool:
    """Whether ``func`` has an AutocastCUDA kernel and no AutocastCPU one (cached per overload)."""
    name = func.name() if hasattr(func, "name") else str(func)
    hit = _CUDA_ONLY_AUTOCAST.get(name)
    if hit is None:
        has = torch._C._dispatch_has_kernel_for_dispatch_key
        try:
            hit = has(name, "AutocastCUDA") and not has(name, "AutocastCPU")
        except RuntimeError:  # not a registered operator (a Python-level op)
            hit = False
        _CUDA_ONLY_AUTOCAST[name] = hit
    return hit


@contextlib.contextmanager
def cuda_autocast_policies() -> Iterator[None]:
    """CPU autocast restricted to the ops CUDA's autocast also has a policy for: the others
    (``cat`` promoting mixed inputs through a copy, ``cross_entropy_loss`` in fp32, ...) run as on a
    GPU, uncast. (The reverse, ops only CUDA's autocast casts, check_cuda_autocast refuses.)"""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    lib = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
            for name in torch._C._dispatch_get_registrations_for_dispatch_key("AutocastCPU"):
                if name.startswith("aten::") and not has(name, "AutocastCUDA"):
                    lib.impl(name[len("aten::"):], torch.library.fallthrough_kernel, "AutocastCPU")
        yield
    finally:
        lib._destroy()


class AutocastProbe(TorchFunctionMode):
    """Whether CPU autocast is on for the torch function running now: a dispatch mode cannot ask
    (the dispatcher has excluded the autocast keys by the time it runs). Outside any torch function
    (the autograd engine's own ops, a backward's recomputation) it answers False.

    It also checks the composite functions CUDA's autocast casts before they decompose into ops
    the dispatch mode sees uncast (softmax, log_softmax, cross_entropy on a bf16 input)."""

    _COMPOSITE = {torch.softmax, torch.log_softmax, torch.nn.functional.softmax, torch.nn.functional.log_softmax,
                  torch.nn.functional.cross_entropy, torch.Tensor.softmax, torch.Tensor.log_softmax}

    def __init__(self) -> None:
        super().__init__()
        self.enabled = False
        self.mismatches: List[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        previous, self.enabled = self.enabled, torch.is_autocast_enabled("cpu")
        try:
            if self.enabled and func in self._COMPOSITE and kwargs.get("dtype") is None and args \
                    and isinstance(args[0], torch.Tensor) and args[0].dtype in _LOW:
                self.refuse(f"{getattr(func, '__name__', func)} on a {str(args[0].dtype).replace('torch.', '')} input")
            return func(*args, **kwargs)
        finally:
            self.enabled = previous

    def refuse(self, what: str) -> None:
        message = (f"referee: {what} under autocast: CUDA's autocast casts it (the CPU's does not), so this "
                   f"CPU step is not what a GPU allocates")
        self.mismatches.append(message)
        raise CudaAutocastMismatch(message)


def check_cuda_autocast(func: Any, args: Any, kwargs: Any, probe: AutocastProbe) -> None:
    """Refuse (probe.refuse) ``func`` run under CPU autocast when CUDA's autocast, not the CPU's,
    casts one of its inputs: a bf16/fp16 input of an fp32 policy (unless a dtype is asked for), an
    fp32 input of a lower-precision one, mixed inputs of a promote one."""
    if not probe.enabled or not _cuda_only_autocast(func):
        return
    base = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)
    floats = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor) and a.is_floating_point()]
    dtypes = {a.dtype for a in floats}
    if base in _CUDA_LOWER_PRECISION:
        hit = torch.float32 in dtypes
    elif base in _CUDA_PROMOTE:
        hit = len(dtypes) > 1
    else:
        schema = getattr(func, "_schema", None)
        names = [a.name for a in schema.arguments] if schema is not None else []
        given = dict(zip(names, args), **kwargs)
        hit = bool(dtypes & set(_LOW)) and given.get("dtype") is None
    if hit:
        probe.refuse(f"{func} on {', '.join(sorted(str(d).replace('torch.', '') for d in dtypes))} inputs")


class StorageRecorder(TorchDispatchMode):
    """Records the allocations and frees of every storage created while it is active.

    Use ``with recorder.tracking(model): ...`` around the whole measured region (it installs
    the module and node hooks), and inside it the recorder itself as a dispatch mode.
    """

    def __init__(self, correct_buffer_sums: bool = True) -> None:
        """``correct_buffer_sums=False`` records InputBuffer sums as they happen under the mode
        (out of place), as every dispatch-mode tracker (MemTracker) sees them."""
        super().__init__()
        self.correct_buffer_sums = correct_buffer_sums
        self.events: List[Event] = []
        self.phase = "forward"
        self.micro_step = 0
        self.recording = True            # False: new storages are ignored (unrecorded micro-steps)
        self.corrected_sums = 0          # InputBuffer sums recorded as in place
        self._live: Dict[int, Tuple[weakref.ref, _Storage]] = {}
        self._all: List[_Storage] = []
        self._modules: Dict[int, str] = {}
        self._param_modules: Dict[int, str] = {}  # parameter id -> its module path (tracking)
        self._stack: List[str] = []
        self._op = "-"
        self._pending: Optional[_PendingSum] = None
        self._closed = False
        self._autocast = AutocastProbe()
        self._depth = 0  # how many times entered and not yet exited

    def __enter__(self) -> "StorageRecorder":
        self._autocast.__enter__()
        try:
            out = super().__enter__()
        except BaseException:
            self._autocast.__exit__(None, None, None)
            raise
        self._depth += 1
        if self._depth == 1:  # (entered again while active: it listens once)
            _resize_listeners.append(self)
        torch.UntypedStorage.resize_ = _recorded_resize
        return out

    def __exit__(self, *exc: Any) -> Any:
        self._depth -= 1
        if self._depth == 0:
            _resize_listeners.remove(self)
        if not _resize_listeners:
            torch.UntypedStorage.resize_ = _RESIZE
        try:
            return super().__exit__(*exc)
        finally:
            self._autocast.__exit__(*exc)

    # ---- context ----------------------------------------------------------------------

    def _module(self) -> str:
        if self._stack:
            return self._stack[-1]
        node = torch._C._current_autograd_node()
        if node is not None:
            module = node.metadata.get(_MODULE_KEY)
            if module is None and hasattr(node, "variable"):
                # An AccumulateGrad node made before tracking began (DDP's Reducer keeps every one
                # from its construction on): its parameter's module, where a node made in the
                # forward would have been tagged.
                module = self._param_modules.get(id(node.variable), "")
            return module or ""
        return ""

    def _phase(self) -> str:
        # Backward formulas run with grad mode off and outside any module; forward code run by a
        # backward (checkpointing's recomputation, a tiled MLP's per-chunk replay) turns grad mode
        # on or runs inside a module's forward (where an autograd Function's forward turns it off).
        if torch._C._current_graph_task_id() != -1 and (torch.is_grad_enabled() or self._stack):
            return "recompute"
        return self.phase

    def _event(self, alloc: bool, s: _Storage, name: str) -> Event:
        module = self._module()
        return Event(alloc, s.tensor, s.nbytes, s.device, self._phase(), layer_of(module), self.micro_step,
                     module or "-", name)

    # ---- hooks --------------------------------------------------------------------------

    class _Tracking:
        def __init__(self, recorder: "StorageRecorder", model: torch.nn.Module) -> None:
            self.r, self.model = recorder, model
            self.handles: List[Any] = []
            self.creation = node_creation_hook(self._tag)

        def _pre(self, module: torch.nn.Module, args: Any) -> None:
            path = self.r._modules.get(id(module))
            if path is not None:
                self.r._stack.append(path)

        def _post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
            path = self.r._modules.get(id(module))
            if path is not None and self.r._stack and self.r._stack[-1] == path:
                self.r._stack.pop()

        def _tag(self, node: Any) -> None:
            meta = node.metadata
            if _MODULE_KEY not in meta:
                meta[_MODULE_KEY] = self.r._module()

        def __enter__(self) -> "StorageRecorder":
            self.r._modules = {id(m): name for name, m in self.model.named_modules() if name}
            self.r._param_modules = {}
            for name, m in self.model.named_modules():
                for p in m.parameters(recurse=False):
                    self.r._param_modules.setdefault(id(p), name)
            self.handles = [register_module_forward_pre_hook(self._pre),
                            register_module_forward_hook(self._post, always_call=True)]
            self.creation.__enter__()
            return self.r

        def __exit__(self, *exc: Any) -> None:
            self.creation.__exit__(*exc)
            for h in self.handles:
                h.remove()
            self.r._stack.clear()

    def tracking(self, model: torch.nn.Module) -> "StorageRecorder._Tracking":
        """Module and autograd-node hooks that give each event its module and layer."""
        return StorageRecorder._Tracking(self, model)

    # ---- storages -----------------------------------------------------------------------

    def register(self, tensors: Iterable[Tuple[str, Optional[torch.Tensor]]], category: str, op: str) -> None:
        """Storages that exist before recording starts (``(name, tensor)`` pairs, the name a module
        path such as ``model.layers.3.mlp.up_proj.weight``): ``init`` allocations in this order."""
        for name, t in tensors:
            if t is None:
                continue
            st = t.untyped_storage()
            if id(st) in self._live or st.nbytes() == 0 or t.device.type == "meta":
                continue
            s = self._track(st, "init", "gpu", category)
            self.events.append(Event(True, s.tensor, s.nbytes, "gpu", "init", layer_of(name), 0, op, name))

    def adopt(self, t: torch.Tensor, name: str) -> None:
        """A storage made while recording was off (an unrecorded micro-step's), tracked from here: its allocation
        is written now, in the current phase, and its free when it goes."""
        st = t.untyped_storage()
        if id(st) in self._live or st.nbytes() == 0:
            return
        self._flush()
        s = self._track(st, self._phase())
        self._write(self._event(True, s, name))

    def _track(self, st: Any, phase: str, device: str = "gpu", category: Optional[str] = None) -> _Storage:
        s = _Storage(len(self._all), st.nbytes(), phase, device, category)
        self._all.append(s)
        key = id(st)

        def died(_ref: Any, key: int = key, s: _Storage = s) -> None:
            self._died(key, s)

        self._live[key] = (weakref.ref(st, died), s)
        return s

    def _died(self, key: int, s: _Storage) -> None:
        if self._closed:
            return
        entry = self._live.get(key)
        if entry is None or entry[1] is not s:
            return
        del self._live[key]
        pending = self._pending
        if pending is not None:
            self._pending = None
            if pending.old is s:
                # The buffer held the last reference: a plain run adds in place. The sum takes
                # over old's tensor id; neither the sum's allocation nor old's free happened.
                self._retarget(pending, s)
                self.corrected_sums += 1
                return
            self._write(pending.event)
        s.freed_phase = self._phase()
        self._write(self._event(False, s, self._op))

    def _resized(self, st: Any, before: int) -> None:
        """``st`` went from ``before`` bytes to its size now (UntypedStorage.resize_): a non-zero
        size is a new allocation, then a tracked storage's old bytes are freed."""
        after = st.nbytes()
        if self._closed or after == before:
            return
        self._flush()
        key = id(st)
        entry = self._live.get(key)
        old = entry[1] if entry is not None and entry[0]() is st else None
        if old is not None:
            del self._live[key]  # (its weak reference's callback finds nothing to free)
        if after > 0 and self.recording:
            s = self._track(st, self._phase(), "host" if _host_depth[0] else "gpu")
            self._write(self._event(True, s, f"resize_ u8[{after}]"))
        if old is not None:
            old.freed_phase = self._phase()
            self._write(self._event(False, old, "resize_"))

    def _retarget(self, pending: _PendingSum, old: _Storage) -> None:
        assert pending.storage.tensor == len(self._all) - 1, "referee: the sum was not the last allocation"
        self._all.pop()
        ref, _ = self._live[pending.key]
        key = pending.key

        def died(_ref: Any, key: int = key, s: _Storage = old) -> None:
            self._died(key, s)

        self._live[key] = (weakref.ref(ref(), died), old)

    def _write(self, e: Event) -> None:
        self.events.append(e)

    def _flush(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._write(pending.event)

    # ---- the dispatch mode ----------------------------------------------------------------

    def _is_buffer_sum(self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bool:
        if func is not _ADD or kwargs or len(args) != 2 or self._stack:
            return False
        a, b = args
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
            return False
        if a._is_view():
            return False  # a view shares its storage with its base: the plain run adds out of place too
        if torch._C._current_graph_task_id() == -1 or torch.is_grad_enabled():
            return False
        node = torch._C._current_autograd_node()
        # A Python Function's backward runs its own code (whose adds are real ones).
        return node is not None and not isinstance(node, torch.autograd.function.BackwardCFunction)

    def __torch_dispatch__(self, func: Any, types: Any, args: Tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self._flush()
        check_cuda_autocast(func, args, kwargs, self._autocast)
        name = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)
        old = None
        if self.correct_buffer_sums and self._is_buffer_sum(func, args, kwargs):
            entry = self._live.get(id(args[0].untyped_storage()))
            old = entry[1] if entry is not None else None
        previous_op, self._op = self._op, name
        copies = self._sdpa_flash_copies(*args[:5]) if func is _SDPA_FLASH_BACKWARD and self.recording else ()
        try:
            out = func(*args, **kwargs)
        finally:
            self._op = previous_op
        if not self.recording:
            return out
        inputs = None
        host = {id(t.untyped_storage()) for t in out[6:8]} if func is _SDPA_FLASH else set()
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            # A DTensor (FSDP2's parameters, their gradients and states) is a wrapper without memory of
            # its own: what it holds is its local tensor's, allocated by the op the wrapper dispatched.
            t = _local(t)
            st = t.untyped_storage()
            if id(st) in host:
                continue  # the RNG seeds: host tensors on a GPU
            entry = self._live.get(id(st))
            if entry is not None and entry[0]() is st:
                if st.nbytes() != entry[1].nbytes:
                    raise RuntimeError(f"referee: {name} resized a tracked storage "
                                       f"({entry[1].nbytes} -> {st.nbytes()} bytes)")
                continue
            if st.nbytes() == 0 or t.device.type == "meta":
                continue  # no memory: a caching allocator hands out nothing for 0 bytes, nor for a meta tensor
            if inputs is None:
                inputs = {id(_local(a).untyped_storage()) for a in tree_flatten((args, kwargs))[0]
                          if isinstance(a, torch.Tensor)}
            if id(st) in inputs:
                continue  # an in-place op on a storage that is not tracked (host memory): no allocation
            if func is _LIFT_FRESH:
                continue  # a constant from Python data (torch.tensor(1.0) in torch.optim): a host scalar
            device = "host" if _host_depth[0] else "gpu"
            s = self._track(st, self._phase(), device)
            e = self._event(True, s, f"{name} {_DTYPES.get(t.dtype, str(t.dtype))}{list(t.shape)}")
            if old is not None:
                self._pending = _PendingSum(id(st), s, old, e)
            else:
                self._write(e)
        if func is _SDPA_FLASH_BACKWARD:
            self._sdpa_flash_scratch(*args[1:4])
            del copies  # _flash_attention_backward's contiguous output and gradient, at its return
        return out

    def _device_scratch(self, shape: Tuple[int, ...], dtype: Any, name: str) -> torch.Tensor:
        """A buffer a kernel allocates that the fake kernel does not: recorded, its free when it dies."""
        t = torch.empty(shape, dtype=dtype)
        s = self._track(t.untyped_storage(), self._phase(), "gpu")
        self._write(self._event(True, s, f"{name} {_DTYPES.get(dtype, str(dtype))}{list(shape)}"))
        return t

    def _sdpa_flash_copies(self, grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           out: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """aten's _flash_attention_backward makes the output's gradient and the output contiguous as
        [B, S, H, D] before mha_bwd: a copy of each that is not (the output of a q that is [B, H, S, D]
        in memory, as Phi-3's joined one)."""
        made = []
        for t, name in ((grad_out, "grad_out_contiguous"), (out, "out_contiguous")):
            if not t.transpose(1, 2).is_contiguous():
                made.append(self._device_scratch(tuple(t.transpose(1, 2).shape), t.dtype, name))
        return tuple(made)

    def _sdpa_flash_scratch(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """mha_bwd's scratch inside aten's FlashAttention-2 backward, after dq, dk, dv (its outputs):
        flash-attn's, as mst_referee.flash._backward allocates it on the [B, S, H, D] views, recorded
        here; the row sums it returns die at its caller's return."""
        softmax_d = flash._backward(None, *(x.transpose(1, 2) for x in (query, key, value)), None, None, None,
                                    empty=self._device_scratch)
        del softmax_d

    # ---- the result ----------------------------------------------------------------------

    def mark(self, tensors: Iterable[torch.Tensor], category: str) -> None:
        """Storages that turned out to be ``category`` (gradients, checkpoints)."""
        for t in tensors:
            if t is None:
                continue
            entry = self._live.get(id(t.untyped_storage()))
            if entry is not None and entry[1].category is None:
                entry[1].category = category

    def close(self) -> None:
        """The step is over: what dies from now on (the model, the optimizer) is not recorded.
        Raises CudaAutocastMismatch if the step met one (even if the code that ran caught it)."""
        self._flush()
        self._closed = True
        if self._autocast.mismatches:
            raise CudaAutocastMismatch(self._autocast.mismatches[0])

    def timeline(self) -> List[Event]:
        """The events with their categories.

        A storage's category is the one it was registered or marked with; otherwise an
        allocation of the forward or recompute phase that was still alive when its phase
        ended is a saved activation (autograd kept it for backward), and everything else
        is transient.
        """
        self._flush()
        for e in self.events:
            s = self._all[e.tensor] if e.tensor < len(self._all) else None
            if s is None:
                raise AssertionError(f"referee: event names unknown tensor {e.tensor}")
            e.category = _category(s)
        return self.events


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local tensor (the memory it holds on this rank); any other tensor itself."""
    local = getattr(t, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else t


def _category(s: _Storage) -> str:
    if s.category is not None:
        return s.category
    if s.device == "host":
        return "offloaded"
    if s.phase in ("forward", "recompute") and s.freed_phase != s.phase:
        return "saved_activation"
    return "transient"
