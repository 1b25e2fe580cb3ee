"""The referee: a job's real training step at full size on fake tensors, every storage recorded.

The model of the job is built from its ``config.json`` under :func:`mst_referee.fake.session`,
patched by ``mst_hf.apply`` and given ``mst_hf.make_optimizer``'s optimizer exactly as a GPU
run is; warm-up steps create the optimizer's states, then one optimizer step (its first two
micro-steps, as mst-plan's timelines hold; FSDP2 accumulating unsynced: the first, the second and the
last, :func:`micro_steps_recorded`) is recorded by :class:`StorageRecorder`.

What exists before the recorded step is registered as its ``init`` allocations, in this order:
the parameters and buffers (``model.named_parameters()``, then ``named_buffers()``, then tensors
modules hold as plain attributes), the fp32
master copies (precision bf16-master), the optimizer states per parameter (the optimizer's
own order). An optimizer's ``step`` counter is device memory only in torch's fused
implementation; the others keep it on the host and it is left out.

Categories the recorder cannot see by itself are marked as the step shows them: a
checkpointed decoder layer's input (the hidden states it receives in forward) is a
checkpoint, unless offloading makes its host copy the checkpoint; a parameter's (or master's) ``.grad`` is a gradient.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import mst_hf

from .jobs import Job
from .step import Observer, run_step


def _optimizers(optimizer: Any) -> List[Any]:
    """The torch optimizers behind what make_optimizer returned, in their stepping order."""
    if isinstance(optimizer, mst_hf.InBackwardOptimizer):
        return list(optimizer.optimizers.values())
    if isinstance(optimizer, mst_hf.MasterWeightOptimizer):
        return [optimizer.inner]
    return [optimizer]


def state_tensors(optimizers: Iterable[Any], names: Dict[int, str]) -> Iterator[Tuple[str, Any]]:
    """The states of torch optimizers, named by parameter (``names``: id -> name): a DTensor's local part; the step
    counter only where it is a device tensor (torch's fused implementation)."""
    import torch

    for opt in optimizers:
        fused = any(g.get("fused") for g in opt.param_groups)
        for group in opt.param_groups:
            for p in group["params"]:
                for key, value in opt.state.get(p, {}).items():
                    if not isinstance(value, torch.Tensor) or (key == "step" and not fused):
                        continue
                    local = getattr(value, "_local_tensor", None)  # a DTensor's (FSDP2's states): this rank's part
                    yield f"{names.get(id(p), 'param')}.{key}", value if local is None else local


def micro_steps_recorded(cfg: "mst_hf.MstConfig") -> int:
    """Micro-steps after the second repeat it, as in mst-plan's timelines, and are not recorded; but
    FSDP2 accumulating unsynced reduce-scatters in its last only, recorded as the third."""
    return min(cfg.grad_accum, 3 if cfg.fsdp2_no_sync else 2)


class _Recording(Observer):
    """Sets the recorder's phase and micro-step; records the micro-steps micro_steps_recorded says (a
    last one recorded after skipped ones is recorded as the last recorded)."""

    def __init__(self, recorder: Any, model: Any, masters: Dict[int, Any], cfg: "mst_hf.MstConfig") -> None:
        self.r, self.model, self.masters = recorder, model, masters
        recorded = micro_steps_recorded(cfg)
        self.last = (cfg.grad_accum - 1, recorded - 1) if recorded > 2 else None  # (its index, its recorded index)

    def phase(self, name: str, micro_step: int) -> None:
        last = self.last is not None and micro_step == self.last[0]
        self.r.recording = micro_step < 2 or last or name == "optimizer"
        self.r.micro_step = self.last[1] if last else min(micro_step, 1)
        self.r.phase = name
        if name == "optimizer":
            self.r.mark(self._grads(), "gradients")

    def _grads(self) -> Iterable[Any]:
        for p in self.model.parameters():
            yield p.grad
            master = self.masters.get(id(p))
            if master is not None:
                yield master.grad


def patched_model(job: Job, cfg: "mst_hf.MstConfig") -> Tuple[Any, str]:
    """The job's model on the CPU device (fake or real tensors: the caller's mode), with the plan's
    attention (the FlashAttention-2 stand-in for flash) and mst_hf's patches; and the attention
    implementation transformers runs."""
    from .flash import use_flash
    from .train import build_model, pick_attn_implementation

    attn, _ = pick_attn_implementation(cfg.attention, "cpu")
    model = build_model(job, attn, "cpu")
    attn = use_flash(model, cfg.attention)
    mst_hf.apply(model, cfg)
    return model, attn


def tensor_attributes(model: Any) -> Iterator[Tuple[str, Any]]:
    """Tensors modules keep as plain attributes, neither parameters nor buffers (longrope's
    ``long_inv_freq``, made by the first forward): device memory all the same."""
    import torch

    for prefix, module in model.named_modules():
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor):
                yield (f"{prefix}.{name}" if prefix else name), value


