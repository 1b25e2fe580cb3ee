"""torchtitan 0.3.0 as the trainer: one rank's step of an emitted ``mst_torchtitan.py``, every storage recorded.

A plan for torchtitan (``mst-plan emit --format torchtitan``) becomes a config module that torchtitan's
``ConfigManager`` loads (``--module mst_torchtitan --config mst_plan``). This module loads it the same
way, builds what torchtitan's ``Trainer.__init__`` builds from it (the model config fitted to the run by
``update_from_config``, the model on the meta device in the training dtype, the model's
``parallelize_fn``: full activation checkpointing and ``fully_shard`` over the data-parallel mesh, which
torchtitan applies on one GPU too; the weights materialized and the buffers initialized by the model's
own ``init_weights``; the loss, with ``ChunkedLossWrapper`` taking the LM head; the optimizers and the
LR schedulers), and runs ``Trainer.train_step``'s body: zero the gradients, per micro-batch copy
the batch (tokens, labels, positions) to the device, build the attention masks, forward, loss and
backward; then clip the gradients' norm (``max_norm``, foreach) and step. It records one optimizer step
after one warm-up step (the optimizer's states exist then) as the referee records a plain one
(:class:`mst_referee.recorder.StorageRecorder`), and writes a referee measurement (``mst-measure/1``)
that ``mst-plan compare --run`` re-simulates with the plan's setup.

The world is torch's ``fake`` process group of the plan's ranks (this rank's shards have their real
shapes, collectives move nothing); the tensors are fake (:mod:`mst_referee.fake`), on the CPU, where
torchtitan's device mesh is built. Where the CPU would run another code path than a GPU, a stand-in
allocates what the GPU's does (:mod:`mst_referee.titan_kernels`: the fused RMSNorm, compiled flex
attention and block masks). These places need values fake tensors do not have, and are answered as a
run answers them:

* weight initialization (``_init_self_parameters``: truncated normal draws) is skipped: it writes
  values into the materialized weights and allocates nothing that outlives it; the buffers (the RoPE
  tables) are initialized by torchtitan's own code;
* the batch is one document per sequence (positions 0 .. S-1, labels all valid), as a run on long
  documents sees it.

What exists before the recorded step is registered as ``init``: this rank's parameter shards
(weights), the model's buffers (weights), the optimizer's states (their shards). FSDP2's buffers are
marked as it makes them (:class:`mst_referee.fsdp2.Fsdp2`), each checkpointed block's input as a
checkpoint.

Recorded are the first two micro-steps (the second stands for the others) and the optimizer step.
Refused by name: torchtitan's transformers backend (an experiment, which other models than its own
run through), data-parallel replication (DDP), tensor, pipeline, context and expert parallelism, and
compile (none of which mst-plan emits), CPU offload and CUDA graphs.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Tuple

from .jobs import CrosscheckError, check_plan, checkpoint_layers_from_spec, fail, resolve_model
from .step import Observer, to_device

MODULE, FUNCTION = "mst_torchtitan", "mst_plan"
IGNORE_INDEX = -100  # torchtitan.components.loss.IGNORE_INDEX


def load_config(module_dir: Path) -> Any:
    """torchtitan's ``ConfigManager`` on the emitted module, as ``torchrun -m torchtitan.train --module
    mst_torchtitan --config mst_plan`` reads it from ``module_dir``."""
    from torchtitan.config import ConfigManager

    if not (module_dir / f"{MODULE}.py").is_file():
        fail(str(module_dir), MODULE, f"expected {MODULE}.py (mst-plan emit --format torchtitan --out {module_dir})")
    for name in [m for m in sys.modules if m == MODULE or m.startswith(MODULE + ".")]:
        del sys.modules[name]  # a previous plan's module of the same name
    sys.path.insert(0, str(module_dir))
    try:
        return ConfigManager().parse_args(["--module", MODULE, "--config", FUNCTION])
    except Exception as e:  # (torchtitan's own refusal of the module, in one line)
        fail(str(module_dir / f"{MODULE}.py"), FUNCTION, f"a config torchtitan loads; it raised {type(e).__name__}: {e}")
    finally:
        sys.path.remove(str(module_dir))


def check_config(config: Any, setup: Mapping[str, Any], gpus: int, where: str) -> None:
    """The layouts this referee runs, and the file is the plan's (its batch, ranks and checkpoints)."""
    from torchtitan.distributed.activation_checkpoint import FullAC

    par, training = config.parallelism, config.training
    if config.model_spec.name == "transformers_modeling_backend":
        fail(where, "model_spec", "one of torchtitan's own models (the referee does not run its transformers backend, "
             f"an experiment), got {config.hf_model}")
    for field_name, degree in (("data_parallel_replicate_degree", par.data_parallel_replicate_degree),
                               ("tensor_parallel_degree", par.tensor_parallel_degree),
                               ("pipeline_parallel_degree", par.pipeline_parallel_degree),
                               ("context_parallel_degree", par.context_parallel_degree),
                               ("expert_parallel_degree", par.expert_parallel_degree)):
        if degree != 1:
            fail(where, f"parallelism.{field_name}", f"expected 1 (the referee runs FSDP2 alone), got {degree}")
    for field_name, on in (("compile.enable", config.compile.enable), ("training.enable_cpu_offload", training.enable_cpu_offload),
                           ("training.disable_cuda_graphs", not training.disable_cuda_graphs)):
        if on:
            fail(where, field_name, "expected eager PyTorch without CPU offload or CUDA graphs, as mst-plan emits it")
    shard, dp = par.data_parallel_shard_degree, setup.get("dp", 1)
    if shard not in (-1, gpus) or gpus != dp:
        fail(where, "parallelism.data_parallel_shard_degree",
             f"expected the plan's {dp} data-parallel ranks on its {gpus} GPUs, got {shard}")
    micro_batch = setup.get("micro_batch", 1)
    want = {"training.seq_len": (training.seq_len, setup.get("seq_len")),
            "training.local_batch_size": (training.local_batch_size, micro_batch),
            "training.global_batch_size": (training.global_batch_size, micro_batch * dp * setup.get("grad_accum", 1))}
    for field_name, (got, expected) in want.items():
        if got != expected:
            fail(where, field_name, f"expected the plan's {expected}, got {got}")
    layers = len(config.model_spec.model.layers)
    checkpointed = len(checkpoint_layers_from_spec(setup.get("checkpoint", []), layers))
    ac = config.activation_checkpoint
    if not ((isinstance(ac, FullAC.Config) and checkpointed == layers) or (ac is None and checkpointed == 0)):
        fail(where, "activation_checkpoint", f"expected the plan's {checkpointed} of {layers} layers checkpointed "
             f"(FullAC or None), got {type(ac).__name__}")


