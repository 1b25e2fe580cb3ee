"""One optimizer step of a training loop, as a trainer runs it, shared by every device.

For each micro-step the batch is copied to the device (``input_ids`` and ``labels``, two
tensors, as a causal-LM data collator makes them), the model runs with ``labels`` (called as
the trainer calls it: :func:`forward`) and only the loss of its output is kept (Hugging Face's
``Trainer.compute_loss``), the loss is divided by the accumulation steps when there are
several, and backward runs; then the optimizer steps and ``zero_grad(set_to_none=True)`` frees
the gradients. An observer (the referee's recorder) is told where the step is: phase and
micro-step.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import mst_hf


class Observer:
    """Told where a step is; the referee's recorder listens, a plain run does not."""

    def phase(self, name: str, micro_step: int) -> None:
        """``forward`` (the batch's copy included), ``backward`` or ``optimizer``."""

    def held_inputs(self, copying: bool) -> None:
        """Around the copy of a micro-batch's inputs that the step keeps to its end (torchtitan's)."""

    def kept(self, tensor: Any, name: str) -> None:
        """A micro-step's tensor the next one keeps (torchtitan's loss, until the next micro-step's replaces it)."""


def to_device(batch: Any, device: str) -> Any:
    """The copy of a host batch on the device. Without a GPU (the CPU, fake tensors) the copy
    is a clone: the allocation a host-to-device copy makes on a GPU."""
    return batch.to(device) if device.startswith("cuda") else batch.clone()


TRAINERS = ("loop", "hf-trainer")


def _outputs_to_fp32(out: Any) -> Any:
    """accelerate's ``convert_to_fp32`` on a model output: a new output whose bf16/fp16 tensors
    are fp32 copies (the others, the fp32 loss, are the same tensors)."""
    import torch

    def convert(v: Any) -> Any:
        return v.float() if torch.is_tensor(v) and v.dtype in (torch.bfloat16, torch.float16) else v
    if isinstance(out, tuple):
        return tuple(convert(v) for v in out)
    return out.__class__(**{key: convert(v) for key, v in out.items()})


def forward(model: Any, cfg: "mst_hf.MstConfig", device_type: str, trainer: str, **inputs: Any) -> Any:
    """The model's forward as the trainer calls it. ``loop``: a training loop of one's own, under
    ``mst_hf.autocast`` (bf16 autocast for precision amp only). ``hf-trainer``: the Hugging Face
    Trainer with ``bf16=True``, whose accelerate wraps the forward in bf16 autocast (whatever the
    weights' dtype) and converts its outputs to fp32 after it (``convert_outputs_to_fp32``)."""
    import torch

    if trainer == "hf-trainer":
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
            out = model(**inputs)
        return _outputs_to_fp32(out)
    with mst_hf.autocast(cfg, device_type=device_type):
        return model(**inputs)


def run_step(model: Any, optimizer: Any, cfg: "mst_hf.MstConfig", batches: Sequence[Any], device: str,
             observer: Optional[Observer] = None, keep_loss: bool = True, trainer: str = "loop") -> Optional[Any]:
    """One optimizer step over ``cfg.grad_accum`` micro-batches (host tensors [B, S]), the forward
    called as ``trainer`` calls it (:func:`forward`).

    Returns the sum of the micro-steps' losses (a detached 0-dim tensor) when ``keep_loss``.
    """
    observer = observer or Observer()
    device_type = "cpu" if device in ("cpu", "fake") else "cuda"
    total = None
    # FSDP2 accumulating unsynced: accelerate's no_sync (the Hugging Face Trainer's accumulation) turns the
    # gradient sync off for every micro-step but the last
    unsynced = cfg.fsdp2_no_sync and len(batches) > 1
    for micro, batch in enumerate(batches):
        if unsynced:
            model.set_requires_gradient_sync(micro == len(batches) - 1)
        observer.phase("forward", micro)
        ids, labels = to_device(batch, device), to_device(batch, device)
        loss = forward(model, cfg, device_type, trainer, input_ids=ids, labels=labels, use_cache=False).loss
        if cfg.grad_accum > 1:
            loss = loss / cfg.grad_accum
        observer.phase("backward", micro)
        loss.backward()
        if keep_loss:
            part = loss.detach() * cfg.grad_accum if cfg.grad_accum > 1 else loss.detach()
            total = part if total is None else total + part
        del loss, ids, labels
    observer.phase("optimizer", len(batches) - 1)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total