def warm_up(job: Job, model: Any, optimizer: Any, cfg: "mst_hf.MstConfig", next_step: Any, device: str,
            ddp: Optional[Any] = None) -> None:
    """The job's warm-up steps, at least one: the optimizer creates its states in the first. With
    DDP at least two: its Reducer rebuilds the buckets as the second begins."""
    for _ in range(max(job.warmup, 2 if ddp else 1)):
        run_step(ddp.module if ddp else model, optimizer, cfg, next_step(), device, keep_loss=False, trainer=job.trainer)
    if ddp is not None:
        ddp.rebuilt()


def referee_step(job: Job, correct_buffer_sums: bool = True) -> Dict[str, Any]:
    """Build, patch and train the job's model on fake tensors; return the recorded step.

    Returns {"events": [...], "corrected_sums", "attn_implementation", "seconds",
    "micro_steps", "micro_steps_recorded"}.
    """
    from .ddp import Ddp
    from .fake import session
    from .recorder import StorageRecorder, cuda_autocast_policies
    from .train import step_batches

    t0 = time.monotonic()
    cfg = mst_hf.load_config(job.mst_config)
    if cfg.optimizer.name == "adamw-8bit":
        raise ValueError("referee: optimizer: adamw-8bit (bitsandbytes) has no fake-tensor implementation; "
                         "the referee runs adamw and sgd")
    marking: Dict[str, Any] = {"recorder": None}  # the gradient marks reach the recorder once it records
    with contextlib.ExitStack() as cleanup:
        fsdp = None
        if job.setup.get("fsdp2"):  # one rank of FSDP2 (mst_referee.fsdp2): its world is made outside the fake tensors
            from .fsdp2 import Fsdp2
            fsdp = Fsdp2(job.setup["dp"], job.rank)
            cleanup.callback(fsdp.close)
            cleanup.enter_context(fsdp.marking())
        cleanup.enter_context(session())
        cleanup.enter_context(cuda_autocast_policies())
        model, attn = patched_model(job, cfg)
        if fsdp is not None:
            fsdp.shard(model, cfg)
        ddp = Ddp(model) if job.setup.get("dp", 1) > 1 and fsdp is None else None  # one rank's view (mst_referee.ddp)
        if ddp is not None:
            cleanup.callback(ddp.close)  # its process group goes, also when the step raises
        trained = ddp.module if ddp else model
        # Registered before make_optimizer's: a hook that steps the optimizer in backward frees the
        # gradient, so this one must see it first. (FSDP2 sets its sharded gradients itself: they are
        # marked as they are made.)
        hooks = [p.register_post_accumulate_grad_hook(mark_gradient(marking)) for p in model.parameters()
                 if p.requires_grad and fsdp is None]
        optimizer = mst_hf.make_optimizer(model, cfg, lr=job.lr)
        next_step = step_batches(job)
        warm_up(job, model, optimizer, cfg, next_step, "fake", ddp)

        names = {id(p): n for n, p in model.named_parameters()}
        masters: Dict[int, Any] = {}
        if isinstance(optimizer, mst_hf.MasterWeightOptimizer):
            masters = {id(p): m for p, m in zip(optimizer.params, optimizer.masters)}
        elif isinstance(optimizer, mst_hf.InBackwardOptimizer):  # each parameter's optimizer steps its master
            masters = {id(p): opt.param_groups[0]["params"][0] for p, opt in optimizer.optimizers.items()
                       if opt.param_groups[0]["params"][0] is not p}
        names.update({id(m): names[pid] + ".master" for pid, m in masters.items()})
        recorder = StorageRecorder(correct_buffer_sums)
        recorder.register(fsdp.sharded_tensors(model) if fsdp else model.named_parameters(), "weights", "init.weights")
        recorder.register(model.named_buffers(), "weights", "init.buffers")
        recorder.register(tensor_attributes(model), "weights", "init.buffers")
        recorder.register(((names[id(m)], m) for m in masters.values()), "master_weights", "init.master_weights")
        recorder.register(state_tensors(_optimizers(optimizer), names), "optimizer_state", "init.optimizer_state")
        if ddp is not None:
            recorder.register(ddp.bucket_tensors(), "gradients", "init.ddp_buckets")

        hooks += mark_checkpoints(recorder, model, cfg)
        marking["recorder"] = recorder
        if fsdp is not None:
            fsdp.recorder = recorder
        batches = next_step()  # host memory: made before recording starts
        try:
            with recorder.tracking(model), recorder:
                run_step(trained, optimizer, cfg, batches, "fake", _Recording(recorder, model, masters, cfg),
                         keep_loss=False, trainer=job.trainer)
            recorder.close()
        finally:
            for h in hooks:
                h.remove()
        events = recorder.timeline()
        del model, optimizer, trained
    out = {"events": [e.to_list() for e in events], "corrected_sums": recorder.corrected_sums,
           "attn_implementation": attn, "seconds": time.monotonic() - t0,
           "micro_steps": cfg.grad_accum, "micro_steps_recorded": micro_steps_recorded(cfg)}
    if job.setup.get("fsdp2"):
        out["rank"] = job.rank
    return out


