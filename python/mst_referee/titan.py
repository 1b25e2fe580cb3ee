"""torchtitan 0.3.0 as the trainer: one rank's step of an emitted ``mst_torchtitan.py``, every storage recorded.

A plan for torchtitan (``mst-plan emit --format torchtitan``) becomes a config module that torchtitan's
``ConfigManager`` loads (``--module mst_torchtitan --config mst_plan``). This module loads it the same
way, builds what torchtitan's ``Trainer.__init__`` builds from it (the model config fitted to the run by
``update_from_config``, the model on the meta device in the training dtype, the model's
``parallelize_fn``: full activation checkpointing and ``fully_shard`` over the data-parallel mesh, which
torchtitan applies on one GPU too; the weights materialized and the buffers initialized by the model's
own ``init_weights``; the loss, with ``ChunkedLossWrapper`` taking the LM head; the optimizers and the
LR schedulers), and runs ``Trainer.train_step``'s body: zero the gradients, per micro-batch copy
the batch (tokens, labels, positions) to the device, build the attention masks, forward, loss and
backward; then clip the gradients' norm (``max_norm``, foreach) and step. It records one optimizer step
after one warm-up step (the optimizer's states exist then) as the referee records a plain one
(:class:`mst_referee.recorder.StorageRecorder`), and writes a referee measurement (``mst-measure/1``)
that ``mst-plan compare --run`` re-simulates with the plan's setup.

The world is torch's ``fake`` process group of the plan's ranks (this rank's shards have their real
shapes, collectives move nothing); the tensors are fake (:mod:`mst_referee.fake`), on the CPU, where
torchtitan's device mesh is built. Where the CPU would run another code path than a GPU, a stand-in
allocates what the GPU's does (:mod:`mst_referee.titan_kernels`: the fused RMSNorm, compiled flex
attention and block masks, and transformers' flex attention as the transformers backend calls it).
These places need values fake tensors do not have, and are answered as a run answers them:

* weight initialization (``_init_self_parameters``, and the transformers backend's ``_init_weights``
  through ``torch.nn.init``: truncated normal and uniform draws) is skipped: it writes values into the
  materialized weights and allocates nothing that outlives it; the buffers (the RoPE tables, the
  backend's rotary frequencies) are initialized by torchtitan's own code;
* the batch is one document per sequence (positions 0 .. S-1, labels all valid), as a run on long
  documents sees it;
* expert parallelism's token counts, which its all-to-all dispatcher brings to the host to size its
  exchanges, are the routing mst-plan plans: uniform, or ``moe_imbalance`` times as many pairs received
  by this rank's experts (:func:`mst_referee.titan_kernels.token_counts`).

What exists before the recorded step is registered as ``init``: this rank's parameter shards
(weights), the model's buffers (weights), the optimizer's states (their shards) and the previous step's
gradients (torchtitan sets them to None as the next step begins). FSDP2's buffers are
marked as it makes them (:class:`mst_referee.fsdp2.Fsdp2`), each checkpointed block's input as a
checkpoint.

Recorded are the first micro-step, the last (as micro-step 1: it stands for the others) and the optimizer
step; of the micro-steps between only the inputs and positions the step keeps to its end (two int64 [B, S]
tensors each, so that the last holds them all, as it does), the loss of the one before the last (which the
last holds to its end: registered as its backward returns) and the frees of recorded tensors;
a step that logs (its loss's copies, a few scalars) is not run. The module must be the plan's: every
knob mst-plan's emitter writes is compared with the plan (model dimensions, batch, ranks, dtypes,
resharding, checkpoints, the loss's chunks, the optimizer, flex attention), and a difference is one
line naming the field. Data parallelism without ZeRO (mst-plan emits it for ZeRO 0 on several
GPUs) is torchtitan's replicate degree over shards of one rank: FSDP2 on a (replicate, shard) mesh
whose shards are whole, each rank's tensors a one-GPU run's (the mesh's own bookkeeping is made outside
the fake tensors, as on a GPU: :func:`_real_meshes`). Models other than torchtitan's own train through
its transformers backend (``hf_model``, held to the plan model's repository): the Hugging Face model
built from the plan's own config.json (the repository's, which a run fetches: :func:`_hf_assets`),
the masks made inside its forward, not by the step; the module's flavor must be the one mst-plan
writes (``full``), the model built must have the plan model's sizes (:func:`check_built`), and a model
torchtitan trains with its own code is refused through the backend (:func:`_native_flavor`). The ranks
replicate exactly where the plan has ZeRO 0 on several GPUs. Its Mixture-of-Experts models swap in
torchtitan's MoE, materialized on the CPU inside ``parallelize`` (:func:`_moe_materialized`). Refused by
name: what the backend cannot build, and mst-plan does not emit (Gemma-2/3, Phi-3, a MoE model in pure
bf16); tensor, pipeline and context parallelism, compile, CPU offload and CUDA graphs, none of which
mst-plan emits. Expert parallelism runs as the plan has it (``expert_parallel_degree``, the plan's ``ep``):
torchtitan's experts sharded over ep of the FSDP ranks, their tokens exchanged by all-to-all.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Tuple

from mst_clients.titan import FUNCTION, MODULE

from .jobs import CrosscheckError, check_plan, checkpoint_layers_from_spec, fail, hf_config_dict, resolve_model
from .step import Observer, to_device

IGNORE_INDEX = -100  # torchtitan.components.loss.IGNORE_INDEX


def load_config(module_dir: Path) -> Any:
    """The emitted module as ``torchrun -m torchtitan.train --module mst_torchtitan --config mst_plan`` reads it from
    ``module_dir`` (torchtitan's ConfigManager: :func:`mst_clients.titan.load`); one that does not load is one line."""
    from mst_clients.titan import load

    if not (module_dir / f"{MODULE}.py").is_file():
        fail(str(module_dir), MODULE, f"expected {MODULE}.py (mst-plan emit --format torchtitan --out {module_dir})")
    try:
        return load(module_dir)
    except (Exception, SystemExit) as e:  # (torchtitan's own refusal of the module, or the module's, in one line)
        cause = f" (from {type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ is not None else ""
        fail(str(module_dir / f"{MODULE}.py"), FUNCTION,
             f"a config torchtitan loads; it raised {type(e).__name__}: {e}{cause}")


def plan_facts(plan: Any, where: str) -> Dict[str, Any]:
    """What the referee reads of a plan, each of its writer's type: its GPUs, its model (catalog name or config
    path, with the config) and its setup's knobs (mst-plan's defaults where the setup leaves one out)."""
    from .jobs import read_json

    setup = check_plan(plan, where)["setup"]
    facts: Dict[str, Any] = {}
    for key, default in (("gpus", None), ("dp", 1), ("sp", 1), ("micro_batch", 1), ("grad_accum", 1), ("seq_len", None),
                         ("zero_stage", 0), ("lm_chunks", 1), ("ep", 1)):
        value = (plan if key == "gpus" else setup).get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "zero_stage" else 1):
            fail(where, key if key == "gpus" else f"setup.{key}", f"expected a positive integer, got {value!r}")
        facts[key] = value
    for key, default in (("precision", "pure-bf16"), ("optimizer", "adamw"), ("optimizer_impl", "fused")):
        value = setup.get(key, default)
        if not isinstance(value, str):
            fail(where, f"setup.{key}", f"expected a string, got {value!r}")
        facts[key] = value
    imbalance = setup.get("moe_imbalance", 1.0)
    if isinstance(imbalance, bool) or not isinstance(imbalance, (int, float)) or not 1.0 <= imbalance <= facts["ep"]:
        fail(where, "setup.moe_imbalance", f"expected a number from 1 to the setup's ep ({facts['ep']}), got {imbalance!r}")
    facts["moe_imbalance"] = float(imbalance)
    reshard = setup.get("fsdp2_reshard_after_forward", True)  # (false: torchtitan's fsdp_reshard_after_forward never)
    if not isinstance(reshard, bool):
        fail(where, "setup.fsdp2_reshard_after_forward", f"expected true or false, got {reshard!r}")
    facts["fsdp2_reshard_after_forward"] = reshard
    if facts["gpus"] != facts["dp"] * facts["sp"]:
        fail(where, "gpus", f"expected the setup's dp x sp ({facts['dp']} x {facts['sp']}), got {facts['gpus']}")
    try:
        name, path = resolve_model(plan["model"])
    except CrosscheckError as e:  # (named in the plan's file)
        raise CrosscheckError(f"{where}: {e}") from None
    facts["model_name"], facts["model_path"] = name, str(path)
    facts["hf_config"] = read_json(path, "the plan's model config")
    facts["checkpoint"] = setup.get("checkpoint", [])
    if facts["ep"] > 1:  # (mst-plan's validate and torchtitan emitter: the experts over ep of the FSDP ranks)
        from mst_clients.matrix import expert_count

        experts = expert_count(facts["hf_config"])
        if facts["zero_stage"] == 0 or facts["dp"] % facts["ep"] or experts % facts["ep"]:
            fail(where, "setup.ep", f"expected a divisor of dp ({facts['dp']}) and of the model's experts ({experts}) "
                 f"with ZeRO 2 or 3 (torchtitan takes its expert-parallel ranks from the FSDP ones), got {facts['ep']} "
                 f"with ZeRO {facts['zero_stage']}")
    return facts


