"""torch's FSDP2 as an ``fsdp2`` plan shards the model: ``fully_shard`` on every decoder layer, then on the model.

mst-plan's prediction of an ``fsdp2`` plan (``zero_stage`` 3 over ``data_parallel`` ranks) is for this layout
and nothing else: one parameter group per decoder layer (gathered for its forward and again for its
backward), the model's own group (embedding, final norm, LM head: gathered from its forward to the end of
backward), the default prefetching (none in forward, one group ahead in backward) and resharding. With
precision ``pure-bf16`` the parameters are bf16 as stored; with ``bf16-master`` they are stored in fp32 and
gathered in bf16, the gradients reduced in fp32 (``MixedPrecisionPolicy(bfloat16, float32)``, torchtitan's
default), so the fp32 shards are the master weights and :func:`mst_hf.make_optimizer` steps them.

Call it after :func:`mst_hf.apply` and before :func:`mst_hf.make_optimizer`, in every rank of a process group
of ``data_parallel`` ranks (``torchrun --nproc-per-node N``)::

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)   # bf16-master (bfloat16: pure-bf16)
    mst_hf.apply(model, config)
    mst_hf.shard(model, config)
    optimizer = mst_hf.make_optimizer(model, config, lr=1e-5)
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .config import MstConfig, load_config


def _layers(model: nn.Module) -> Any:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError("mst_hf.shard: expected a causal LM whose decoder layers are model.model.layers")
    return layers


def shard(model: nn.Module, config: Any, mesh: Optional[Any] = None) -> nn.Module:
    """``fully_shard`` every decoder layer and then ``model`` as ``config`` (an ``fsdp2`` plan: an MstConfig, a
    path or a mapping) was planned, over ``mesh`` (default: a 1-D mesh of the default process group's ranks on
    the current accelerator). ``model`` must have been patched by :func:`mst_hf.apply` with the same plan.
    Returns ``model``, now an FSDP module. Raises ValueError for a config that is not FSDP2's, a model not
    patched for it, or a mesh that is not one dimension of ``config.data_parallel`` ranks (HSDP's 2-D meshes
    are not what the plan predicts)."""
    from .patch import applied_config

    config = config if isinstance(config, MstConfig) else load_config(config)
    if not config.fsdp2:
        raise ValueError("mst_hf.shard: fsdp2: expected a config planned for torch's FSDP2 (fsdp2: true), got false")
    if config.fsdp2_groups != "mst_hf":
        who = ("hand the model unsharded to the Hugging Face Trainer with accelerate's fsdp_version 2"
               if config.fsdp2_groups == "accelerate" else "train it with Axolotl's fsdp_config: emit --format axolotl")
        raise ValueError(f"mst_hf.shard: fsdp2_groups: expected mst_hf (this plan's groups are {config.fsdp2_groups}'s: "
                         f"{who}), got {config.fsdp2_groups!r}")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mesh is None:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():
            raise ValueError("mst_hf.shard: mesh: expected one, or an initialized process group (torchrun) to make it")
        device = torch.accelerator.current_accelerator().type if torch.accelerator.is_available() else "cpu"
        mesh = init_device_mesh(device, (dist.get_world_size(),))
    if mesh.ndim != 1 or mesh.size() != config.data_parallel:
        raise ValueError(f"mst_hf.shard: data_parallel: expected a one-dimensional mesh of {config.data_parallel} ranks "
                         f"(the plan's), got {mesh.ndim} dimension(s) of {mesh.size()} ranks")
    if applied_config(model) != config:
        raise ValueError("mst_hf.shard: model: expected a model patched by mst_hf.apply with this config first "
                         "(apply, then shard, then make_optimizer)")
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if config.precision == "bf16-master" else MixedPrecisionPolicy())
    for layer in _layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=config.fsdp2_reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model
