"""``apply``: patch a Hugging Face causal LM in place for an hf-mst config.

What changes (nothing else does):

* ``model.model.layers[i].mlp.forward`` runs in ``mlp.chunks`` mini-sequences
  (:mod:`mst_hf.mlp`) when ``mlp.chunks > 1``.
* ``model.model.layers[i].forward`` is checkpointed for every ``i`` in
  ``checkpoint_layers`` (:mod:`mst_hf.checkpoint`), its saved input offloaded
  to CPU with ``offload_checkpoints``.
* When ``lm_head.chunks > 1``, ``model.forward`` called with ``labels`` (or
  ``shift_labels``) computes the loss in mini-sequences (:mod:`mst_hf.loss`)
  and returns ``loss`` with ``logits=None``. It runs the model's own forward
  without labels and with ``use_cache=False`` while ``lm_head`` only hands
  over its input [B, S, d] (returning an empty [B, S, 0] placeholder), so the
  other arguments and outputs behave as before (``return_dict=False``: the
  tuple transformers makes, without the logits). A Mixture-of-Experts model's
  router loss (``output_router_logits``) is added to the loss as the model's
  own forward adds it. Without labels the model is untouched (generation,
  evaluation of logits).
* Under ZeRO-3 (``zero_stage`` 3) the loss runs *inside* ``lm_head``'s
  forward, and ``lm_head`` returns it (a 0-dim tensor) in place of the logits:
  DeepSpeed gathers a module's weight only around its forward and, in
  backward, before the gradient of the module's output arrives. So lm_head
  keeps its own hooks' order (gather, loss, release; gather, the loss's
  backward, release), and the weight is read only while it is gathered, as
  ALST's tiled logits loss reads it. A model whose forward changes the
  logits after lm_head (Gemma-2's ``final_logit_softcapping``) is refused.
* With ``checkpoint_layers``, ``model.forward`` in training (``model.train()``
  and autograd on) passes ``use_cache=False``, as Hugging Face's own gradient
  checkpointing does.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import warnings
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ._torch import ForwardPatch, check_param_dtypes
from .checkpoint import CheckpointedForward
from .config import MstConfig, load_config
from .loss import IGNORE_INDEX, causal_lm_loss
from .mlp import ChunkedMlpForward

_APPLIED = "_mst_hf_config"
ConfigLike = Union[MstConfig, str, "os.PathLike[str]", Mapping[str, Any]]


class _CapturingHeadForward(ForwardPatch):
    """``lm_head.forward`` that, while armed, keeps its input instead of computing logits.

    With ``loss`` set (ZeRO-3), it returns ``loss(input)`` instead of a placeholder: the loss is
    computed while the module's weight is gathered, and returned through the module's output
    hooks.
    """

    def __init__(self, head: nn.Module) -> None:
        super().__init__(head)
        self.armed = False
        self.hidden: Optional[Tensor] = None
        self.loss: Optional[Callable[[Tensor], Tensor]] = None

    def __call__(self, hidden: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if not self.armed:
            return self.inner(hidden, *args, **kwargs)
        self.hidden = hidden  # [B, S, d]
        if self.loss is not None:
            return self.loss(hidden)  # 0-dim fp32
        return hidden.new_empty((*hidden.shape[:-1], 0))


class _Argument:
    """One named argument of a forward, found among the keywords or at its position."""

    def __init__(self, forward: Any, name: str) -> None:
        names = list(inspect.signature(forward).parameters)
        self.name = name
        self.position = names.index(name) if name in names else None

    def pop(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Any, Tuple[Any, ...]]:
        """(value or None, args with the positional value, if any, set to None); kwargs lose the name."""
        value = kwargs.pop(self.name, None)
        if value is None and self.position is not None and len(args) > self.position:
            value = args[self.position]
            args = args[:self.position] + (None,) + args[self.position + 1:]
        return value, args

    def set(self, args: Tuple[Any, ...], kwargs: Dict[str, Any], value: Any) -> Tuple[Any, ...]:
        """args, with the value put where the caller passed it (kwargs when it did not)."""
        if self.position is not None and len(args) > self.position:
            return args[:self.position] + (value,) + args[self.position + 1:]
        kwargs[self.name] = value
        return args


class _TrainingForward(ForwardPatch):
    """``model.forward`` for training under the config.

    * With checkpointed layers, training runs without a KV cache (a cache would
      be written again by each layer's backward replay and would keep the
      layers' keys and values alive), as Hugging Face's gradient checkpointing.
    * With a chunked LM head (``head`` set) and labels, the loss is computed in
      mini-sequences from lm_head's input and returned with ``logits=None``;
      with ``in_head`` (ZeRO-3), inside lm_head's forward, which returns it.
    """

    def __init__(self, model: nn.Module, head: Optional[_CapturingHeadForward], chunks: int, impl: str,
                 checkpointing: bool, in_head: bool) -> None:
        super().__init__(model)
        self.head = head
        self.chunks = chunks
        self.impl = impl
        self.checkpointing = checkpointing
        self.in_head = in_head
        self.labels = _Argument(self.inner, "labels")
        self.use_cache = _Argument(self.inner, "use_cache")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        training = self.module.training and torch.is_grad_enabled()
        if self.checkpointing and training:
            args = self.use_cache.set(args, kwargs, False)
        if self.head is None:
            return self.inner(*args, **kwargs)
        labels, args_without = self.labels.pop(args, kwargs)
        shift_labels = kwargs.pop("shift_labels", None)
        if labels is None and shift_labels is None:
            return self.inner(*args, **kwargs)
        args = self.use_cache.set(args_without, kwargs, False)  # a loss needs no KV cache
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        ignore_index = kwargs.pop("ignore_index", IGNORE_INDEX)
        config = getattr(self.module, "config", None)
        # The model's outputs are read by name (the logits, a Mixture-of-Experts router loss): it runs with
        # return_dict=True, and the tuple the caller asked for is made at the end, as transformers'
        # can_return_tuple makes it (None entries left out).
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(config, "return_dict", True)
        kwargs["return_dict"] = True

        def loss_of(hidden: Tensor) -> Tensor:
            # (the weight is read here, not before: under ZeRO-3 a read outside lm_head's forward makes
            # DeepSpeed gather it and register it to the model's root module for good)
            return causal_lm_loss(hidden, self.head.module.weight, labels, chunks=self.chunks, impl=self.impl,
                                  softcap=getattr(config, "final_logit_softcapping", None),
                                  ignore_index=ignore_index, num_items_in_batch=num_items_in_batch,
                                  shift_labels=shift_labels)

        self.head.armed = True
        self.head.loss = loss_of if self.in_head else None
        try:
            out = self.inner(*args, **kwargs)
            hidden = self.head.hidden
        finally:
            self.head.armed = False
            self.head.hidden = self.head.loss = None
        if hidden is None:
            raise RuntimeError("mst_hf: the model's forward did not call lm_head, so its loss cannot be "
                               "computed in mini-sequences")
        if not dataclasses.is_dataclass(out):
            raise RuntimeError(f"mst_hf: the model's forward returned a {type(out).__name__} with return_dict=True; "
                               "its loss cannot be computed in mini-sequences")
        # in_head: the model's "logits" are the loss lm_head returned (through DeepSpeed's output hook,
        # whose backward gathers the weight again)
        loss = out.logits if self.in_head else loss_of(hidden)
        # A Mixture-of-Experts model adds its router's load-balancing loss to the loss it computes with
        # labels (output_router_logits): so does this one, which took the labels away from it.
        aux = getattr(out, "aux_loss", None)
        coef = getattr(self.module, "router_aux_loss_coef", None)
        if aux is not None and coef is not None:
            loss = loss + coef * aux.to(loss.device)
        out = dataclasses.replace(out, loss=loss, logits=None)
        return out if return_dict else out.to_tuple()


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        hint = (" (Gemma-3 4B-27B: load the text decoder, Gemma3ForCausalLM.from_pretrained)"
                if type(model).__name__ == "Gemma3ForConditionalGeneration" else "")
        raise ValueError(f"mst_hf.apply: expected a causal LM with decoder layers at model.model.layers "
                         f"(Llama, Mistral, Qwen2/2.5, Qwen3, Gemma-2, Gemma-3), got {type(model).__name__}{hint}")
    return layers


# What some forwards do to lm_head's output before their loss (transformers 5.24: Granite, Cohere,
# Muse, Inkling), which a loss computed from lm_head's input would not see: the attribute, in the
# model's config or its text_config, the value that changes nothing, and what it does.
_LOGIT_TRANSFORMS = (("logits_scaling", 1.0, "divides lm_head's output by"),
                     ("logit_scale", 1.0, "multiplies lm_head's output by"),
                     ("output_multiplier", 1.0, "multiplies lm_head's output by"),
                     ("unpadded_vocab_size", None, "cuts lm_head's output to"))


def _check_lm_head(model: nn.Module, config: MstConfig) -> nn.Linear:
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise ValueError("mst_hf.apply: lm_head.chunks: expected model.lm_head to be an nn.Linear without bias, "
                         f"got {type(head).__name__}")
    if getattr(getattr(model, "config", None), "pretraining_tp", 1) > 1:
        raise ValueError("mst_hf.apply: lm_head.chunks: the model's forward splits lm_head itself "
                         "(config.pretraining_tp > 1); set config.pretraining_tp = 1")
    model_config = getattr(model, "config", None)
    for cfg in (model_config, getattr(model_config, "text_config", None)):
        for name, neutral, what in _LOGIT_TRANSFORMS:
            value = getattr(cfg, name, None)
            if value is not None and value != neutral and not (name == "unpadded_vocab_size" and value == head.out_features):
                raise ValueError(f"mst_hf.apply: lm_head.chunks: {type(model).__name__}'s forward {what} config.{name} "
                                 f"({value}) before its loss, which the chunked loss does not; use lm_head.chunks 1")
    # ZeRO-3: the loss runs inside lm_head's forward and is returned as its output (see the module's
    # doc), so nothing may change that output on its way out of the model's forward.
    softcap = getattr(model_config, "final_logit_softcapping", None)
    if config.deepspeed_zero3 and softcap is not None:
        raise ValueError("mst_hf.apply: zero_stage: with ZeRO-3 the chunked loss runs inside lm_head's forward "
                         f"and the model's forward then soft-caps its output (final_logit_softcapping {softcap}); "
                         "use lm_head.chunks 1 or zero_stage <= 2")
    return head


def _check_attention(model: nn.Module, config: MstConfig) -> None:
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl is None:
        return
    if config.attention == "eager" and impl != "eager":
        warnings.warn(f'mst_hf: the config plans "eager" attention but the model uses "{impl}": memory will be '
                      f"lower than predicted", stacklevel=3)
    if config.attention == "flash" and impl == "eager":
        warnings.warn('mst_hf: the config plans "flash" attention but the model uses "eager", which holds '
                      "[B, heads, S, S] scores: load it with attn_implementation=\"flash_attention_2\" "
                      "(or \"sdpa\")", stacklevel=3)
    if config.attention == "sdpa" and impl != "sdpa":
        warnings.warn(f'mst_hf: the config plans "sdpa" attention (transformers\' default, PyTorch\'s flash kernel) '
                      f'but the model uses "{impl}": load it with attn_implementation="sdpa"', stacklevel=3)


def apply(model: nn.Module, config: ConfigLike) -> nn.Module:
    """Patch ``model`` in place for ``config`` (an MstConfig, a path, or a dict); return it.

    Checks everything before changing anything, and raises ValueError when the
    model does not fit the config (parameter dtypes, layer indices, lm_head)
    and RuntimeError when the model was already patched.
    """
    cfg = config if isinstance(config, MstConfig) else load_config(config)
    if getattr(model, _APPLIED, None) is not None:
        raise RuntimeError("mst_hf.apply: this model is already patched (apply runs once per model; "
                           "load a fresh model to use another config)")
    layers = _decoder_layers(model)
    check_param_dtypes(model, cfg.precision, "mst_hf.apply", cfg.fsdp2)
    bad = [i for i in cfg.checkpoint_layers if i >= len(layers)]
    if bad:
        raise ValueError(f"mst_hf.apply: checkpoint_layers: expected layer indices below {len(layers)} "
                         f"(the model's decoder layers), got {bad}")
    if cfg.checkpoint_layers and getattr(model, "is_gradient_checkpointing", False):
        raise ValueError("mst_hf.apply: checkpoint_layers: Hugging Face gradient checkpointing is on for every "
                         "layer; call model.gradient_checkpointing_disable() so checkpoint_layers decides")
    if cfg.mlp.chunks > 1:
        missing = [i for i, layer in enumerate(layers) if not isinstance(getattr(layer, "mlp", None), nn.Module)]
        if missing:
            raise ValueError(f"mst_hf.apply: mlp.chunks: decoder layers {missing} have no .mlp module")
        # The tiled MLP's forward runs without autograd, so the router's logits a Mixture-of-Experts model
        # records for its load-balancing loss (output_router_logits) would carry no gradient to the router.
        moe = any(isinstance(getattr(layer.mlp, "experts", None), nn.Module) for layer in layers)
        if cfg.mlp.impl == "tiled" and moe and getattr(getattr(model, "config", None), "output_router_logits", False):
            raise ValueError("mst_hf.apply: mlp.impl: expected loop for a Mixture-of-Experts model with "
                             "config.output_router_logits (the tiled MLP's forward runs without autograd: the router "
                             "loss's gradient would not reach the router), got \"tiled\"")
    head = _check_lm_head(model, cfg) if cfg.lm_head.chunks > 1 else None
    _check_attention(model, cfg)

    for i, layer in enumerate(layers):
        if cfg.mlp.chunks > 1:
            ChunkedMlpForward(layer.mlp, cfg.mlp.chunks, cfg.mlp.impl, cfg.deepspeed_zero3).install()
        if i in cfg.checkpoint_layers:
            CheckpointedForward(layer, cfg.offload_checkpoints).install()
    capture = None
    if head is not None:
        capture = _CapturingHeadForward(head)
        capture.install()
    if capture is not None or cfg.checkpoint_layers:
        _TrainingForward(model, capture, cfg.lm_head.chunks, cfg.lm_head.impl, bool(cfg.checkpoint_layers),
                         cfg.deepspeed_zero3).install()
    setattr(model, _APPLIED, cfg)
    return model


def applied_config(model: nn.Module) -> Optional[MstConfig]:
    """The config ``apply`` patched ``model`` with, or None."""
    return getattr(model, _APPLIED, None)


def autocast(config: MstConfig, device_type: str = "cuda") -> "torch.autocast":
    """The autocast region a forward runs in: bf16 autocast for ``amp``, disabled otherwise."""
    if config.precision == "amp":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device_type, enabled=False)