def check_config(config: Any, plan: Mapping[str, Any], where: str) -> None:
    """The layouts this referee runs, and the module is the plan's: every knob mst-plan's emitter writes
    (:func:`mst_clients.titan.plan_rows`: batch, dtypes, resharding, checkpoints, the loss's chunks, the
    optimizer, the attention), the model's dimensions and the ranks as the plan has them (``plan``:
    :func:`plan_facts`)."""
    from mst_clients.matrix import moe_config
    from mst_clients.titan import hf_repo, plan_rows

    par, training, gpus = config.parallelism, config.training, plan["gpus"]
    # The plan's ranks replicate where it has data parallelism without ZeRO (torchtitan's replicate degree over whole
    # shards: FSDP2 on a (replicate, shard 1) mesh), else shard (FSDP2 over all of them; -1: every GPU)
    replicate, shard = par.data_parallel_replicate_degree, par.data_parallel_shard_degree
    replicated = gpus > 1 and plan["zero_stage"] == 0
    if replicated and (replicate, shard) != (gpus, 1):
        fail(where, "parallelism.data_parallel_replicate_degree",
             f"expected the plan's {gpus} ranks replicating whole shards (ZeRO 0: replicate degree {gpus}, shard degree "
             f"1), got replicate {replicate} and shard {shard}")
    if not replicated and (replicate, shard) not in ((1, -1), (1, gpus)):
        fail(where, "parallelism.data_parallel_shard_degree",
             f"expected the plan's {gpus} rank{'s' if gpus > 1 else ''} sharding (ZeRO {plan['zero_stage']}: replicate "
             f"degree 1, shard degree {gpus} or -1), got replicate {replicate} and shard {shard}")
    model, hf = config.model_spec.model, plan["hf_config"]
    if _backend(config):  # (the model is built from the plan's own config.json: _hf_assets; its dimensions: check_built)
        native = _native_flavor(hf)
        if native:
            fail(where, "model_spec", f"torchtitan's own {native} (what mst-plan emits for {hf.get('model_type')} of "
                 f"these dimensions), got the transformers backend")
        moe = moe_config(hf)
        if moe and plan["precision"] == "pure-bf16":
            fail(where, "training.dtype", "float32 parameters for a Mixture-of-Experts model through the transformers "
                 "backend (it builds torchtitan's MoE in fp32 beside the bf16 layers, which FSDP2 refuses; mst-plan's "
                 "emitter refuses pure-bf16 here), got bfloat16")
        if hf.get("model_type") in _UNBUILDABLE:
            fail(where, "model_spec", f"a model torchtitan 0.3.0's transformers backend can build (mst-plan's emitter "
                 f"refuses {hf.get('model_type')}: {_UNBUILDABLE[hf.get('model_type')]}), got {config.hf_model}")
        rows = [("hf_model", "Hugging Face model", config.hf_model, hf_repo(hf)),
                ("model_spec.flavor", "the backend's flavor", config.model_spec.flavor, "full_moe" if moe else "full")]
        layers = hf.get("num_hidden_layers")
    else:
        attention = model.layers[0].attention
        rows = [
            ("model.dim", "hidden size", model.dim, hf.get("hidden_size")),
            ("model.layers", "layers", len(model.layers), hf.get("num_hidden_layers")),
            ("model.vocab_size", "vocabulary", model.vocab_size, hf.get("vocab_size")),
            ("model.layers[0].attention.n_heads", "attention heads", attention.n_heads, hf.get("num_attention_heads")),
            ("model.layers[0].attention.n_kv_heads", "key/value heads", attention.n_kv_heads or attention.n_heads,
             hf.get("num_key_value_heads", hf.get("num_attention_heads"))),
        ]
        layers = len(model.layers)
    rows += [("training.global_batch_size", "global batch", training.global_batch_size,
              plan["micro_batch"] * gpus * plan["grad_accum"])] + plan_rows(config, plan, layers)
    for field_name, _, got, expected in rows:
        if got != expected:
            fail(where, field_name, f"expected the plan's {expected}, got {got}")


