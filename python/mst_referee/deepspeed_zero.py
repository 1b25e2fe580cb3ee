"""DeepSpeed's ZeRO engine as the trainer: one rank's step at full size on fake tensors, every storage recorded.

A plan for DeepSpeed (``mst-plan emit --format deepspeed``) trains the Hugging Face model (patched by
``mst_hf.apply`` for the plan's mini-sequences and checkpoints) inside DeepSpeed's engine, which owns
what a plain PyTorch step does not have: the flat bf16 parameter buffer, the fp32 master partition,
the gradient buckets, the partition's gradients and the step's copies of them. This module runs that
engine, built from the emitted ``ds_config.json`` as the Hugging Face Trainer hands it over
(``deepspeed.initialize`` with the trainable parameters as one group and the file's optimizer), for
one rank ``rank`` of the plan's ``dp`` ranks, and records its step as the referee records a plain
one (:class:`mst_referee.recorder.StorageRecorder`; the output is a referee measurement,
``mst-measure/1``).

The world is torch's ``fake`` process group (groups exist, collectives move nothing, every shape is
real) on DeepSpeed's CPU accelerator; the tensors are fake (:mod:`mst_referee.fake`). These places
need what fake tensors (or a group that moves no data) do not have, each answered as a GPU run
answers it:

* ``Module.to(device)`` at engine start: the model is already on its device (a fake tensor cannot
  be swapped for itself), so the call returns the module;
* the multi-tensor Adam kernel (``deepspeed.ops.adam.FusedAdam``'s ``multi_tensor_applier``), which
  updates parameters and states in place on a GPU and allocates nothing, does nothing here (its CPU
  build reads data pointers);
* a tensor's value read back to Python (``.item()``: the bf16 overflow flag, the finiteness of the
  gradient norm) is 0, which is what real bf16 gradients give (no overflow, a finite norm);
* ZeRO-3's check that every rank traced the same modules and parameters (once, when the trace is
  complete) finds them equal, as ranks of one program do (:func:`_same_on_every_rank`).

What exists before the recorded step (after one warm-up step, so the optimizer's states exist and,
under ZeRO-3, the trace is complete: the steady step) is registered as ``init``: the bf16 buffers
(weights), the model's buffers, the fp32 partitions (master weights), the optimizer's states,
ZeRO-3's gradient buffers, then whatever else DeepSpeed keeps alive between steps (found by walking
the garbage collector's objects), as workspace. ZeRO-3's gathered parameters are recorded as
weights.

Recorded are micro-steps 0 and the last (as micro-step 1), then the optimizer step: ZeRO-1 reduces
the gradients in the last micro-step's backward only, so the second does not stand for the others.

ZeRO stages 1, 2 and 3 with AdamW run here, without offload or sequence parallelism: Ulysses (its
attention and process groups) and DeepSpeed's CPU Adam (it reads data pointers) are refused by name,
as is a file that is not the plan's (batch keys, stage, precision flags, optimizer, ZeRO 1/2's
``reduce_bucket_size`` and ``overlap_comm``). What DeepSpeed itself refuses is said in one line.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import sys
import time
from typing import Any, Dict, Iterator, List, Mapping, Tuple

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks its accelerator on import

from .jobs import SETUP_DEFAULTS, CrosscheckError, Job, fail, integral

DEEPSPEED_BUCKET = SETUP_DEFAULTS["reduce_bucket_size"]  # DeepSpeed's default (deepspeed/runtime/zero/config.py)
# ZeRO-3's options a plan names (its setup's keys: DeepSpeed's defaults) and those it runs at their defaults.
ZERO3_DEFAULTS = {"param_persistence_threshold": 100_000, "prefetch_bucket_size": 50_000_000}
ZERO3_FIXED = {"max_live_parameters": 1_000_000_000, "max_reuse_distance": 1_000_000_000}

# The values the Hugging Face Trainer writes over "auto" in the optimizer block (its defaults).
TRAINER_AUTO = {"lr": 5e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}


def fill_auto(ds_config: Mapping[str, Any], setup: Mapping[str, Any]) -> Dict[str, Any]:
    """``ds_config`` as the Trainer hands it to DeepSpeed: "auto" values filled (the batch keys from
    the plan, the optimizer's from the Trainer's defaults), mst-plan's notes dropped."""
    out = {k: copy.deepcopy(v) for k, v in ds_config.items() if k != "mst_plan_notes"}
    for key, value in (("train_micro_batch_size_per_gpu", setup["micro_batch"]),
                       ("gradient_accumulation_steps", setup["grad_accum"])):
        if out.get(key, "auto") == "auto":
            out[key] = value
    if out.get("gradient_clipping") == "auto":
        out["gradient_clipping"] = 1.0
    params = out.get("optimizer", {}).get("params", {})
    for key, value in TRAINER_AUTO.items():
        if params.get(key) == "auto":
            params[key] = value
    return out