@contextlib.contextmanager
def _cpu_mesh() -> Iterator[None]:
    """torchtitan builds its device mesh on its device type ("cuda" without a GPU): the CPU's here."""
    import torchtitan.distributed.parallel_dims as parallel_dims

    saved = parallel_dims.device_type
    parallel_dims.device_type = "cpu"
    try:
        yield
    finally:
        parallel_dims.device_type = saved


@contextlib.contextmanager
def _weights_uninitialized() -> Iterator[None]:
    """``init_weights`` without the weights' random draws (values fake tensors do not hold); buffers as torchtitan makes them."""
    from torchtitan.protocols.module import Module

    saved = Module._init_self_parameters
    Module._init_self_parameters = lambda self: None
    try:
        yield
    finally:
        Module._init_self_parameters = saved


class Titan:
    """What ``Trainer.__init__`` builds from the config, on fake tensors (this module's docstring), over
    ``dims``: torchtitan's ``ParallelDims`` with its mesh built (:func:`parallel_dims`, outside the fake tensors)."""

    def __init__(self, config: Any, dims: Any) -> None:
        import torch
        from torchtitan.components.loss import ChunkedLossWrapper
        from torchtitan.config import TORCH_DTYPE_MAP
        from torchtitan.tools import utils

        self.config, self.dims = config, dims
        par = config.parallelism
        spec = config.model_spec
        self.model_config = spec.model
        self.model_config.update_from_config(config=config)
        with torch.device("meta"), utils.set_default_dtype(TORCH_DTYPE_MAP[config.training.dtype]):
            model = self.model_config.build()
        model = spec.parallelize_fn(model, parallel_dims=self.dims, training=config.training, parallelism=par,
                                    compile_config=config.compile, ac_config=config.activation_checkpoint,
                                    dump_folder=config.dump_folder)
        model.to_empty(device="cpu")
        with torch.no_grad(), _weights_uninitialized():
            model.init_weights(buffer_device=None)
        model.train()
        self.model = model
        self.loss_fn = config.loss.build(compile_config=config.compile)
        if isinstance(self.loss_fn, ChunkedLossWrapper):
            self.loss_fn.set_lm_head(model.lm_head)
            model._skip_lm_head = True
        self.optimizers = config.optimizer.build(model_parts=[model])
        self.lr_schedulers = config.lr_scheduler.build(optimizers=self.optimizers, training_steps=config.training.steps)
        self.accumulation = config.training.global_batch_size // (config.training.local_batch_size * dims.world_size)

    def batches(self) -> List[Tuple[Dict[str, Any], Any]]:
        """One step's host batches: (input dict with ``input`` and ``positions``, labels) per micro-batch (host
        memory, which the referee does not record: the step counts their valid tokens there too)."""
        import torch

        t = self.config.training
        shape = (t.local_batch_size, t.seq_len)
        out = []
        for _ in range(self.accumulation):
            tokens = torch.zeros(shape, dtype=torch.int64)
            positions = torch.arange(t.seq_len, dtype=torch.int64).expand(shape).contiguous()
            out.append(({"input": tokens, "positions": positions}, torch.zeros(shape, dtype=torch.int64)))
        return out

    @staticmethod
    def valid_tokens(batches: List[Tuple[Dict[str, Any], Any]]) -> Any:
        """The step's count of labels to predict, which ``train_step`` takes on the host batches."""
        import torch

        count = torch.tensor(0, dtype=torch.int64)
        for _, labels in batches:
            count += (labels != IGNORE_INDEX).sum()
        return count

    def train_step(self, batches: List[Tuple[Dict[str, Any], Any]], local_valid_tokens: Any, observer: Observer) -> None:
        """``Trainer.train_step`` (torchtitan 0.3.0, trainer.py) without its logging: the same device tensors
        (``local_valid_tokens``: :meth:`valid_tokens`, host memory, made before)."""
        from torchtitan.distributed import utils as dist_utils

        self.optimizers.zero_grad(set_to_none=True)  # (disable_cuda_graphs: set_to_none)
        global_valid_tokens = to_device(local_valid_tokens, "fake")
        model = self.model
        for micro, (input_dict, labels) in enumerate(batches):
            observer.phase("forward", micro)
            inputs = to_device(input_dict["input"], "fake")
            positions = to_device(input_dict["positions"], "fake")
            labels = to_device(labels, "fake")
            masks = model.get_attention_masks(positions=positions)  # post_dataloading_process (flex, varlen)
            pred = model(inputs, positions=positions, attention_masks=masks)
            loss, _ = self.loss_fn(pred, labels, global_valid_tokens, positions=positions)
            del pred
            observer.phase("backward", micro)
            loss.backward()
            del loss, inputs, positions, labels, masks
        observer.phase("optimizer", len(batches) - 1)
        dist_utils.clip_grad_norm_([p for p in model.parameters()], self.config.training.max_norm, foreach=True,
                                   pp_mesh=None, ep_enabled=False)
        self.optimizers.step()
        self.lr_schedulers.step()

    def gradients(self) -> Iterator[Tuple[str, Any]]:
        """Each parameter's gradient (this rank's shard), by parameter."""
        for name, p in self.model.named_parameters():
            if p.grad is not None:
                local = getattr(p.grad, "_local_tensor", None)
                yield name, p.grad if local is None else local

    def state_tensors(self) -> Iterator[Tuple[str, Any]]:
        """The optimizers' states (each rank's shard), named by parameter."""
        from .referee import state_tensors

        return state_tensors(self.optimizers.optimizers, {id(p): n for n, p in self.model.named_parameters()})