# What torchtitan 0.3.0's transformers backend cannot build, by its own errors (src/core/emit/torchtitan.cpp refuses
# to emit them)
_UNBUILDABLE = {
    "gemma2": "its scaled embedding's forward takes input_ids, where the sharding config names input",
    "gemma3_text": "its scaled embedding's forward takes input_ids, where the sharding config names input",
    "phi3": "its fused qkv_proj is no query projection hf_sharding.py recognises",
}


def _native_flavor(hf: Mapping[str, Any]) -> str:
    """The flavor of torchtitan's own code that mst-plan's emitter writes for a dense model of this config.json
    (src/core/emit/torchtitan.cpp, titan_model: a Llama or Qwen3 without biases or a rotary scaling torchtitan's RoPE
    cannot restate, every dimension a flavor's, as torchtitan's registry builds them), or "" (the transformers
    backend's)."""
    from torchtitan.models.llama3 import llama3_configs, model_registry as llama3
    from torchtitan.models.qwen3 import model_registry as qwen3, qwen3_configs

    families = {"llama": ("torchtitan.models.llama3", llama3, llama3_configs),
                "qwen3": ("torchtitan.models.qwen3", qwen3, qwen3_configs)}
    rope = hf.get("rope_scaling") or {}
    scaling = rope.get("rope_type") or rope.get("type") or "default"  # (transformers' two spellings)
    if hf.get("model_type") not in families or hf.get("attention_bias") or hf.get("mlp_bias") or \
            scaling not in ("default", "llama3"):
        return ""
    package, registry, flavors = families[hf["model_type"]]
    heads = hf.get("num_attention_heads")
    wanted = (hf.get("hidden_size"), hf.get("num_hidden_layers"), hf.get("vocab_size"), heads,
              hf.get("num_key_value_heads", heads), hf.get("head_dim") or hf.get("hidden_size", 0) // (heads or 1),
              hf.get("intermediate_size"), bool(hf.get("tie_word_embeddings", False)))
    for flavor in flavors:
        c = registry(flavor).model
        layer = c.layers[0]
        if layer.moe is not None:  # (a Mixture-of-Experts config is refused through the backend by name)
            continue
        a = layer.attention
        head_dim = a.qkv_linear.head_dim if getattr(a, "qkv_linear", None) is not None else a.head_dim
        if (c.dim, len(c.layers), c.vocab_size, a.n_heads, a.n_kv_heads or a.n_heads, head_dim,
                layer.feed_forward.w1.out_features, c.enable_weight_tying) == wanted:
            return f"{package} {flavor}"
    return ""