def mark_checkpoints(recorder: Any, model: Any, cfg: Any) -> List[Any]:
    """Hooks that record each checkpointed layer's input as a checkpoint (offloaded, the checkpoint is
    the host copy save_on_cpu makes); remove them when the step is recorded."""
    def hook(module: Any, args: Tuple[Any, ...]) -> None:
        if recorder.phase == "forward" and args:
            recorder.mark([args[0]], "checkpoint")

    if cfg.offload_checkpoints:
        return []
    layers = model.model.layers
    return [layers[i].register_forward_pre_hook(hook) for i in cfg.checkpoint_layers]


def mark_gradient(marking: Dict[str, Any]) -> Any:
    """A post-accumulate-grad hook recording the parameter's .grad as a gradient once
    ``marking["recorder"]`` is set."""
    def hook(param: Any) -> None:
        if marking["recorder"] is not None:
            marking["recorder"].mark([param.grad], "gradients")
    return hook


def summarize_events(events: List[List[Any]]) -> Dict[str, Any]:
    """Peak, per-phase peaks, per-category maxima, host peak and what stays live: the views
    mst-plan's ``summarize`` computes from the same events."""
    live: Dict[int, Tuple[int, str, str]] = {}
    gpu = host = peak = 0
    phase_peak: Dict[str, int] = {}
    by_category: Dict[str, int] = {}
    category_max: Dict[str, int] = {}
    host_peak = 0
    for kind, tensor, nbytes, category, device, phase, *_ in events:
        if kind == "alloc":
            live[tensor] = (nbytes, category, device)
            if device == "host":
                host += nbytes
            else:
                gpu += nbytes
                by_category[category] = by_category.get(category, 0) + nbytes
        else:
            nbytes, category, device = live.pop(tensor)
            if device == "host":
                host -= nbytes
            else:
                gpu -= nbytes
                by_category[category] -= nbytes
        peak = max(peak, gpu)
        host_peak = max(host_peak, host)
        phase_peak[phase] = max(phase_peak.get(phase, 0), gpu)
        for c, b in by_category.items():
            category_max[c] = max(category_max.get(c, 0), b)
    return {"peak_bytes": peak, "phase_peak_bytes": phase_peak, "category_max_bytes": category_max,
            "host_peak_bytes": host_peak, "persistent_bytes": gpu}


def timeline(model_path: str, result: Dict[str, Any]) -> Dict[str, Any]:
    """The recorded step of the model whose config is ``model_path`` as an mst-timeline/1 object (what ``mst-plan
    compare`` reads)."""
    from .recorder import Event

    # mst-plan names a model by its config file's stem (the catalog name, or a cut copy's name).
    out = {"format": "mst-timeline/1", "source": "referee", "model": Path(model_path).stem,
           "micro_steps": result["micro_steps"], "micro_steps_recorded": result["micro_steps_recorded"],
           "columns": list(Event.COLUMNS), "events": result["events"]}
    if "rank" in result:  # (a sharded step: whose it is)
        out["rank"] = result["rank"]
    return out


def describe_versions() -> Dict[str, Optional[str]]:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}
