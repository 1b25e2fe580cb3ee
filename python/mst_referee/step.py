"""One optimizer step of a training loop, as a trainer runs it, shared by every device.

For each micro-step the batch is copied to the device (``input_ids`` and ``labels``, two
tensors, as a causal-LM data collator makes them), the model runs with ``labels`` and only
the loss of its output is kept (Hugging Face's ``Trainer.compute_loss``), the loss is divided
by the accumulation steps when there are several, and backward runs; then the optimizer steps
and ``zero_grad(set_to_none=True)`` frees the gradients. An observer (the referee's recorder)
is told where the step is: phase and micro-step.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import mst_hf


class Observer:
    """Told where a step is; the referee's recorder listens, a plain run does not."""

    def phase(self, name: str, micro_step: int) -> None:
        """``forward`` (the batch's copy included), ``backward`` or ``optimizer``."""


def to_device(batch: Any, device: str) -> Any:
    """The copy of a host batch on the device. Without a GPU (the CPU, fake tensors) the copy
    is a clone: the allocation a host-to-device copy makes on a GPU."""
    return batch.to(device) if device.startswith("cuda") else batch.clone()


def run_step(model: Any, optimizer: Any, cfg: "mst_hf.MstConfig", batches: Sequence[Any], device: str,
             observer: Optional[Observer] = None, keep_loss: bool = True) -> Optional[Any]:
    """One optimizer step over ``cfg.grad_accum`` micro-batches (host tensors [B, S]).

    Returns the sum of the micro-steps' losses (a detached 0-dim tensor) when ``keep_loss``.
    """
    observer = observer or Observer()
    device_type = "cpu" if device in ("cpu", "fake") else "cuda"
    total = None
    for micro, batch in enumerate(batches):
        observer.phase("forward", micro)
        ids, labels = to_device(batch, device), to_device(batch, device)
        with mst_hf.autocast(cfg, device_type=device_type):
            loss = model(input_ids=ids, labels=labels, use_cache=False).loss
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