def _integer(setup: Mapping[str, Any], key: str, low: int, where: str) -> int:
    value = setup.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        fail(where, f"setup.{key}", f"expected an integer >= {low}, got {value!r}")
    return value


def check_plan(plan: Any, where: str) -> Dict[str, Any]:
    """The plan's setup, checked for what this runner runs: data parallelism with ZeRO 1, 2 or 3 in bf16
    (DeepSpeed's bf16 with fp32 master weights, or its bf16 master flags for pure-bf16), AdamW, one
    sequence-parallel rank."""
    if not isinstance(plan, dict) or not isinstance(plan.get("setup"), dict):
        fail(where, "setup", "expected an mst-plan plan (an object with a setup object: recommend --out)")
    setup = plan["setup"]
    for key, low in (("dp", 1), ("micro_batch", 1), ("grad_accum", 1), ("zero_stage", 0)):
        _integer(setup, key, low, where)
    if setup["zero_stage"] not in (1, 2, 3):
        fail(where, "setup.zero_stage", f"expected 1, 2 or 3 (DeepSpeed's ZeRO engine), got {setup['zero_stage']}")
    bucket = integral(setup.get("reduce_bucket_size"))  # (as mst-plan's parse_setup reads it: null is the default)
    bucket = DEEPSPEED_BUCKET if bucket is None else bucket
    if isinstance(bucket, bool) or not isinstance(bucket, int) or not 1 <= bucket <= 1 << 40:
        fail(where, "setup.reduce_bucket_size", f"expected an integer in [1, {1 << 40}], got {json.dumps(bucket)}")
    zero3 = {}
    for key, default in ZERO3_DEFAULTS.items():  # (mst-plan writes them for ZeRO-3 only; absent, DeepSpeed's defaults)
        value = integral(setup.get(key))
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1 << 40:
            fail(where, f"setup.{key}", f"expected an integer in [0, {1 << 40}], got {json.dumps(value)}")
        if value != default and setup["zero_stage"] != 3:
            fail(where, f"setup.{key}", f"expected DeepSpeed's default {default} unless ZeRO-3 runs, got {value}")
        zero3[key] = value
    overlap = False if setup.get("overlap_comm") is None else setup["overlap_comm"]
    if not isinstance(overlap, bool) or (overlap and setup["zero_stage"] == 3):
        fail(where, "setup.overlap_comm", f"expected true or false (false under ZeRO-3: mst-plan plans the overlap_comm of "
                                          f"ZeRO 1/2 only), got {json.dumps(setup.get('overlap_comm'))}")
    setup = dict(setup, reduce_bucket_size=bucket, overlap_comm=overlap, **zero3)
    if setup.get("sp", 1) != 1:
        fail(where, "setup.sp", f"expected 1 (DeepSpeed's Ulysses is not run here), got {setup.get('sp')!r}")
    if setup.get("precision") not in ("bf16-master", "pure-bf16"):
        fail(where, "setup.precision", f"expected bf16-master or pure-bf16 (DeepSpeed's bf16), got {setup.get('precision')!r}")
    if setup.get("optimizer", "adamw") != "adamw":
        fail(where, "setup.optimizer", f"expected adamw (DeepSpeed's FusedAdam), got {setup.get('optimizer')!r}")
    return setup


