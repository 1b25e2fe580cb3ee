"""Apply an mst-plan "hf-mst" config to a Hugging Face causal LM.

``mst-plan emit --format hf-mst`` writes ``mst_config.json``; this package
turns it into a patched model and an optimizer::

    import mst_hf
    config = mst_hf.load_config("mst_config.json")
    model = mst_hf.apply(model, config)
    mst_hf.shard(model, config)  # an fsdp2 plan only: torch's fully_shard, as planned
    optimizer = mst_hf.make_optimizer(model, config, lr=1e-5)

The config layer (:mod:`mst_hf.config`) is pure Python; ``apply``,
``make_optimizer``, ``autocast`` and ``causal_lm_loss`` import torch on first use.
"""

from typing import Any

from .config import (
    FORMAT,
    ConfigError,
    LmHeadConfig,
    MlpConfig,
    MstConfig,
    OptimizerConfig,
    Predicted,
    chunk_sizes,
    chunk_spans,
    load_config,
)

__version__ = "0.1.0"

# Names that need torch, and the module that defines each.
_TORCH_NAMES = {
    "apply": "patch",
    "applied_config": "patch",
    "autocast": "patch",
    "make_optimizer": "optim",
    "InBackwardOptimizer": "optim",
    "MasterWeightOptimizer": "optim",
    "causal_lm_loss": "loss",
    "shard": "fsdp",
}

__all__ = [
    "FORMAT",
    "ConfigError",
    "LmHeadConfig",
    "MlpConfig",
    "MstConfig",
    "OptimizerConfig",
    "Predicted",
    "chunk_sizes",
    "chunk_spans",
    "load_config",
    *_TORCH_NAMES,
]


def __getattr__(name: str) -> Any:
    module = _TORCH_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'mst_hf' has no attribute {name!r}")
    from importlib import import_module

    try:
        value = getattr(import_module(f"{__name__}.{module}"), name)
    except ImportError as e:
        raise ImportError(f"mst_hf.{name} needs torch (>= 2.1): {e}") from e
    globals()[name] = value
    return value
