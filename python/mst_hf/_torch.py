"""Small torch helpers shared by the patches: autocast state, dtypes, forward patches."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Tuple

import torch
from torch import nn

AutocastState = Tuple[bool, torch.dtype]

# Trainable parameter dtype that each hf-mst precision expects.
PARAM_DTYPES = {
    "pure-bf16": torch.bfloat16,
    "bf16-master": torch.bfloat16,
    "amp": torch.float32,
}


def autocast_state(device_type: str) -> AutocastState:
    """Whether autocast is on for ``device_type`` now, and its dtype."""
    try:
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # torch < 2.4: per-device functions
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
        return torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()


def autocast_as(device_type: str, state: AutocastState) -> "contextlib.AbstractContextManager[Any]":
    """Re-enter an autocast state recorded by :func:`autocast_state` (e.g. in a backward)."""
    enabled, dtype = state
    if not enabled:
        return torch.autocast(device_type=device_type, enabled=False)
    return torch.autocast(device_type=device_type, dtype=dtype)


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype a matmul with ``weight`` runs in here: autocast's if on, else the weight's."""
    enabled, dtype = autocast_state(weight.device.type)
    return dtype if enabled and weight.is_floating_point() else weight.dtype


def check_param_dtypes(model: nn.Module, precision: str, where: str, fsdp2: bool = False) -> None:
    """Raise ValueError unless every trainable floating parameter has ``precision``'s dtype (with ``fsdp2``,
    bf16-master's weights are stored fp32: FSDP2's mixed-precision policy gathers them in bf16)."""
    expected = torch.float32 if fsdp2 and precision == "bf16-master" else PARAM_DTYPES[precision]
    found = sorted({str(p.dtype) for p in model.parameters()
                    if p.requires_grad and p.is_floating_point() and p.dtype != expected})
    if found:
        name = str(expected).replace("torch.", "")
        raise ValueError(
            f'{where}: precision: "{precision}" trains {name} parameters, the model has trainable '
            f"{', '.join(s.replace('torch.', '') for s in found)} ones; load it with "
            f"torch_dtype=torch.{name} (or call model.to(torch.{name})) before applying the config")


class ForwardPatch:
    """A module's replacement ``forward``, installed as an instance attribute.

    It keeps the module and the forward it replaced (``inner``) as attributes,
    not in a closure, so ``copy.deepcopy(model)`` rebinds both to the copy.
    ``__wrapped__`` makes ``inspect.signature`` report the original signature
    (Hugging Face's Trainer reads it to pick dataset columns and loss kwargs).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.inner = module.forward
        self.__wrapped__ = self.inner

    def install(self) -> None:
        """Make this object the module's ``forward`` (``nn.Module.__call__`` calls it)."""
        self.module.forward = self


@contextlib.contextmanager
def no_autocast(device_type: str) -> Iterator[None]:
    """Run the enclosed ops in the dtypes they are given, whatever autocast says."""
    with torch.autocast(device_type=device_type, enabled=False):
        yield