def check_built(titan: "Titan", hf: Mapping[str, Any], where: str) -> None:
    """The transformers backend's model as built (its config after update_from_config, where a flavor or the module
    could still have set other sizes than the plan's config.json) has the plan model's dimensions."""
    if not _backend(titan.config):
        return
    built = titan.model_config
    for key in ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads", "num_key_value_heads",
                "intermediate_size"):
        if key in hf and getattr(built, key, None) != hf[key]:
            fail(where, "model_spec.model", f"the plan model's {key} {hf[key]} in the model the backend builds, got "
                 f"{getattr(built, key, None)}")


@contextlib.contextmanager
def _cpu_mesh() -> Iterator[None]:
    """torchtitan builds its device mesh on its device type ("cuda" without a GPU): the CPU's here."""
    import torchtitan.distributed.parallel_dims as parallel_dims

    saved = parallel_dims.device_type
    parallel_dims.device_type = "cpu"
    try:
        yield
    finally:
        parallel_dims.device_type = saved


@contextlib.contextmanager
def _hf_assets(hf_config: Mapping[str, Any]) -> Iterator[str]:
    """A folder holding the plan model's config.json, for the transformers backend, which reads the Hugging Face
    config of its ``hf_model`` (``AutoConfig.from_pretrained``: the repository's own file, fetched from the Hub in a
    run; here the one mst-plan's model file holds, its ``_mst`` facts left out). The backend builds the model from
    it; check_config has held ``hf_model`` to the plan model's repository."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mst-titan-assets-") as folder:
        (Path(folder) / "config.json").write_text(json.dumps(hf_config_dict(hf_config)))
        yield folder


@contextlib.contextmanager
def _moe_materialized() -> Iterator[None]:
    """The transformers backend swaps each Hugging Face MoE block for torchtitan's, built on the meta device and
    materialized on the CPU with ``to_empty`` inside ``parallelize`` (host memory in a run, replaced by the device's
    as the trainer materializes the whole model). ``to_empty`` swaps a fake parameter in place, which fake tensors
    refuse (torch keeps a weak reference to each); here each parameter and buffer is replaced by a new empty one of
    its shape on that device instead: the same tensors, made another way."""
    import torch

    from torchtitan.experiments.transformers_modeling_backend import moe_replacement

    cls = moe_replacement._HFContiguousMoE
    saved = {name: cls.__dict__.get(name) for name in ("to_empty", "init_states")}
    init_states = cls.init_states

    def to_empty(module: Any, *, device: Any, recurse: bool = True) -> Any:
        for m in module.modules():
            for name, p in list(m.named_parameters(recurse=False)):
                setattr(m, name, torch.nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad))
            for name, b in list(m.named_buffers(recurse=False)):
                m._buffers[name] = torch.empty_like(b, device=device)
        return module

    def init_states_without_draws(module: Any, *args: Any, **kwargs: Any) -> Any:
        with _weights_uninitialized():  # (as the model's own init_weights: values only)
            return init_states(module, *args, **kwargs)

    cls.to_empty, cls.init_states = to_empty, init_states_without_draws
    try:
        yield
    finally:
        for name, fn in saved.items():
            if fn is None:
                delattr(cls, name)
            else:
                setattr(cls, name, fn)


@contextlib.contextmanager
def _real_meshes() -> Iterator[None]:
    """A device mesh is host-side bookkeeping (its ranks as a small int tensor), real on a GPU run too: FSDP2 joins
    the replicate and shard meshes of torchtitan's replicated data parallelism (``DeviceMesh._concatenate``) inside
    ``fully_shard``, where the fake tensors' session would make that tensor fake; it is made outside it."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.device_mesh import DeviceMesh

    saved = DeviceMesh.__dict__["_concatenate"]

    def concatenate(meshes: Any) -> Any:
        with unset_fake_temporarily():
            return saved.__func__(meshes)

    DeviceMesh._concatenate = staticmethod(concatenate)
    try:
        yield
    finally:
        DeviceMesh._concatenate = saved