def check_config(ds_config: Any, setup: Mapping[str, Any], where: str) -> None:
    """The file is the plan's, as ``mst-plan emit --format deepspeed`` writes it for this setup."""
    def block(key: str) -> Dict[str, Any]:
        value = ds_config.get(key, {})
        if not isinstance(value, dict):
            fail(where, key, f"expected an object, got {value!r}")
        return value

    if not isinstance(ds_config, dict):
        fail(where, "", "expected a JSON object (a ds_config.json: mst-plan emit --format deepspeed)")
    zero, bf16, optimizer = block("zero_optimization"), block("bf16"), block("optimizer")
    if zero.get("stage") != setup["zero_stage"]:
        fail(where, "zero_optimization.stage", f"expected the plan's zero_stage {setup['zero_stage']}, got {zero.get('stage')!r}")
    for key in ("offload_optimizer", "offload_param"):
        offload = zero.get(key, {})
        if not isinstance(offload, dict) or offload.get("device", "none") != "none":
            fail(where, f"zero_optimization.{key}", f"expected none (DeepSpeed's CPU Adam is not run here), got {offload!r}")
    if bf16.get("enabled") is not True:
        fail(where, "bf16.enabled", f"expected true (the plan trains in bf16), got {bf16.get('enabled')!r}")
    master_flag = bf16.get("bf16_master_weights_and_grads", False) is True
    if master_flag != (setup["precision"] == "pure-bf16"):
        fail(where, "bf16.bf16_master_weights_and_grads",
             f"expected {str(setup['precision'] == 'pure-bf16').lower()} for the plan's precision {setup['precision']}")
    if str(optimizer.get("type", "")).lower() not in ("adamw", "adam"):
        fail(where, "optimizer.type", f"expected AdamW (the plan's adamw, DeepSpeed's FusedAdam), got {optimizer.get('type')!r}")
    # The bucket is the plan's (reduce_bucket_size; absent, DeepSpeed's default, the plan's default), and so are
    # ZeRO-3's gathering options (stage3_*; absent, DeepSpeed's defaults: the plan's when it names none).
    options = {"reduce_bucket_size": ("reduce_bucket_size", DEEPSPEED_BUCKET)}
    if setup["zero_stage"] == 3:
        options.update({f"stage3_{key}": (key, default) for key, default in ZERO3_DEFAULTS.items()})
        options.update({f"stage3_{key}": (None, default) for key, default in ZERO3_FIXED.items()})
    for key, (plan_key, default) in options.items():
        planned = setup.get(plan_key, default) if plan_key else default
        value = zero.get(key, default)
        if isinstance(value, bool) or value != planned:
            got = json.dumps(value) if key in zero else f"none (DeepSpeed's default {default})"
            fail(where, f"zero_optimization.{key}",
                 f"expected the plan's {plan_key or key.removeprefix('stage3_')} {planned} (elements), got {got}")
    overlap = zero.get("overlap_comm", False)  # (DeepSpeed's default for ZeRO 1/2; None is that default too)
    if setup["zero_stage"] in (1, 2) and (False if overlap is None else overlap) is not setup.get("overlap_comm", False):
        got = json.dumps(overlap) if "overlap_comm" in zero else "none (DeepSpeed's default false)"
        fail(where, "zero_optimization.overlap_comm", f"expected the plan's overlap_comm {json.dumps(setup.get('overlap_comm', False))}, "
                                                      f"got {got}")
    if ds_config.get("sequence_parallel_size", 1) != 1:
        fail(where, "sequence_parallel_size", f"expected 1 (the plan's sp), got {ds_config.get('sequence_parallel_size')!r}")
    expected = {"train_micro_batch_size_per_gpu": setup["micro_batch"], "gradient_accumulation_steps": setup["grad_accum"],
                "train_batch_size": setup["micro_batch"] * setup["grad_accum"] * setup["dp"]}
    for key, value in expected.items():
        if ds_config.get(key, "auto") not in ("auto", value):
            fail(where, key, f"expected {value} (the plan's), got {ds_config[key]!r}")


