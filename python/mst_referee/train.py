"""One run on a device: the model of a job built with random weights, patched by mst_hf,
trained for warm-up + measured steps, and what torch measured."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import platform
import re
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import mst_hf

from .jobs import LOSS_RTOL, REPO_ROOT, Job, check_device, hf_mst_config, write_json
from .records import loss_agreement, measurement
from .step import run_step


def import_torch() -> Tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as e:
        raise SystemExit(f"torch_crosscheck: running needs torch and transformers: {e}") from None
    return torch, transformers


def pick_attn_implementation(planned: str, device_type: str) -> Tuple[str, Optional[str]]:
    """transformers' attn_implementation for the plan's attention, and a note when it is a fallback.

    "flash" is FlashAttention-2 where the flash_attn package works (CUDA), else PyTorch's SDPA
    (whose flash / memory-efficient kernels also keep O(S) memory); "sdpa" is SDPA, "eager" eager.
    """
    if planned == "eager":
        return "eager", None
    if planned == "sdpa":  # transformers' default: PyTorch's scaled_dot_product_attention
        return "sdpa", None
    torch, transformers = import_torch()
    if device_type == "cuda":
        try:
            from transformers.utils import is_flash_attn_2_available
            if is_flash_attn_2_available():
                return "flash_attention_2", None
        except ImportError:
            pass
    if hasattr(torch.nn.functional, "scaled_dot_product_attention"):
        return "sdpa", "attention: flash_attn is not installed here, so FlashAttention-2 runs as PyTorch SDPA"
    return "eager", "attention: this torch has neither flash_attn nor SDPA; eager attention holds S x S scores"


def _version_tuple(text: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:2])


def build_model(job: Job, attn: str, device: str) -> Any:
    """The causal LM of job.hf_config with random weights (seeded), in the precision's dtype, on device."""
    torch, transformers = import_torch()
    # fp32 weights: amp's, and bf16-master's under FSDP2 (its mixed-precision policy computes in bf16)
    precision = job.mst_config["precision"]
    fp32 = precision == "amp" or (precision == "bf16-master" and job.mst_config.get("fsdp2", False))
    dtype = torch.float32 if fp32 else torch.bfloat16
    cfg = dict(job.hf_config)
    cfg.pop("torch_dtype", None)  # the dtype is the plan's precision, passed below (and renamed in 4.56)
    cfg.pop("dtype", None)
    model_type = cfg.pop("model_type")
    for_model = getattr(transformers.AutoConfig, "for_model", None)
    if for_model is not None:
        config = for_model(model_type, **cfg)
    else:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        config = CONFIG_MAPPING[model_type](**cfg)
    # transformers 4.56 renamed from_config's torch_dtype to dtype.
    dtype_kw = "dtype" if _version_tuple(transformers.__version__) >= (4, 56) else "torch_dtype"
    torch.manual_seed(job.seed)
    # Build on the device (torch >= 2.0): 8B random weights initialised on the host take minutes.
    where = torch.device(device) if device != "cpu" and hasattr(torch.device, "__enter__") else contextlib.nullcontext()
    with where:
        try:
            model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn,
                                                                  **{dtype_kw: dtype})
        except ValueError:
            if attn != "sdpa":
                raise
            # transformers refuses SDPA for some architectures (Gemma-2: SDPA has no logit
            # soft-capping). Its memory is what the plan's "flash" means (output and logsumexp
            # saved, O(S)), as FlashAttention-2 is where it runs on a GPU: build with eager and
            # switch the attention function.
            model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                                                  **{dtype_kw: dtype})
            model.config._attn_implementation = "sdpa"
    # Only when needed: a no-op .to() on fake tensors would still swap every parameter.
    if any(p.device != torch.device(device) for p in model.parameters()):
        model = model.to(device=device)
    if any(p.dtype != dtype for p in model.parameters() if p.is_floating_point()):
        model = model.to(dtype)
    if hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
    return model.train()


def weights_fingerprint(model: Any) -> float:
    """A cheap checksum of the initial weights (the first 4096 values of every parameter)."""
    torch, _ = import_torch()
    with torch.no_grad():
        return float(sum(p.detach().reshape(-1)[:4096].double().sum().item() for p in model.parameters()))


def step_batches(job: Job) -> Callable[[], List[Any]]:
    """One optimizer step's random token ids per call: grad_accum host tensors [micro_batch, seq_len]
    (each micro-step copies its batch to the device, as a data loader's batch is), drawn in order from
    one generator seeded with job.seed + 1, so that every run of the job sees the same tokens."""
    torch, _ = import_torch()
    g = torch.Generator().manual_seed(job.seed + 1)
    cfg, vocab = job.mst_config, job.hf_config["vocab_size"]

    def next_step() -> List[Any]:
        return [torch.randint(0, vocab, (cfg["micro_batch"], cfg["seq_len"]), generator=g)
                for _ in range(cfg["grad_accum"])]
    return next_step