def parallel_dims(ranks: int) -> Any:
    """torchtitan's ParallelDims of ``ranks`` FSDP2 ranks, its device mesh built on the CPU over the process
    group already made (before the fake tensors' session: a mesh is real)."""
    from torchtitan.distributed.parallel_dims import ParallelDims

    dims = ParallelDims(dp_replicate=1, dp_shard=ranks, cp=1, tp=1, pp=1, ep=1, world_size=ranks)
    with _cpu_mesh():
        dims.build_mesh()
    return dims


class _Recording(Observer):
    """Phase and micro-step for the recorder: the first two micro-steps and the optimizer step."""

    def __init__(self, recorder: Any) -> None:
        self.r = recorder

    def phase(self, name: str, micro_step: int) -> None:
        self.r.recording = micro_step < 2 or name == "optimizer"
        self.r.micro_step = min(micro_step, 1)
        self.r.phase = name


def titan_step(plan: Mapping[str, Any], module_dir: Path, rank: int = 0, where: str = "plan") -> Dict[str, Any]:
    """The emitted module of ``plan`` (in ``module_dir``) trained by torchtitan as rank ``rank``: one warm-up
    step, then one recorded. Returns the events and the facts of the run."""
    import torch
    import torchtitan

    from .fake import session
    from .fsdp2 import Fsdp2
    from .recorder import StorageRecorder
    from .titan_kernels import stand_in

    setup = check_plan(plan, where)["setup"]
    gpus = plan.get("gpus")
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        fail(where, "gpus", "expected a positive integer")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < gpus:
        fail("command line", "rank", f"expected 0 to {gpus - 1} (the plan's ranks), got {rank!r}")
    t0 = time.monotonic()
    config = load_config(module_dir)
    check_config(config, setup, gpus, str(module_dir / f"{MODULE}.py"))
    world = Fsdp2(gpus, rank)  # torch's fake process group; FSDP2's buffers marked as it makes them
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(world.close)
        cleanup.enter_context(world.marking())
        dims = parallel_dims(gpus)
        cleanup.enter_context(session())
        cleanup.enter_context(stand_in())
        titan = Titan(config, dims)
        warm_up = titan.batches()
        titan.train_step(warm_up, titan.valid_tokens(warm_up), Observer())  # the optimizer's states
        recorder = StorageRecorder()
        model = titan.model
        recorder.register(Fsdp2.sharded_tensors(model), "weights", "init.weights")
        recorder.register(model.named_buffers(), "weights", "init.buffers")
        recorder.register(titan.state_tensors(), "optimizer_state", "init.optimizer_state")
        # the previous step's gradients: torchtitan zeroes them (set to None) as a step begins, not as it ends
        recorder.register(titan.gradients(), "gradients", "init.gradients")
        hooks = _mark_checkpoints(recorder, model, setup)
        world.recorder = recorder
        batches = titan.batches()  # host memory: made before recording starts
        valid = titan.valid_tokens(batches)
        try:
            with recorder.tracking(model), recorder:
                titan.train_step(batches, valid, _Recording(recorder))
            recorder.close()
        finally:
            for h in hooks:
                h.remove()
        events = recorder.timeline()
        flavor = f"{config.model_spec.name} {config.model_spec.flavor}"
        layers, titan_accumulation = len(model.layers), titan.accumulation
        del model, titan
    return {"events": [e.to_list() for e in events], "seconds": time.monotonic() - t0, "rank": rank, "world": gpus,
            "layers": layers, "corrected_sums": recorder.corrected_sums, "micro_steps": titan_accumulation,
            "micro_steps_recorded": min(titan_accumulation, 2),
            "torch": torch.__version__, "torchtitan": getattr(torchtitan, "__version__", _version("torchtitan")),
            "flavor": flavor, "attention": type(config.model_spec.model.layers[0].attention.inner_attention).__qualname__}


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _mark_checkpoints(recorder: Any, model: Any, setup: Mapping[str, Any]) -> List[Any]:
    """Each checkpointed block's input (the hidden states it receives in forward) is a checkpoint."""
    def hook(module: Any, args: Tuple[Any, ...]) -> None:
        if recorder.phase == "forward" and args:
            recorder.mark([args[0]], "checkpoint")

    layers = list(model.layers.values())
    return [layers[i].register_forward_pre_hook(hook)
            for i in checkpoint_layers_from_spec(setup.get("checkpoint", []), len(layers))]