def _same_on_every_rank(ints: List[int]) -> None:
    """ZeRO-3's cross-rank check of a list (``deepspeed.runtime.zero.utils.assert_ints_same_as_other_ranks``)
    as every rank of one program passes it: the same tensors made and broadcast (rank 0's length, then
    its list), and this rank's own list found equal to rank 0's. (The fake group moves no data: the
    original would read back another rank's -1s.)"""
    import deepspeed.comm as dist
    import torch
    from deepspeed.accelerator import get_accelerator

    device = torch.device(get_accelerator().device_name(os.environ["LOCAL_RANK"]))
    dist.broadcast(torch.tensor(len(ints), dtype=int, device=device, requires_grad=False), src=0, async_op=False)
    dist.broadcast(torch.tensor(ints, dtype=int, device=device, requires_grad=False), src=0, async_op=False)


@contextlib.contextmanager
def stand_ins(fake: bool = True) -> Iterator[None]:
    """The answers of the module docstring, for the duration of the run: all of them on fake tensors;
    on real ones (``fake=False``, the tests' CPU run) the Adam kernel's, which reads data pointers of
    the CPU build, not of the GPU's, and ZeRO-3's cross-rank list check. ZeRO-3's replacement of
    ``torch.nn.functional.linear`` (made for good when it partitions a model) is undone after."""
    import deepspeed.ops.adam.fused_adam as fused_adam
    import deepspeed.runtime.zero.partitioned_param_coordinator as coordinator
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Values(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Tuple[Any, ...] = (), kwargs: Any = None) -> Any:
            if func is torch.ops.aten._local_scalar_dense.default:
                return False if args[0].dtype == torch.bool else 0
            return func(*args, **(kwargs or {}))

    def already_there(module: Any, *args: Any, **kwargs: Any) -> Any:
        return module

    saved = (torch.nn.Module.to, fused_adam.multi_tensor_applier, coordinator.assert_ints_same_as_other_ranks,
             torch.nn.functional.linear)
    if fake:
        torch.nn.Module.to = already_there  # type: ignore[method-assign]
    fused_adam.multi_tensor_applier = lambda *args, **kwargs: None
    coordinator.assert_ints_same_as_other_ranks = _same_on_every_rank
    try:
        with _Values() if fake else contextlib.nullcontext():
            yield
    finally:
        (torch.nn.Module.to, fused_adam.multi_tensor_applier, coordinator.assert_ints_same_as_other_ranks,  # type: ignore[method-assign]
         torch.nn.functional.linear) = saved


def fake_world(size: int, rank: int = 0, local_world_size: int = 1) -> None:
    """A new default process group of ``size`` ranks on torch's ``fake`` backend (this process is rank
    ``rank``) that deepspeed.comm uses, with every group of an earlier run released (DeepSpeed's own
    teardown). DeepSpeed's shared-memory collective (a C++ op it builds on first use, which waits for
    its peers on one host) is not built: the fake group moves no data."""
    import importlib

    import deepspeed.comm
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        deepspeed.comm.destroy_process_group()
        if dist.is_initialized():
            dist.destroy_process_group()
    os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(size), LOCAL_WORLD_SIZE=str(local_world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=size)
    ds_torch = importlib.import_module("deepspeed.comm.torch")  # (deepspeed.comm.torch, the attribute, is torch)
    saved = ds_torch.build_shm_op
    ds_torch.build_shm_op = lambda: None
    try:
        deepspeed.comm.init_distributed(dist_backend="fake", auto_mpi_discovery=False, verbose=False)
    finally:
        ds_torch.build_shm_op = saved
    if deepspeed.comm.get_world_size() != size:
        raise RuntimeError(f"deepspeed.comm sees {deepspeed.comm.get_world_size()} ranks, expected {size}")


def _live_tensors(fake_mode: Any) -> Iterator[Any]:
    """The tensors of this run (those of ``fake_mode``, or the real ones when it is None) that
    Python objects hold."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    gc.collect()  # (what is only garbage is not held)
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
            if (obj.fake_mode is fake_mode) if isinstance(obj, FakeTensor) else fake_mode is None:
                yield obj


def _stage(optimizer: Any) -> int:
    """The ZeRO stage of DeepSpeed's optimizer wrapper."""
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):
        return 3
    return 2 if optimizer.partition_gradients else 1


