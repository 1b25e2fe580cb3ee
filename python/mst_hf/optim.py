"""The optimizer that an hf-mst config plans for.

* ``adamw``: ``torch.optim.AdamW``;
* ``adamw-8bit``: ``bitsandbytes.optim.AdamW8bit`` (blockwise 8-bit states;
  tensors under 4096 elements keep 32-bit states);
* ``sgd``: ``torch.optim.SGD`` with momentum.

``optimizer.impl`` picks torch's implementation (AdamW and SGD): ``foreach`` (torch's
default for CUDA tensors: list-wide kernels, whose temporaries cover a whole state list at
once), ``fused`` (one kernel, no temporaries) or ``for-loop`` (one parameter at a time).

torch keeps optimizer states in the dtype of the tensors it updates. So with
``pure-bf16`` the parameters are bf16 and so are the states; with
``bf16-master`` the optimizer updates fp32 master copies of the bf16
parameters (fp32 states) and copies the result back; with ``amp`` the
parameters and the states are fp32. ``optimizer.state_dtype`` must agree
(8-bit states do not depend on it).

With ``bf16-master`` each bf16 gradient is moved into an fp32 gradient of its
master as soon as autograd has accumulated it (a post-accumulate-grad hook),
so the gradients held between backward and step are fp32, as in DeepSpeed.

With ``optimizer.in_backward`` each parameter has its own optimizer, stepped
by a post-accumulate-grad hook as soon as its gradient is complete, which
then drops the gradient (the MsT benchmark): no full set of gradients ever
exists. The object returned has a ``step`` and ``zero_grad`` that do nothing,
so a training loop reads the same either way. Gradient clipping and
accumulation over micro-steps cannot work this way, so ``grad_accum`` must be 1.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ._torch import PARAM_DTYPES, check_param_dtypes
from .config import MstConfig

Factory = Callable[[List[Tensor]], torch.optim.Optimizer]
_HOOK_API = "register_post_accumulate_grad_hook"


def _factory(config: MstConfig, lr: float, weight_decay: float, betas: Tuple[float, float], eps: float,
             momentum: float) -> Factory:
    """A function that builds the configured optimizer over a list of tensors."""
    name = config.optimizer.name
    impl = {"foreach": {"foreach": True}, "fused": {"fused": True}, "for-loop": {"foreach": False}}[config.optimizer.impl]
    if name == "adamw":
        return lambda ps: torch.optim.AdamW(ps, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **impl)
    if name == "sgd":
        return lambda ps: torch.optim.SGD(ps, lr=lr, momentum=momentum, weight_decay=weight_decay, **impl)
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError('optimizer.name "adamw-8bit" needs bitsandbytes (pip install bitsandbytes)') from e
    return lambda ps: bnb.optim.AdamW8bit(ps, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def _check_state_dtype(config: MstConfig) -> None:
    if config.optimizer.name == "adamw-8bit":
        return
    state = torch.float32 if config.precision == "bf16-master" else PARAM_DTYPES[config.precision]
    planned = torch.float32 if config.optimizer.state_dtype == "fp32" else torch.bfloat16
    if state != planned:
        have = "fp32" if state == torch.float32 else "bf16"
        hint = ('use precision "bf16-master" for fp32 states of bf16 parameters'
                if config.precision == "pure-bf16" else
                f'precision "{config.precision}" updates fp32 tensors')
        raise ValueError(f'make_optimizer: optimizer.state_dtype: expected "{have}" (torch keeps states '
                         f'in the dtype of the tensors it updates; {hint}), got "{config.optimizer.state_dtype}"')


def _fp32_copy(param: Tensor) -> Tensor:
    """The fp32 master copy of a bf16 parameter (same shape, its own storage)."""
    return torch.empty_like(param, dtype=torch.float32).copy_(param.detach())


class InBackwardOptimizer:
    """Per-parameter optimizers stepped inside backward; ``step`` and ``zero_grad`` do nothing.

    ``param_groups`` lists the groups of all per-parameter optimizers, so a
    learning-rate change (``for g in opt.param_groups: g["lr"] = ...``) reaches
    every one of them.
    """

    def __init__(self, optimizers: Dict[Tensor, torch.optim.Optimizer], handles: List[Any]) -> None:
        self.optimizers = optimizers
        self._handles = handles

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step(self, closure: Optional[Callable[[], Any]] = None) -> None:
        """Nothing to do: every parameter was stepped when its gradient was ready."""
        if closure is not None:
            raise ValueError("InBackwardOptimizer.step: a closure cannot re-run backward here")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: the hooks drop every gradient right after its step."""

    def state_dict(self) -> Dict[str, Any]:
        return {"per_parameter": [opt.state_dict() for opt in self.optimizers.values()]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        saved = state["per_parameter"]
        if len(saved) != len(self.optimizers):
            raise ValueError(f"InBackwardOptimizer.load_state_dict: expected {len(self.optimizers)} "
                             f"per-parameter states, got {len(saved)}")
        for opt, s in zip(self.optimizers.values(), saved):
            opt.load_state_dict(s)

    def remove_hooks(self) -> None:
        """Stop stepping in backward (the parameters keep their current values)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


class MasterWeightOptimizer:
    """bf16 parameters updated through fp32 master copies (precision ``bf16-master``).

    ``inner`` is the configured optimizer over the masters. ``step`` steps it
    and copies the masters back into the bf16 parameters.
    """

    def __init__(self, params: List[Tensor], factory: Factory) -> None:
        self.params = params
        self.masters = [_fp32_copy(p) for p in params]
        self.inner = factory(self.masters)
        self._master_of = {id(p): m for p, m in zip(params, self.masters)}
        # torch < 2.1 has no such hook: step() then folds the gradients instead.
        self._handles = [getattr(p, _HOOK_API)(self._fold_grad) for p in params] if hasattr(Tensor, _HOOK_API) else []

    def _fold_grad(self, param: Tensor) -> None:
        """Move param.grad (bf16) into its master's fp32 gradient."""
        if param.grad is None:
            return
        master = self._master_of[id(param)]
        if master.grad is None:
            master.grad = param.grad.to(torch.float32)
        else:
            master.grad.add_(param.grad)
        param.grad = None

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        return self.inner.param_groups

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip the fp32 master gradients (the bf16 parameters hold none); return the total norm."""
        for p in self.params:
            self._fold_grad(p)
        return torch.nn.utils.clip_grad_norm_(self.masters, max_norm)

    @property
    def state(self) -> Any:
        return self.inner.state

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        for p in self.params:  # gradients that no hook moved
            self._fold_grad(p)
        loss = self.inner.step(closure)
        for p, m in zip(self.params, self.masters):
            p.copy_(m)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> Dict[str, Any]:
        return {"inner": self.inner.state_dict(), "masters": [m.clone() for m in self.masters]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if len(state["masters"]) != len(self.masters):
            raise ValueError(f"MasterWeightOptimizer.load_state_dict: expected {len(self.masters)} masters, "
                             f"got {len(state['masters'])}")
        with torch.no_grad():
            for p, m, saved in zip(self.params, self.masters, state["masters"]):
                m.copy_(saved)
                p.copy_(m)
        self.inner.load_state_dict(state["inner"])

    def remove_hooks(self) -> None:
        """Leave gradients in the bf16 parameters until ``step`` (which still folds them)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _in_backward(params: List[Tensor], factory: Factory, master: bool) -> InBackwardOptimizer:
    if not hasattr(Tensor, _HOOK_API):
        raise RuntimeError(f"optimizer.in_backward needs torch >= 2.1 (Tensor.{_HOOK_API}); "
                           f"this is torch {torch.__version__}")
    optimizers: Dict[Tensor, torch.optim.Optimizer] = {}
    handles = []
    for p in params:
        copy = _fp32_copy(p) if master else None
        opt = factory([p if copy is None else copy])
        optimizers[p] = opt
        handles.append(getattr(p, _HOOK_API)(_step_hook(opt, copy)))
    return InBackwardOptimizer(optimizers, handles)


def _step_hook(opt: torch.optim.Optimizer, master: Optional[Tensor]) -> Callable[[Tensor], None]:
    """The hook that steps ``opt`` for one parameter and frees its gradient."""

    @torch.no_grad()
    def hook(param: Tensor) -> None:
        if param.grad is None:
            return
        if master is None:
            opt.step()
        else:
            master.grad = param.grad.to(torch.float32)
            opt.step()
            master.grad = None
            param.copy_(master)
        param.grad = None

    return hook


def make_optimizer(model: nn.Module, config: MstConfig, *, lr: float, weight_decay: float = 0.0,
                   betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                   momentum: float = 0.9) -> Any:
    """The optimizer ``config.optimizer`` describes, over the model's trainable parameters.

    Returns a ``torch.optim.Optimizer``, a :class:`MasterWeightOptimizer`
    (precision ``bf16-master``) or an :class:`InBackwardOptimizer`
    (``optimizer.in_backward``); all three have ``step()`` and ``zero_grad()``.
    Raises ValueError when the model's parameter dtypes or the config's
    state dtype and gradient accumulation do not fit.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("make_optimizer: the model has no parameter that requires grad")
    check_param_dtypes(model, config.precision, "make_optimizer", config.fsdp2)
    _check_state_dtype(config)
    if config.optimizer.in_backward and config.grad_accum != 1:
        raise ValueError(f"make_optimizer: grad_accum: optimizer.in_backward steps in every backward, "
                         f"so gradients cannot be accumulated; expected 1, got {config.grad_accum}")
    if config.fsdp2 and not all(hasattr(p, "to_local") for p in params):
        raise ValueError("make_optimizer: fsdp2: expected the model sharded by mst_hf.shard first (its parameters are "
                         "then DTensors: the optimizer steps this rank's shards)")
    factory = _factory(config, lr, weight_decay, betas, eps, momentum)
    # (FSDP2's fp32 parameters are the master weights: its policy computes with bf16 copies of them)
    master = config.precision == "bf16-master" and not config.fsdp2
    if config.optimizer.in_backward:
        return _in_backward(params, factory, master)
    if master:
        return MasterWeightOptimizer(params, factory)
    return factory(params)
