"""torch's FSDP2 (``fully_shard``) on fake tensors: one rank's step of a sharded model, its own code.

A plan with ``fsdp2`` (runtime hf, ZeRO stage 3, ``dp`` ranks) trains the Hugging Face model, patched
by ``mst_hf.apply``, with ``fully_shard`` applied to every decoder layer and then to the model (the
root, which owns the embedding, the final norm and the LM head) by ``mst_hf.shard``: one parameter group
per decoder layer, the root's own; or (``fsdp2_groups: accelerate``) as the Hugging Face Trainer's
accelerate shards an unsharded model, by accelerate's own ``fsdp2_prepare_model``: the layers, the
embedding, a tail of the final norm and the LM head, an empty root (:func:`accelerate_shard`); or
(``fsdp2_groups: axolotl``) by Axolotl's own replacement of it: the layers and a root that holds the rest,
resharded after its forward as the layers are (:func:`axolotl_shard`). Each rank
keeps a dim-0 shard of every parameter (padded to a multiple of the ranks); a group's forward
all-gathers its parameters into one buffer and copies them out into whole ones, freed again after
the layer's forward (the root keeps its own to the backward) and gathered again in backward; each
group's gradients leave it reduce-scattered into this rank's shard. All of that is torch's code
here, run for rank ``rank`` of ``ranks`` on torch's ``fake`` process group (collectives move
nothing, every tensor has its real shape) with a device mesh over it.

The optimizer is ``mst_hf.make_optimizer``'s over the sharded parameters (DTensors; its states are
shard-sized). What the recorder cannot tell by itself is marked as the step shows it: the gathered
buffers and whole parameters are weights; the whole gradients, the reduce-scatter buffers and the
sharded gradients are gradients. The sharded parameters are registered as the ``init`` weights.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Tuple


class Fsdp2:
    """FSDP2's world for one rank: made before the fake tensors' session (the device mesh is real),
    used by :meth:`shard` inside it, and closed after the step."""

    def __init__(self, ranks: int, rank: int = 0) -> None:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.testing._internal.distributed.fake_pg import FakeStore

        if not 0 <= rank < ranks:
            raise ValueError(f"fsdp2: rank: expected 0 .. {ranks - 1}, got {rank}")
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=ranks)
        self.ranks, self.rank = ranks, rank
        self.mesh = init_device_mesh("cpu", (ranks,), mesh_dim_names=("dp_shard",))
        self.recorder: Any = None  # set once the step is recorded: marking() tells it the categories

    def shard(self, model: Any, config: Any) -> Any:
        """The model sharded as the plan's users shard it, over this world's mesh: ``mst_hf.shard`` (fully_shard
        on every decoder layer, then the model; bf16-master under its bf16 mixed-precision policy), or, for
        ``fsdp2_groups: accelerate``, accelerate's own ``fsdp2_prepare_model`` (:func:`accelerate_shard`)."""
        import mst_hf

        if config.fsdp2_groups == "accelerate":
            return accelerate_shard(model, config, self.mesh)
        if config.fsdp2_groups == "axolotl":
            return axolotl_shard(model, config, self.mesh)
        return mst_hf.shard(model, config, self.mesh)

    @staticmethod
    def sharded_tensors(model: Any) -> Iterator[Tuple[str, Any]]:
        """Each parameter's local shard (its padded storage), by name: the weights every step holds."""
        for name, p in model.named_parameters():
            yield name, p.to_local()

    @contextlib.contextmanager
    def marking(self) -> Iterator[None]:
        """FSDP2's buffers get their categories as the step makes them (while a recorder is set)."""
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

        saved = (FSDPParamGroup.unshard, FSDPParamGroup.wait_for_unshard, FSDPParamGroup.post_backward)
        world = self

        def unshard(group: Any, *args: Any, **kwargs: Any) -> Any:
            out = saved[0](group, *args, **kwargs)
            result = group._all_gather_result
            if world.recorder is not None and result is not None:
                world.recorder.mark([result.all_gather_output], "weights")
            return out

        def wait_for_unshard(group: Any, *args: Any, **kwargs: Any) -> Any:
            out = saved[1](group, *args, **kwargs)
            if world.recorder is not None:
                world.recorder.mark([fp.unsharded_param for fp in group.fsdp_params], "weights")
            return out

        def post_backward(group: Any, *args: Any, **kwargs: Any) -> Any:
            if world.recorder is not None:
                world.recorder.mark(_unsharded_grads(group), "gradients")
            out = saved[2](group, *args, **kwargs)
            if world.recorder is not None:
                world.recorder.mark(_reduce_scatter_buffers(group), "gradients")
            return out

        FSDPParamGroup.unshard, FSDPParamGroup.wait_for_unshard, FSDPParamGroup.post_backward = (
            unshard, wait_for_unshard, post_backward)
        try:
            yield
        finally:
            FSDPParamGroup.unshard, FSDPParamGroup.wait_for_unshard, FSDPParamGroup.post_backward = saved

    def close(self) -> None:
        import torch.distributed as dist

        self.recorder = None
        if dist.is_initialized():
            dist.destroy_process_group()