def _fp32_partitions(optimizer: Any) -> List[Any]:
    """The fp32 master partitions, one per group (ZeRO 1/2) or sub-group (ZeRO-3)."""
    return optimizer.fp32_partitioned_groups_flat if _stage(optimizer) == 3 else optimizer.single_partition_of_fp32_groups


def _register_state(recorder: Any, model: Any, optimizer: Any, fake_mode: Any) -> None:
    """Everything alive before the step, as its init allocations (named by what holds them).

    ZeRO 1/2: the flat bf16 buffers of whole parameters. ZeRO-3: the partitions' bf16 buffer
    (``lp_param_buffer``), the whole parameters that stay gathered between steps (persistent ones:
    their ``data``), the gradient buckets (made once, with contiguous gradients) and the partitions'
    gradient buffer (``grad_partitions_flat_buffer``), which are gradients as ``.grad`` is in a plain
    step."""
    import torch

    from .referee import tensor_attributes

    if _stage(optimizer) == 3:
        recorder.register([("lp_param_buffer", getattr(optimizer, "lp_param_buffer", None))], "weights", "init.weights")
        recorder.register(((f"fp16_partition_group{i}", t) for i, t in enumerate(optimizer.fp16_partitioned_groups_flat)),
                          "weights", "init.weights")  # (views of lp_param_buffer: registered once)
        recorder.register(((f"{name}.ds_tensor", p.ds_tensor) for name, p in model.named_parameters()),
                          "weights", "init.weights")
        recorder.register(((name, p.data) for name, p in model.named_parameters()), "weights", "init.weights")
        recorder.register(((f"ipg_bucket.{dtype}", bucket.buffer) for dtype, bucket in optimizer.ipg_buckets.items()),
                          "gradients", "init.gradients")
        recorder.register([("grad_partitions_flat_buffer", optimizer.grad_partitions_flat_buffer)], "gradients",
                          "init.gradients")
    else:
        recorder.register(((f"flat_bf16_group{i}", t) for i, t in enumerate(optimizer.bit16_groups_flat)),
                          "weights", "init.weights")
        recorder.register(model.named_parameters(), "weights", "init.weights")  # (any outside the flat groups)
    recorder.register(model.named_buffers(), "weights", "init.buffers")
    recorder.register(tensor_attributes(model), "weights", "init.buffers")  # (longrope's long_inv_freq)
    recorder.register(((f"fp32_partition_group{i}", t) for i, t in enumerate(_fp32_partitions(optimizer))),
                      "master_weights", "init.master_weights")
    # (by the partitions: ZeRO-3 empties the groups' parameter lists after each sub-group's step)
    inner = optimizer.optimizer
    recorder.register(((f"fp32_partition_group{i}.{key}", value)
                       for i, t in enumerate(_fp32_partitions(optimizer))
                       for key, value in inner.state.get(t, {}).items() if isinstance(value, torch.Tensor)),
                      "optimizer_state", "init.optimizer_state")
    recorder.register((("deepspeed", t) for t in _live_tensors(fake_mode)), "workspace",
                      "init.deepspeed")