@contextlib.contextmanager
def _weights_uninitialized() -> Iterator[None]:
    """``init_weights`` without the weights' random draws (values fake tensors do not hold); buffers as torchtitan makes them."""
    import torch.nn.init as init
    from torchtitan.protocols.module import Module

    saved = Module._init_self_parameters
    draws = {name: getattr(init, name) for name in ("trunc_normal_", "normal_", "uniform_")}
    Module._init_self_parameters = lambda self: None
    for name in draws:  # (the transformers backend's _init_weights draws through torch.nn.init)
        setattr(init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        Module._init_self_parameters = saved
        for name, fn in draws.items():
            setattr(init, name, fn)


class Titan:
    """What ``Trainer.__init__`` builds from the config, on fake tensors (this module's docstring), over
    ``dims``: torchtitan's ``ParallelDims`` with its mesh built (:func:`parallel_dims`, outside the fake tensors)."""

    def __init__(self, config: Any, dims: Any) -> None:
        import torch
        from torchtitan.components.loss import ChunkedLossWrapper
        from torchtitan.config import TORCH_DTYPE_MAP
        from torchtitan.distributed import utils as dist_utils
        from torchtitan.tools import utils

        self.config, self.dims = config, dims
        par = config.parallelism
        spec = config.model_spec
        self.model_config = spec.model
        self.model_config.update_from_config(config=config)
        with torch.device("meta"), utils.set_default_dtype(TORCH_DTYPE_MAP[config.training.dtype]):
            model = self.model_config.build()
        model = spec.parallelize_fn(model, parallel_dims=self.dims, training=config.training, parallelism=par,
                                    compile_config=config.compile, ac_config=config.activation_checkpoint,
                                    dump_folder=config.dump_folder)
        model.to_empty(device="cpu")
        with torch.no_grad(), _weights_uninitialized():
            model.init_weights(buffer_device=None)
        model.train()
        self.model = model
        self.loss_fn = config.loss.build(compile_config=config.compile)
        if isinstance(self.loss_fn, ChunkedLossWrapper):
            self.loss_fn.set_lm_head(model.lm_head)
            model._skip_lm_head = True
        self.optimizers = config.optimizer.build(model_parts=[model])
        if spec.post_optimizer_build_fn is not None:  # (MoE models: the load-balancing hook)
            spec.post_optimizer_build_fn(self.optimizers, [model], dims)
        self.train_context = dist_utils.get_spmd_context(
            parallel_dims=dims, spmd_typechecking=par.spmd_backend == "spmd_types" and config.debug.spmd_typechecking)
        self.lr_schedulers = config.lr_scheduler.build(optimizers=self.optimizers, training_steps=config.training.steps)
        self.accumulation = config.training.global_batch_size // (config.training.local_batch_size * dims.world_size)

    def batches(self) -> List[Tuple[Dict[str, Any], Any]]:
        """One step's host batches: (input dict with ``input`` and ``positions``, labels) per micro-batch (host
        memory, which the referee does not record: the step counts their valid tokens there too)."""
        import torch

        t = self.config.training
        shape = (t.local_batch_size, t.seq_len)
        out = []
        for _ in range(self.accumulation):
            tokens = torch.zeros(shape, dtype=torch.int64)
            positions = torch.arange(t.seq_len, dtype=torch.int64).expand(shape).contiguous()
            out.append(({"input": tokens, "positions": positions}, torch.zeros(shape, dtype=torch.int64)))
        return out

    @staticmethod
    def valid_tokens(batches: List[Tuple[Dict[str, Any], Any]]) -> Any:
        """The step's count of labels to predict, which ``train_step`` takes on the host batches."""
        import torch

        count = torch.tensor(0, dtype=torch.int64)
        for _, labels in batches:
            count += (labels != IGNORE_INDEX).sum()
        return count

    def train_step(self, batches: List[Tuple[Dict[str, Any], Any]], local_valid_tokens: Any, observer: Observer) -> None:
        """``Trainer.train_step`` (torchtitan 0.3.0, trainer.py) on a step that does not log, with its tensors'
        lifetimes: each micro-batch's inputs and positions are written back into its (host) batch dict, which the
        step holds to its end; its labels and loss stay until the next micro-batch's replace them; the attention
        masks are forward_backward_step's own (``local_valid_tokens``: :meth:`valid_tokens`, host memory)."""
        from torchtitan.distributed import utils as dist_utils

        self.optimizers.zero_grad(set_to_none=True)  # (disable_cuda_graphs: set_to_none)
        global_valid_tokens = to_device(local_valid_tokens, "fake")
        if self.dims.dp_enabled:  # summed over the batch mesh, on the device
            global_valid_tokens = dist_utils.dist_sum_tensor(global_valid_tokens, self.dims.get_mesh("batch"))
        model = self.model
        groups = [(dict(input_dict), host_labels) for input_dict, host_labels in batches]  # (the step's own)
        for micro, (input_dict, host_labels) in enumerate(groups):
            observer.phase("forward", micro)
            observer.held_inputs(True)
            for key, value in input_dict.items():
                input_dict[key] = to_device(value, "fake")
            observer.held_inputs(False)
            labels = to_device(host_labels, "fake")
            loss = self._forward_backward(input_dict, labels, global_valid_tokens, observer, micro)
            if micro == len(groups) - 2:
                observer.kept(loss, "loss")
        observer.phase("optimizer", len(groups) - 1)
        dist_utils.clip_grad_norm_([p for p in model.parameters()], self.config.training.max_norm, foreach=True,
                                   pp_mesh=None, ep_enabled=self.dims.ep_enabled)
        self.optimizers.step()
        self.lr_schedulers.step()

    def _forward_backward(self, input_dict: Dict[str, Any], labels: Any, global_valid_tokens: Any, observer: Observer,
                          micro: int) -> Any:
        """``forward_backward_step`` and ``_forward_backward_body``: the masks made (flex, varlen), forward, loss, backward."""
        from torchtitan.models.common.decoder import Decoder

        inputs, positions = input_dict["input"], input_dict["positions"]
        # post_dataloading_process builds the masks of torchtitan's own models (flex attention: check_config); the
        # transformers backend's forward builds its own, and lets go of them as it returns
        masks = {}
        if isinstance(self.model_config, Decoder.Config):
            masks["attention_masks"] = self.model.get_attention_masks(positions=positions)
        with self.train_context():
            pred = self.model(inputs, positions=positions, **masks)
            loss, _ = self.loss_fn(pred, labels, global_valid_tokens, positions=positions)
            del pred
            observer.phase("backward", micro)
            loss.backward()
        return loss

    def gradients(self) -> Iterator[Tuple[str, Any]]:
        """Each parameter's gradient (this rank's shard), by parameter."""
        for name, p in self.model.named_parameters():
            if p.grad is not None:
                local = getattr(p.grad, "_local_tensor", None)
                yield name, p.grad if local is None else local

    def state_tensors(self) -> Iterator[Tuple[str, Any]]:
        """The optimizers' states (each rank's shard), named by parameter."""
        from .referee import state_tensors

        return state_tensors(self.optimizers.optimizers, {id(p): n for n, p in self.model.named_parameters()})


def parallel_dims(config: Any, ranks: int) -> Any:
    """torchtitan's ParallelDims of the config over ``ranks`` GPUs (``Trainer.init_distributed``), its device mesh
    built on the CPU over the process group already made (before the fake tensors' session: a mesh is real)."""
    from torchtitan.distributed.parallel_dims import ParallelDims

    dims = ParallelDims.from_config(config.parallelism, ranks)
    with _cpu_mesh():
        dims.build_mesh()
    return dims


class _Recording(Observer):
    """Phase and micro-step for the recorder: the first micro-step, the last (as micro-step 1: it stands for the
    others) and the optimizer step; of the micro-steps between, the inputs and positions the step keeps to its end
    (and every free of a recorded tensor, such as the first micro-step's labels and loss)."""

    def __init__(self, recorder: Any, micro_steps: int) -> None:
        self.r = recorder
        self.last = micro_steps - 1
        self.whole = True

    def phase(self, name: str, micro_step: int) -> None:
        self.whole = micro_step in (0, self.last) or name == "optimizer"
        self.r.recording = self.whole
        self.r.micro_step = min(micro_step, 1)
        self.r.phase = name

    def held_inputs(self, copying: bool) -> None:
        self.r.recording = self.whole or copying

    def kept(self, tensor: Any, name: str) -> None:
        if not self.whole:  # (the micro-step before the last's loss: the last holds it to its end, as each does)
            self.r.adopt(tensor, name)


def titan_step(plan: Mapping[str, Any], module_dir: Path, rank: int = 0, where: str = "plan") -> Dict[str, Any]:
    """The emitted module of ``plan`` (in ``module_dir``) trained by torchtitan as rank ``rank``: one warm-up
    step, then one recorded. Returns the events and the facts of the run."""
    import torch
    import torchtitan

    from .fake import session
    from .fsdp2 import Fsdp2
    from .recorder import StorageRecorder
    from .titan_kernels import stand_in

    facts = plan_facts(plan, where)
    gpus = facts["gpus"]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < gpus:
        fail("command line", "rank", f"expected 0 to {gpus - 1} (the plan's ranks), got {rank!r}")
    t0 = time.monotonic()
    config = load_config(module_dir)
    check_config(config, facts, str(module_dir / f"{MODULE}.py"))
    world = Fsdp2(gpus, rank)  # torch's fake process group; FSDP2's buffers marked as it makes them
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(world.close)
        cleanup.enter_context(world.marking())
        dims = parallel_dims(config, gpus)
        cleanup.enter_context(session())
        cleanup.enter_context(stand_in(facts["moe_imbalance"]))
        cleanup.enter_context(_real_meshes())
        if _backend(config):
            config.hf_model = cleanup.enter_context(_hf_assets(facts["hf_config"]))
            cleanup.enter_context(_moe_materialized())
        titan = Titan(config, dims)
        check_built(titan, facts["hf_config"], str(module_dir / f"{MODULE}.py"))
        warm_up = titan.batches()
        titan.train_step(warm_up, titan.valid_tokens(warm_up), Observer())  # the optimizer's states
        recorder = StorageRecorder()
        model = titan.model
        recorder.register(Fsdp2.sharded_tensors(model), "weights", "init.weights")
        recorder.register(model.named_buffers(), "weights", "init.buffers")
        recorder.register(titan.state_tensors(), "optimizer_state", "init.optimizer_state")
        # the previous step's gradients: torchtitan zeroes them (set to None) as a step begins, not as it ends
        recorder.register(titan.gradients(), "gradients", "init.gradients")
        hooks = _mark_checkpoints(recorder, model, facts["checkpoint"])
        world.recorder = recorder
        batches = titan.batches()  # host memory: made before recording starts
        valid = titan.valid_tokens(batches)
        try:
            with recorder.tracking(model), recorder:
                titan.train_step(batches, valid, _Recording(recorder, titan.accumulation))
            recorder.close()
        finally:
            for h in hooks:
                h.remove()
        events = recorder.timeline()
        flavor = f"{config.model_spec.name} {config.model_spec.flavor}"
        layers, titan_accumulation = len(model.layers), titan.accumulation
        del model, titan
    # (a step sharded over several ranks names its rank: FSDP2's shards may differ in length between them)
    sharded = {"rank": rank} if gpus > 1 and facts["zero_stage"] >= 2 else {}
    return {**sharded, "events": [e.to_list() for e in events], "seconds": time.monotonic() - t0, "of": f"rank {rank} of {gpus}",
            "model": facts["model_name"], "model_path": facts["model_path"],
            "layers": layers, "corrected_sums": recorder.corrected_sums, "micro_steps": titan_accumulation,
            "micro_steps_recorded": min(titan_accumulation, 2),
            "torch": torch.__version__, "torchtitan": getattr(torchtitan, "__version__", _version("torchtitan")),
            "flavor": flavor, "attention": _attention_of(config)}


def _attention_of(config: Any) -> str:
    """The attention a run used: torchtitan's own module's class, or the transformers backend's implementation."""
    model = config.model_spec.model
    if _backend(config):
        return f"transformers {model.attn_implementation}"
    return type(model.layers[0].attention.inner_attention).__qualname__


def _backend(config: Any) -> bool:
    """Whether the config trains through torchtitan's transformers backend (a Hugging Face model, not its own)."""
    return config.model_spec.name == "transformers_modeling_backend"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _mark_checkpoints(recorder: Any, model: Any, checkpoint: Any) -> List[Any]:
    """Each checkpointed block's input (the hidden states it receives in forward) is a checkpoint."""
    def hook(module: Any, args: Tuple[Any, ...]) -> None:
        if recorder.phase == "forward" and args:
            recorder.mark([args[0]], "checkpoint")

    layers = list(model.layers.values())
    return [layers[i].register_forward_pre_hook(hook)
            for i in checkpoint_layers_from_spec(checkpoint, len(layers))]


def measurement_file(plan: Mapping[str, Any], result: Mapping[str, Any], run: str) -> Dict[str, Any]:
    """The recorded step as a referee measurement (``mst-measure/1``, backend referee), torchtitan's facts
    among its notes."""
    from .referee import summarize_events, timeline

    name, path = result["model"], result["model_path"]
    setup = dict(plan["setup"])
    # whose model code ran: torchtitan's own (compare --run re-simulates it where it is modelled), or transformers'
    # through the backend (whatever a plan said)
    backend = result["flavor"].startswith("transformers_modeling_backend")
    setup["model_code"] = "transformers" if backend else "torchtitan"
    summary = dict(summarize_events(result["events"]), seconds=result["seconds"], device="fake",
                   attn_implementation=result["attention"], layers=result["layers"], events=len(result["events"]),
                   corrected_sums=result["corrected_sums"], torch=result["torch"], torchtitan=result["torchtitan"])
    notes = [f"trainer: torchtitan {result['torchtitan']} ({result['flavor']}, {result['attention']}), "
             f"{result['of']} (torch's fake process group, fake tensors; "
             "the fused RMSNorm, flex attention and its block mask stood in for: mst_referee.titan_kernels)"]
    return {"format": "mst-measure/1", "backend": "referee", "model": name, "model_path": str(path), "seed": 0,
            "workspace_bytes": 0, "setup": setup, "run": run, "notes": notes, "summary": summary,
            # (a sharded step names its rank in the timeline; the notes say whose in any case)
            "timeline": timeline(path, result)}


def main(argv: Any = None) -> int:
    import argparse

    from .jobs import read_json
    from .records import write_record

    p = argparse.ArgumentParser(prog="python -m mst_referee.titan", description=__doc__.splitlines()[0])
    p.add_argument("plan", type=Path, help="an mst-plan plan (recommend --for torchtitan --out)")
    p.add_argument("module_dir", type=Path, help="the folder holding the mst_torchtitan.py emitted for it "
                   "(mst-plan emit --format torchtitan --out DIR)")
    p.add_argument("--rank", type=int, default=0, help="which of the plan's data-parallel ranks (default 0)")
    p.add_argument("--out", type=Path, required=True, help="the recorded step (mst-measure/1, backend referee: "
                   "mst-plan compare --run reads it)")
    args = p.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)  # (torchtitan's warnings about the run it is not: no assets, no checkpoint)
    try:
        plan = read_json(args.plan, "the plan")
        result = titan_step(plan, args.module_dir, args.rank, str(args.plan))
    except CrosscheckError as e:
        print(f"error: {e}")
        return 2
    return write_record(args.out, measurement_file(plan, result, args.out.stem), result)


if __name__ == "__main__":
    raise SystemExit(main())