def measurement_file(plan: Mapping[str, Any], result: Mapping[str, Any], run: str) -> Dict[str, Any]:
    """The recorded step as a referee measurement (``mst-measure/1``, backend referee), torchtitan's facts
    among its notes."""
    from .referee import summarize_events

    name, path = resolve_model(plan["model"])
    setup = dict(plan["setup"])
    summary = dict(summarize_events(result["events"]), seconds=result["seconds"], device="fake",
                   attn_implementation=result["attention"], layers=result["layers"], events=len(result["events"]),
                   corrected_sums=result["corrected_sums"], torch=result["torch"], torchtitan=result["torchtitan"])
    timeline = {"format": "mst-timeline/1", "source": "referee", "model": Path(path).stem,
                "micro_steps": result["micro_steps"], "micro_steps_recorded": result["micro_steps_recorded"],
                "columns": ["kind", "tensor", "bytes", "category", "device", "phase", "layer", "micro_step", "op", "name"],
                "events": result["events"]}  # (no rank: the plan's runtime walks its ranks alike; the notes say whose)
    notes = [f"trainer: torchtitan {result['torchtitan']} ({result['flavor']}, {result['attention']}), rank "
             f"{result['rank']} of {result['world']} (torch's fake process group, fake tensors; "
             "the fused RMSNorm, flex attention and its block mask stood in for: mst_referee.titan_kernels)"]
    return {"format": "mst-measure/1", "backend": "referee", "model": name, "model_path": str(path), "seed": 0,
            "workspace_bytes": 0, "setup": setup, "timeline": timeline, "summary": summary, "run": run, "notes": notes}


def main(argv: Any = None) -> int:
    import argparse

    from .jobs import read_json
    from .records import write_record

    p = argparse.ArgumentParser(prog="python -m mst_referee.titan", description=__doc__.splitlines()[0])
    p.add_argument("plan", type=Path, help="an mst-plan plan (recommend --for torchtitan --out)")
    p.add_argument("module_dir", type=Path, help="the folder holding the mst_torchtitan.py emitted for it "
                   "(mst-plan emit --format torchtitan --out DIR)")
    p.add_argument("--rank", type=int, default=0, help="which of the plan's data-parallel ranks (default 0)")
    p.add_argument("--out", type=Path, required=True, help="the recorded step (mst-measure/1, backend referee: "
                   "mst-plan compare --run reads it)")
    args = p.parse_args(argv)
    try:
        plan = read_json(args.plan, "the plan")
        result = titan_step(plan, args.module_dir, args.rank, str(args.plan))
    except CrosscheckError as e:
        print(f"error: {e}")
        return 2
    return write_record(args.out, measurement_file(plan, result, args.out.stem), result)


if __name__ == "__main__":
    raise SystemExit(main())