def _mark_gradients(marking: Dict[str, Any], optimizer: Any) -> None:
    """DeepSpeed's gradient memory is recorded as gradients, as autograd's ``.grad`` is in a plain
    step: its buckets (made as each backward starts, ``setup_buckets``), the partition's gradients
    (``grads_in_partition``, made at the first copy into it) and the fp32 gradient of the partition
    (set just before the optimizer steps it)."""
    def after(method: Any, tensors: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            out = method(*args, **kwargs)
            if marking["recorder"] is not None:
                marking["recorder"].mark(tensors(), "gradients")
            return out
        return wrapped

    def before(method: Any, tensors: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if marking["recorder"] is not None:
                marking["recorder"].mark(tensors(), "gradients")
            return method(*args, **kwargs)
        return wrapped

    if _stage(optimizer) != 3:  # (ZeRO-3's buckets and partition gradients are made once: registered state)
        optimizer.setup_buckets = after(optimizer.setup_buckets, lambda: [
            b for bucket in optimizer.ipg_buckets.values() for b in bucket.buffer])
        optimizer.copy_grads_in_partition = after(optimizer.copy_grads_in_partition,
                                                  lambda: [getattr(optimizer, "grads_in_partition", None)])
    optimizer._optimizer_step = before(optimizer._optimizer_step, lambda: [
        t.grad for t in _fp32_partitions(optimizer)])


@contextlib.contextmanager
def _marking_gathers(marking: Dict[str, Any]) -> Iterator[None]:
    """ZeRO-3's gathered parameters are recorded as weights, as a gathered unit is in mst-plan's
    kernels runtime: a coalesced gather's flat buffer (made with its handle), each parameter's own copy
    of its rows of it (made at the handle's wait), and a parameter gathered alone (its buffer made
    before its handle; ``param.data`` a view of it)."""
    from deepspeed.runtime.zero import partition_parameters as pp

    def mark(tensors: Any) -> None:
        if marking["recorder"] is not None:
            marking["recorder"].mark(tensors, "weights")

    coalesced_init, coalesced_wait, single_init = (pp.AllGatherCoalescedHandle.__init__, pp.AllGatherCoalescedHandle.wait,
                                                   pp.AllGatherHandle.__init__)

    def made_coalesced(self: Any, allgather_handle: Any, params: Any, partitions: Any, *args: Any, **kwargs: Any) -> None:
        coalesced_init(self, allgather_handle, params, partitions, *args, **kwargs)
        mark(partitions[:1])

    def waited(self: Any, *args: Any, **kwargs: Any) -> None:
        coalesced_wait(self, *args, **kwargs)
        mark([p.data for p in self.params])

    def made_single(self: Any, handle: Any, param: Any, *args: Any, **kwargs: Any) -> None:
        single_init(self, handle, param, *args, **kwargs)
        mark([param.data])

    pp.AllGatherCoalescedHandle.__init__, pp.AllGatherCoalescedHandle.wait = made_coalesced, waited  # type: ignore[method-assign]
    pp.AllGatherHandle.__init__ = made_single  # type: ignore[method-assign]
    try:
        yield
    finally:
        pp.AllGatherCoalescedHandle.__init__, pp.AllGatherCoalescedHandle.wait = coalesced_init, coalesced_wait  # type: ignore[method-assign]
        pp.AllGatherHandle.__init__ = single_init  # type: ignore[method-assign]


def deepspeed_step(job: Job, ds_config: Mapping[str, Any], rank: int = 0, where: str = "ds_config",
                   device: str = "fake") -> Dict[str, Any]:
    """Run the job's model in DeepSpeed's engine (``ds_config`` as emitted for the job's plan) as rank
    ``rank``; record one optimizer step after one warm-up step. Returns the events and facts.
    ``device``: "fake" (full size) or "cpu" (real tensors: small models, the stand-ins' test)."""
    import deepspeed
    import mst_hf
    import torch

    from . import flash
    from .fake import session
    from .recorder import StorageRecorder, cuda_autocast_policies
    from .referee import mark_checkpoints, mark_gradient, patched_model
    from .train import step_batches

    setup = job.setup
    check_config(ds_config, setup, where)
    world = setup["dp"]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        fail("command line", "rank", f"expected 0 to {world - 1} (the plan's data-parallel ranks), got {rank!r}")
    if device not in ("fake", "cpu"):
        fail("command line", "device", f"expected fake or cpu, got {device!r}")
    t0 = time.monotonic()
    config = fill_auto(ds_config, setup)
    # mst_hf applies the mini-sequences and checkpoints; DeepSpeed owns bf16's fp32 master weights. It is
    # told the ranks and the stage, as the emitted hf-mst config tells it (ZeRO-3 moves the chunked loss
    # into lm_head's forward).
    cfg = mst_hf.load_config(dict(job.mst_config, precision="pure-bf16", data_parallel=world,
                                  zero_stage=setup["zero_stage"]))
    os.environ["LOCAL_SIZE"] = "1"  # (one process on this host, whatever a launcher around it said)
    fake_world(world, rank)
    # (on real tensors, only the FlashAttention-2 stand-in of the fake session: no GPU kernel here)
    marking: Dict[str, Any] = {"recorder": None}
    with session() if device == "fake" else flash.stand_in() as fake_mode, cuda_autocast_policies(), \
            stand_ins(device == "fake"), _marking_gathers(marking):
        model, attn = patched_model(job, cfg)
        # autograd's gradient is a gradient until DeepSpeed copies it into its bucket (this hook is
        # registered first, so it runs before DeepSpeed's own)
        for p in model.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(mark_gradient(marking))
        try:
            engine, optimizer, _, _ = deepspeed.initialize(
                model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config)
        except Exception as e:  # DeepSpeed's own refusal of the file (its config model, its batch arithmetic)
            fail(where, "deepspeed", f"DeepSpeed {deepspeed.__version__} refused it: {type(e).__name__}: "
                                     + " ".join(str(e).split())[:300])
        _mark_gradients(marking, optimizer)
        if _stage(optimizer) == 3:  # the persistent parameters gathered again after the step: weights
            post_step = optimizer._post_step

            def gathered_again(*args: Any, **kwargs: Any) -> Any:
                out = post_step(*args, **kwargs)
                if marking["recorder"] is not None:
                    marking["recorder"].mark([p.data for p in optimizer.persistent_parameters], "weights")
                return out
            optimizer._post_step = gathered_again
        next_step = step_batches(job)

        def train(batch_list: List[Any], observe: Any) -> None:
            for micro, batch in enumerate(batch_list):
                observe("forward", micro)
                ids, labels = batch.clone(), batch.clone()  # (the host batch's copies on the device)
                loss = engine(input_ids=ids, labels=labels, use_cache=False).loss
                observe("backward", micro)
                engine.backward(loss)
                del loss, ids, labels
                observe("optimizer" if micro == len(batch_list) - 1 else "backward", micro)
                engine.step()  # (before the last micro-step, DeepSpeed's bookkeeping only)

        train(next_step(), lambda phase, micro: None)  # warm-up: the optimizer's states are created
        recorder = StorageRecorder()
        _register_state(recorder, model, optimizer, fake_mode if device == "fake" else None)

        # Micro-steps 0 and the last (as 1): ZeRO-1 reduces the gradients in the last one's backward only,
        # so unlike a plain step's the second does not stand for the others.
        last = setup["grad_accum"] - 1

        def observe(phase: str, micro: int) -> None:
            recorder.recording = micro in (0, last)
            recorder.micro_step = min(micro, 1)
            recorder.phase = phase
        batches = next_step()  # host memory: made before recording starts
        marking["recorder"] = recorder
        hooks = mark_checkpoints(recorder, model, cfg)
        try:
            with recorder.tracking(model), recorder:
                train(batches, observe)
            recorder.close()
        finally:
            for h in hooks:
                h.remove()
        events = recorder.timeline()
        info = {"zero_stage": _stage(optimizer),
                "partition_numel": [int(t.numel()) for t in _fp32_partitions(optimizer)],
                "reduce_bucket_size": int(optimizer.reduce_bucket_size),
                "overlap_comm": bool(engine.zero_overlap_comm()),
                "contiguous_gradients": bool(optimizer.contiguous_gradients)}
        if info["zero_stage"] == 3:
            info.update(prefetch_bucket_size=int(engine.zero_prefetch_bucket_size()),
                        max_live_parameters=int(engine.zero_max_live_parameters()),
                        max_reuse_distance=int(engine.zero_max_reuse_distance()),
                        param_persistence_threshold=int(engine.zero_param_persistence_threshold()))
        del engine, optimizer, model
    return {"events": [e.to_list() for e in events], "attn_implementation": attn, "rank": rank, "world": world,
            "deepspeed": deepspeed.__version__, "torch": torch.__version__, "engine": info,
            "seconds": time.monotonic() - t0, "micro_steps": setup["grad_accum"],
            "micro_steps_recorded": min(setup["grad_accum"], 2)}


def job_for_deepspeed(plan: Any, where: str = "plan") -> Job:
    """The referee's job for a DeepSpeed plan: the model and mst_hf's patches as for one GPU (the
    data-parallel and ZeRO knobs are DeepSpeed's here), the plan's setup recorded as it is."""
    from .jobs import make_job

    setup = dict(check_plan(plan, where), runtime="hf")  # (Hugging Face's model code, whichever runtime planned it)
    # (DeepSpeed's engine keeps the optimizer states as its masters; the one-GPU job's are its bf16 tensors')
    single = dict(setup, dp=1, zero_stage=0, precision="pure-bf16", optimizer_state_dtype="bf16",
                  reduce_bucket_size=DEEPSPEED_BUCKET, overlap_comm=False, **ZERO3_DEFAULTS)
    job = make_job(None, plan=dict(plan, setup=single), plan_where=where, convert="python")
    job.setup = setup
    return job


def measurement_file(job: Job, result: Mapping[str, Any]) -> Dict[str, Any]:
    """The recorded step as the referee's measurements are written (``mst-measure/1``, backend
    referee: what ``mst-plan compare --run`` re-simulates), DeepSpeed's facts among its notes."""
    from pathlib import Path

    from .referee import summarize_events, timeline

    engine = result["engine"]
    summary = dict(summarize_events(result["events"]), seconds=result["seconds"], device="fake",
                   attn_implementation=result["attn_implementation"], layers=job.layers, events=len(result["events"]),
                   torch=result["torch"], deepspeed=result["deepspeed"])
    notes = [f"trainer: DeepSpeed {result['deepspeed']} ZeRO-{engine['zero_stage']} engine, rank {result['rank']} of "
             f"{result['world']} (torch's fake process group, DeepSpeed's CPU accelerator, fake tensors)",
             f"deepspeed: partition {engine['partition_numel']} elements, reduce_bucket_size {engine['reduce_bucket_size']}, "
             f"overlap_comm {engine['overlap_comm']}, contiguous_gradients {engine['contiguous_gradients']}"]
    return {"format": "mst-measure/1", "backend": "referee", "model": Path(job.model_path).stem,
            "model_path": job.model_path, "seed": job.seed, "workspace_bytes": 0, "setup": job.setup,
            "timeline": dict(timeline(job.model_path, result), rank=result["rank"]), "summary": summary, "run": job.name, "notes": notes}


def main(argv: Any = None) -> int:
    import argparse
    from pathlib import Path

    from .jobs import read_json
    from .records import write_record

    p = argparse.ArgumentParser(prog="python -m mst_referee.deepspeed_zero", description=__doc__.splitlines()[0])
    p.add_argument("plan", type=Path, help="an mst-plan plan (recommend/estimate --out)")
    p.add_argument("ds_config", type=Path, help="the ds_config.json emitted for it (mst-plan emit --format deepspeed)")
    p.add_argument("--rank", type=int, default=0, help="which of the plan's data-parallel ranks (default 0)")
    p.add_argument("--out", type=Path, required=True, help="the recorded step (mst-measure/1, backend referee: mst-plan compare --run reads it)")
    args = p.parse_args(argv)
    try:
        plan = read_json(args.plan, "the plan")
        job = job_for_deepspeed(plan, str(args.plan))
        result = deepspeed_step(job, read_json(args.ds_config, "the DeepSpeed config"), args.rank, str(args.ds_config))
    except CrosscheckError as e:
        print(f"error: {e}")
        return 2
    return write_record(args.out, measurement_file(job, result), result)


if __name__ == "__main__":
    if os.environ.get("PYTHONHASHSEED") != "0":  # Gemma-3's rotary tables: the set order mst-plan models
        os.execve(sys.executable, [sys.executable, "-m", "mst_referee.deepspeed_zero", *sys.argv[1:]],
                  {**os.environ, "PYTHONHASHSEED": "0"})
    raise SystemExit(main())