def make_batches(job: Job) -> List[Any]:
    """The batches of every micro-step of every step (warm-up and measured), in order."""
    next_step = step_batches(job)
    return [batch for _ in range(job.warmup + job.steps) for batch in next_step()]


class _StepClock:
    """Seconds of one step: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, torch: Any, device: str) -> None:
        self.torch, self.cuda = torch, device != "cpu"

    def __enter__(self) -> "_StepClock":
        if self.cuda:
            self.start = self.torch.cuda.Event(enable_timing=True)
            self.end = self.torch.cuda.Event(enable_timing=True)
            self.torch.cuda.synchronize()
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self.end.record()
            self.torch.cuda.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000.0
        else:
            self.seconds = time.perf_counter() - self.t0


class _Progress:
    """Where a run is, so an out-of-memory error can say in which step it happened."""

    def __init__(self) -> None:
        self.stage = "building the model"


def train(job: Job, patched: bool, device: str, progress: _Progress) -> Dict[str, Any]:
    """Build, (patch,) train warmup + steps optimizer steps; return losses, times and peaks."""
    torch, transformers = import_torch()
    cuda = device != "cpu"
    cfg = mst_hf.load_config(job.mst_config)
    attn, attn_note = pick_attn_implementation(cfg.attention, "cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    at_start = torch.cuda.memory_allocated() if cuda else None
    model = build_model(job, attn, device)
    fingerprint = weights_fingerprint(model)
    if patched:
        mst_hf.apply(model, cfg)
    optimizer = mst_hf.make_optimizer(model, cfg, lr=job.lr)
    batches = make_batches(job)
    losses: List[float] = []
    seconds: List[float] = []
    persistent = retries = None
    for step in range(job.warmup + job.steps):
        measured = step >= job.warmup
        progress.stage = f"{'measured' if measured else 'warm-up'} step {step}"
        if measured and step == job.warmup and cuda:
            # Steady state: weights, optimizer states (and fp32 masters) exist; no gradients.
            # Segments cached during the warm-up step are released so that reserved memory
            # reflects the steady-state steps only, as the simulator's allocator replay does.
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
            persistent = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            retries = torch.cuda.memory_stats().get("num_alloc_retries", 0)
        with _StepClock(torch, device) as clock:
            total = run_step(model, optimizer, cfg, batches[step * cfg.grad_accum:(step + 1) * cfg.grad_accum], device,
                             trainer=job.trainer)
        losses.append(float(total.item()) / cfg.grad_accum)
        if measured:
            seconds.append(clock.seconds)
    progress.stage = "done"
    result: Dict[str, Any] = {
        "losses": losses, "step_seconds_each": seconds, "attn_implementation": attn,
        "attn_note": attn_note, "fingerprint": fingerprint,
        "model_attn_implementation": getattr(model.config, "_attn_implementation", attn),
        "allocated_at_start_bytes": at_start,
    }
    if cuda:
        torch.cuda.synchronize()
        stats = torch.cuda.memory_stats()
        result.update(peak_allocated_bytes=int(torch.cuda.max_memory_allocated()),
                      peak_reserved_bytes=int(torch.cuda.max_memory_reserved()),
                      persistent_allocated_bytes=persistent,
                      alloc_retries=int(stats.get("num_alloc_retries", 0)) - (retries or 0))
    else:
        result.update(peak_allocated_bytes=None, peak_reserved_bytes=None, persistent_allocated_bytes=None,
                      alloc_retries=None)
    return result


def is_oom(torch: Any, e: BaseException) -> bool:
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom_type is not None and isinstance(e, oom_type)) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def release_memory(torch: Any, device: str) -> None:
    """Free what a finished (or failed) run left: Python cycles first (optimizer hooks), then the cache."""
    gc.collect()
    if device == "cuda":  # the cpu device and the referee's fake tensors hold no CUDA cache
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def guarded_train(job: Job, patched: bool, device: str) -> Tuple[Optional[Dict[str, Any]], Optional[Dict[str, Any]]]:
    """(result, None), or (None, error) after an out-of-memory error; other errors propagate.

    The model and optimizer live only in train()'s frame, so they are freed once the
    exception (whose traceback holds that frame) is dropped at the end of the except block.
    """
    torch, _ = import_torch()
    progress = _Progress()
    error = None
    try:
        return train(job, patched, device, progress), None
    except Exception as e:  # noqa: BLE001 (only OOM is handled; the rest re-raised)
        if not is_oom(torch, e):
            raise
        error = {"kind": "oom", "message": str(e).strip().splitlines()[0][:500], "during": progress.stage,
                 "patched": patched}
        if device != "cpu":
            error["peak_allocated_bytes_before_error"] = int(torch.cuda.max_memory_allocated())
            error["peak_reserved_bytes_before_error"] = int(torch.cuda.max_memory_reserved())
    finally:
        release_memory(torch, device)
    return None, error


def unpatched_job(job: Job) -> Job:
    """The loss check's twin as a job of its own: the setup that an unpatched model trains
    (no mini-sequences, no checkpointing), so its peaks are a measurement too."""
    setup = dict(job.setup, mlp_chunks=1, lm_chunks=1, checkpoint=[], offload_checkpoints=False)
    return dataclasses.replace(
        job, name=f"{job.name}.unpatched", setup=setup, loss_check=False, prediction=None,
        mst_config=hf_mst_config(job.mst_config["model"], setup, job.layers), hf_config_source="python",
        notes=list(job.notes) + [f"the unpatched twin of {job.name} (loss check): mst_hf.apply not called"])


def summarize(job: Job, result: Mapping[str, Any], device: str) -> Dict[str, Any]:
    """The summary of a finished run (the fields mst-plan reads first, then the details)."""
    torch, transformers = import_torch()
    seconds = result["step_seconds_each"]
    step_seconds = sum(seconds) / len(seconds)
    cfg = job.mst_config
    tokens = cfg["micro_batch"] * cfg["seq_len"] * cfg["grad_accum"]
    return {
        "peak_allocated_bytes": result["peak_allocated_bytes"],
        "peak_reserved_bytes": result["peak_reserved_bytes"],
        "step_seconds": step_seconds,
        "tokens_per_second": tokens / step_seconds if step_seconds > 0 else 0.0,
        "losses": result["losses"],
        "layers": job.layers,
        "device": torch.cuda.get_device_name() if device != "cpu" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attn_implementation": result["model_attn_implementation"],
        "dtype": "float32" if cfg["precision"] == "amp" else "bfloat16",
        "warmup_steps": job.warmup,
        "measured_steps": job.steps,
        "peaks_after": (f"peak statistics reset after {job.warmup} warm-up step(s) and torch.cuda.empty_cache(): "
                        f"max over the {job.steps} steady-state step(s)" if device != "cpu" else
                        "no peaks: the CPU has no caching-allocator statistics")
                       + f"; times over the {job.steps} step(s) after the warm-up; losses of every step, warm-up first",
        "step_seconds_each": seconds,
        "tokens_per_step": tokens,
        "persistent_allocated_bytes": result["persistent_allocated_bytes"],
        "allocated_at_start_bytes": result["allocated_at_start_bytes"],
        "alloc_retries": result["alloc_retries"],
        "lr": job.lr,
        "full_layers": job.full_layers,
        "pytorch_cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "python": platform.python_version(),
    }


def referee_record(job: Job) -> Dict[str, Any]:
    """The referee's record of a job: its step on fake tensors with the full timeline."""
    from .referee import describe_versions, referee_step, summarize_events, timeline

    result = referee_step(job)
    summary = summarize_events(result["events"])
    summary.update(corrected_sums=result["corrected_sums"], seconds=result["seconds"],
                   attn_implementation=result["attn_implementation"], layers=job.layers, device="fake",
                   events=len(result["events"]), **describe_versions())
    return measurement(job, summary, timeline=timeline(job.model_path, result))