def accelerate_shard(model: Any, config: Any, mesh: Any) -> Any:
    """accelerate's ``fsdp2_prepare_model`` run on ``model`` (patched by mst_hf.apply), as the Hugging Face Trainer's
    ``prepare`` runs it with ``fsdp_version: 2``: ``bf16=False`` for pure-bf16 (``mixed_precision`` "no": no
    upcast, no policy), ``bf16=True`` for bf16-master (fp32 parameters under the plugin's
    ``MixedPrecisionPolicy(bf16, bf16, output bf16)``); its transformer auto-wrap policy over the model's
    ``_no_split_modules``, the plugin's ``reshard_after_forward`` (the plan's), this world's mesh. The
    accelerator is a stand-in that carries just what ``fsdp2_prepare_model`` reads of it; the sharding is
    accelerate's code. accelerate comes from ``MST_CLIENTS_PATH`` (scripts/test installs it there)."""
    from .jobs import CrosscheckError

    try:
        from accelerate.utils import FullyShardedDataParallelPlugin
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    except ImportError as e:
        raise CrosscheckError("setup: fsdp2_groups: expected accelerate importable for \"accelerate\" (put "
                              f"MST_CLIENTS_PATH, which scripts/test installs, on PYTHONPATH): {e}") from None
    # bf16-master is the Trainer's bf16=True: AcceleratorState sets the plugin's policy (state.py:1014-1015), and
    # fsdp2_prepare_model upcasts any bf16 parameter to fp32 (the referee's are fp32 already)
    accelerator = _stand_in(FullyShardedDataParallelPlugin, config, mesh, "bf16" if config.precision == "bf16-master" else "no")
    accelerator.state.fsdp_plugin.set_auto_wrap_policy(model)
    return fsdp2_prepare_model(accelerator, model)


def axolotl_shard(model: Any, config: Any, mesh: Any) -> Any:
    """Axolotl's own ``fsdp2_prepare_model`` (``axolotl/monkeypatch/accelerate/fsdp2.py``, which Axolotl puts in
    accelerate's place for any ``fsdp_config``) run on ``model`` (bf16, patched by mst_hf.apply) as an Axolotl
    config with ``bf16: true`` and ``fsdp_config: {fsdp_version: 2, reshard_after_forward: <the plan's>}`` has
    accelerate call it: the plugin's transformer auto-wrap over the model's ``_no_split_modules``, its bf16
    policy (``MixedPrecisionPolicy(bf16, bf16, output bf16)``: accelerate's ``set_mixed_precision``), no
    CPU-RAM-efficient loading (the emitted config's ``cpu_ram_efficient_loading: true`` moves the model to the meta
    device first, which fake tensors cannot: the step's shards are the same, its loading path is not run), this
    world's mesh. The accelerator is a stand-in carrying what the function reads
    of it; the sharding is Axolotl's code. It runs in Axolotl's environment (its torch, 2.14, and transformers),
    where Axolotl is importable."""
    from .jobs import CrosscheckError

    try:
        from accelerate.utils import FullyShardedDataParallelPlugin
        from axolotl.monkeypatch.accelerate.fsdp2 import fsdp2_prepare_model
    except ImportError as e:
        raise CrosscheckError("setup: fsdp2_groups: expected Axolotl importable for \"axolotl\" (run the referee with "
                              f"Axolotl's Python, .venv/clients-axolotl, which scripts/test installs): {e}") from None
    # (Axolotl's bf16: true: ACCELERATE_MIXED_PRECISION=bf16; its function sets the wrap policy itself)
    return fsdp2_prepare_model(_stand_in(FullyShardedDataParallelPlugin, config, mesh, "bf16"), model)


def _stand_in(plugin_class: Any, config: Any, mesh: Any, mixed_precision: str) -> Any:
    """The accelerator a ``fsdp2_prepare_model`` reads, as a stand-in: the plugin the Trainer's TrainingArguments
    builds for ``fsdp_config {"version": 2}`` (its default transformer-based wrap, no CPU-RAM-efficient loading, the
    plan's ``reshard_after_forward``; transformers 5.24 ``training_args.py:2825-2861``) with accelerate's policy for
    ``mixed_precision`` ("bf16": ``set_mixed_precision``), and this world's mesh (where accelerate reads it and where
    Axolotl does: ``state.device_mesh``)."""
    from types import SimpleNamespace

    plugin = plugin_class(fsdp_version=2, auto_wrap_policy="transformer_based_wrap", cpu_ram_efficient_loading=False,
                          reshard_after_forward=config.fsdp2_reshard_after_forward)
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    parallelism = SimpleNamespace(fsdp_dim_names=mesh.mesh_dim_names)
    return SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin, device_mesh=mesh, parallelism_config=parallelism),
        mixed_precision=mixed_precision, is_main_process=True, device=mesh.device_type, torch_device_mesh=mesh,
        parallelism_config=parallelism)


def _unsharded_grads(group: Any) -> List[Any]:
    """The whole gradients a group's post-backward is about to reduce: each unsharded parameter's ``.grad``
    (and an accumulated one, where FSDP2 keeps its own)."""
    out: List[Any] = []
    for fp in group.fsdp_params:
        whole = getattr(fp, "_unsharded_param", None)
        out += [getattr(fp, "unsharded_accumulated_grad", None), whole.grad if whole is not None else None]
    return out


def _reduce_scatter_buffers(group: Any) -> List[Any]:
    """The reduce-scatter's input buffers FSDP2 holds on to, and the sharded gradients (views of its output)."""
    out: List[Any] = []
    for state in getattr(group.comm_ctx, "reduce_scatter_states", []) or []:
        out.append(getattr(state, "reduce_scatter_input", None))
    for fp in group.fsdp_params:
        grad = fp.sharded_param.grad
        out.append(grad.to_local() if grad is not None else None)
    return out
