"""Activation checkpointing of chosen decoder layers, optionally offloaded to CPU.

A checkpointed layer keeps only its inputs from the forward and runs again in
its backward (non-reentrant ``torch.utils.checkpoint``, which needs no input
that requires grad and stops the replay once the saved tensors are rebuilt).

With offloading, ``save_on_cpu`` wraps the checkpoint call. The checkpoint
saves its positional tensor arguments through the ambient saved-tensor hooks
and the layer's intermediates behind its own inner hooks, so what moves to
host memory (pinned when CUDA is present) is the hidden states [B, S, d] that
Hugging Face passes positionally; keyword tensors (masks, rotary cos/sin,
shared by all layers) are held by reference on the device. torch >= 2.1.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._torch import ForwardPatch

# Keyword arguments through which a decoder layer reads or writes a KV cache,
# across transformers versions.
_CACHE_KWARGS = ("past_key_value", "past_key_values", "cache", "layer_past")


class CheckpointedForward(ForwardPatch):
    """Replacement ``forward`` of one decoder layer: same arguments, same outputs."""

    def __init__(self, layer: nn.Module, offload: bool) -> None:
        super().__init__(layer)
        self.offload = offload

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not (self.module.training and torch.is_grad_enabled()):
            return self.inner(*args, **kwargs)
        # The backward replay would write a KV cache a second time, and the cache would keep
        # the layer's keys and values alive: like Hugging Face's own gradient checkpointing,
        # give a checkpointed layer no cache while training (the patched model forward also
        # passes use_cache=False then, so this only happens when a caller forces a cache).
        dropped = [k for k in _CACHE_KWARGS if kwargs.get(k) is not None]
        if dropped:
            for k in dropped:
                kwargs[k] = None
            warnings.warn("mst_hf: a checkpointed layer got a KV cache while training; it runs without one",
                          stacklevel=2)
        if not self.offload:
            return checkpoint(self.inner, *args, use_reentrant=False, **kwargs)
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return checkpoint(self.inner, *args, use_reentrant=False, **kwargs)