def run_job(job: Job, device: str) -> Tuple[List[Dict[str, Any]], bool]:
    """Run one job; with loss_check also its unpatched twin. Returns (records, ok).

    records[0] is the job's measurement; with loss_check, records[1] is the twin's
    (its setup: no mini-sequences, no checkpointing). ok is False only for a loss-check
    disagreement: an out-of-memory run is a result, not a failure.
    """
    if job.derived_config is not None:
        write_json(REPO_ROOT / job.model_path if not Path(job.model_path).is_absolute() else Path(job.model_path),
                   job.derived_config)
    check_device(job, device)
    if device == "fake":
        return [referee_record(job)], True
    result, error = guarded_train(job, True, device)
    if error is not None:
        return [measurement(job, None, error)], True
    if result["attn_note"]:
        job.notes.append(result["attn_note"])
    summary = summarize(job, result, device)
    if not job.loss_check:
        return [measurement(job, summary)], True

    twin_job = unpatched_job(job)
    twin, twin_error = guarded_train(job, False, device)
    summary["loss_rtol"] = LOSS_RTOL
    if twin_error is not None:
        summary.update(losses_unpatched=None, loss_max_rel_diff=None, loss_check_passed=None,
                       loss_check_error=dict(twin_error))
        return [measurement(job, summary), measurement(twin_job, None, twin_error)], True
    diff = loss_agreement(result["losses"], twin["losses"])
    same_init = twin["fingerprint"] == result["fingerprint"]
    passed = same_init and diff <= LOSS_RTOL
    summary.update(losses_unpatched=twin["losses"], loss_max_rel_diff=diff, loss_check_passed=passed)
    if not same_init:
        summary["loss_check_error"] = {"kind": "different initial weights",
                                       "fingerprints": [result["fingerprint"], twin["fingerprint"]]}
    return [measurement(job, summary), measurement(twin_job, summarize(twin_job, twin, device))], passed


