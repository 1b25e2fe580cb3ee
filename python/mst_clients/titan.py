"""python -m mst_clients.titan --mst-plan BIN --out-dir DIR: mst_torchtitan.py through torchtitan.

Each plan of matrix.titan_matrix() is made by ``recommend --for torchtitan`` and emitted; its
``mst_torchtitan.py`` is then loaded the way ``torchrun -m torchtitan.train --module mst_torchtitan
--config mst_plan`` loads it: torchtitan 0.3.0's ``ConfigManager.parse_args`` (its registry lookup,
tyro's parsing and torchtitan's validation). What torchtitan makes of the result must be the plan:
``ParallelDims`` of the plan's GPU count (torchtitan's own check of the degrees), the batch and
gradient accumulation as ``Trainer.__init__`` derives them, and the knobs the module states on its
own (plan_rows, which the referee's check_config refuses as well: the sequence length, dtypes,
resharding, activation checkpointing, the LM head's chunks, the optimizer, the attention, the
degrees torchtitan is not asked for), and the model: torchtitan's model
built on the meta device has the plan model's parameter count, or the transformers backend
loads the plan model's Hugging Face repository. Prints a row per file; exits 1 when any is
refused or a plan could not be made, 2 on a usage error. Runs in a process of its own:
torchtitan's pins shadow transformers' (python/requirements/clients-torchtitan.txt).
"""

import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

from . import matrix

MODULE, FUNCTION = "mst_torchtitan", "mst_plan"


def load(module_dir: Path):
    """torchtitan's ConfigManager on the emitted module, as torchrun would run it."""
    from torchtitan.config import ConfigManager

    for name in [m for m in sys.modules if m == MODULE or m.startswith(MODULE + ".")]:
        del sys.modules[name]  # the previous plan's module of the same name
    sys.path.insert(0, str(module_dir))
    try:
        return ConfigManager().parse_args(["--module", MODULE, "--config", FUNCTION])
    finally:
        sys.path.remove(str(module_dir))


def plan_rows(config, setup: Mapping[str, Any], layers: int) -> List[Tuple[str, str, Any, Any]]:
    """The knobs mst-plan's emitter writes that a loaded config states on its own, as (the config's field, what it
    is, torchtitan's value, the plan's): the client check lists those that differ, the referee
    (mst_referee.titan.check_config) refuses the first. ``setup``: the plan's setup, ``layers``: its model's."""
    from torchtitan.components.loss import ChunkedLossWrapper
    from torchtitan.distributed.activation_checkpoint import FullAC

    from mst_referee.jobs import checkpoint_layers_from_spec

    training, par, ac = config.training, config.parallelism, config.activation_checkpoint
    checkpointed = len(checkpoint_layers_from_spec(setup.get("checkpoint", []), layers))
    optimizer = setup.get("optimizer", "adamw")
    rows = [
        ("training.seq_len", "sequence length", training.seq_len, setup["seq_len"]),
        ("training.local_batch_size", "micro-batch", training.local_batch_size, setup.get("micro_batch", 1)),
        ("training.dtype", "training dtype", training.dtype,
         "bfloat16" if setup.get("precision", "pure-bf16") == "pure-bf16" else "float32"),
        ("training.mixed_precision_param", "compute dtype", training.mixed_precision_param, "bfloat16"),
        ("training.mixed_precision_reduce", "gradient reduction dtype", training.mixed_precision_reduce, "float32"),
        # (as the emitter writes it: "never" for ZeRO 1/2 on any ranks and for the hf runtime's FSDP2 kept gathered
        # from forward to backward, torchtitan's "default" for ZeRO 3 and 0)
        ("parallelism.fsdp_reshard_after_forward", "resharding after forward", par.fsdp_reshard_after_forward,
         "never" if setup.get("zero_stage", 0) in (1, 2) or not setup.get("fsdp2_reshard_after_forward", True)
         else "default"),
        ("activation_checkpoint", "checkpointed layers",
         "all" if isinstance(ac, FullAC.Config) else "none" if ac is None else type(ac).__qualname__,
         "none" if checkpointed == 0 else "all" if checkpointed == layers else f"{checkpointed} of {layers}"),
        ("loss.num_chunks", "LM-head chunks",
         config.loss.num_chunks if isinstance(config.loss, ChunkedLossWrapper.Config) else 1, setup.get("lm_chunks", 1)),
        ("optimizer", "optimizer", [g.optimizer_name for g in config.optimizer.param_groups],
         ["AdamW"] if optimizer == "adamw" else [optimizer]),
        ("optimizer.implementation", "optimizer implementation", config.optimizer.implementation,
         setup.get("optimizer_impl", "fused")),
        ("parallelism.tensor_parallel_degree", "tensor-parallel degree", par.tensor_parallel_degree, 1),
        ("parallelism.pipeline_parallel_degree", "pipeline-parallel degree", par.pipeline_parallel_degree, 1),
        ("parallelism.context_parallel_degree", "context-parallel degree", par.context_parallel_degree, 1),
        ("parallelism.expert_parallel_degree", "expert-parallel degree", par.expert_parallel_degree, setup.get("ep", 1)),
        ("compile.enable", "compile", config.compile.enable, False),
        ("training.disable_cuda_graphs", "CUDA graphs disabled", training.disable_cuda_graphs, True),
        ("training.enable_cpu_offload", "CPU offload", training.enable_cpu_offload, False),
    ]
    if config.model_spec.name != "transformers_modeling_backend":
        from torchtitan.models.common.attention import FlexAttention

        inner = config.model_spec.model.layers[0].attention.inner_attention
        rows.append(("model.layers[0].attention.inner_attention", "attention",
                     type(inner).__qualname__ + (" with kernel_options" if getattr(inner, "kernel_options", None) else ""),
                     FlexAttention.Config.__qualname__))
    return rows


def plan_problems(config, plan: Mapping[str, Any], model: Mapping[str, Any]) -> List[str]:
    """Where torchtitan's reading of the config differs from the plan: plan_rows, and what torchtitan derives
    from the config (its ParallelDims, the batch arithmetic of Trainer.__init__, the model it builds)."""
    import torch
    from torchtitan.distributed.parallel_dims import ParallelDims

    setup, training, par = plan["setup"], config.training, config.parallelism
    dims = ParallelDims(dp_replicate=par.data_parallel_replicate_degree, dp_shard=par.data_parallel_shard_degree,
                        cp=par.context_parallel_degree, tp=par.tensor_parallel_degree,
                        pp=par.pipeline_parallel_degree, ep=par.expert_parallel_degree, world_size=plan["gpus"])
    batch_degree = dims.dp_replicate * dims.dp_shard  # Trainer.__init__: the "batch" mesh
    global_batch = training.global_batch_size
    if global_batch < 0:
        global_batch = training.local_batch_size * batch_degree
    if global_batch % (training.local_batch_size * batch_degree):
        return [f"torchtitan: global batch {global_batch} is not a multiple of local {training.local_batch_size} "
                f"x data-parallel degree {batch_degree}"]
    accumulation = global_batch // (training.local_batch_size * batch_degree)
    want = {what: (got, expected) for _, what, got, expected in plan_rows(config, setup, model["layers"])}
    want.update({
        "data-parallel degree": (batch_degree, setup["dp"]),
        "sharded (FSDP2)": (dims.dp_shard > 1, setup["zero_stage"] > 0 and setup["dp"] > 1),
        "gradient accumulation": (accumulation, setup["grad_accum"]),
    })
    if config.model_spec.name == "transformers_modeling_backend":
        want["Hugging Face model"] = (config.hf_model, model["hf_repo"])
        # (the emitter's: another flavor sets sizes of its own)
        want["backend flavor"] = (config.model_spec.flavor, "full_moe" if model.get("moe") else "full")
    else:
        # as Trainer.__init__ does before building: fits the model to the run (the RoPE table to
        # seq_len, which it refuses beyond the flavor's), then the model on the meta device
        config.model_spec.model.update_from_config(config=config)
        with torch.device("meta"):
            built = config.model_spec.model.build()
        want["model parameters"] = (sum(p.numel() for p in built.parameters()), model["parameters"])
        # the RoPE tables the module says torchtitan keeps beyond the prediction (recommend keeps them free)
        rope = sum(b.numel() * b.element_size() for name, b in built.named_buffers() if name.endswith("rope.cache"))
        want["RoPE table bytes"] = (rope, getattr(sys.modules.get(MODULE), "ROPE_TABLE_BYTES", None))
        layer_rope = config.model_spec.model.layers[0].attention.rope
        want["RoPE"] = (_rope_of(layer_rope), model["rope"])
    return [f"plan: torchtitan's {what} is {got}, the plan's {expected}"
            for what, (got, expected) in want.items() if got != expected]


def _rope_of(rope) -> Dict[str, Any]:
    """torchtitan's RoPE.Config as the plan model's config.json states it (theta, Llama-3 scaling)."""
    out: Dict[str, Any] = {"theta": float(rope.theta), "scaling": rope.scaling}
    if rope.scaling == "llama":
        out.update(factor=float(rope.scaling_factor), low_freq_factor=float(rope.low_freq_factor),
                   high_freq_factor=float(rope.high_freq_factor),
                   original_max_position_embeddings=int(rope.original_max_position_embeddings))
    return out


def rope_of_config(raw: Mapping[str, Any]) -> Dict[str, Any]:
    """The rotary embedding a Hugging Face config.json describes, in _rope_of's terms."""
    scaling = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    out: Dict[str, Any] = {"theta": float(raw.get("rope_theta", scaling.get("rope_theta", 10000.0))),
                           "scaling": "llama" if kind == "llama3" else "none" if kind == "default" else kind}
    if kind == "llama3":
        out.update(factor=float(scaling.get("factor", 8.0)), low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
                   high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
                   original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)))
    return out


def check(module_dir: Path, plan: Mapping[str, Any], model: Mapping[str, Any]) -> List[str]:
    """What stops torchtitan from training this plan with the emitted module ([] when nothing)."""
    try:
        config = load(module_dir)
    except SystemExit as e:  # tyro's usage errors
        return [f"torchtitan: the command line was refused (exit {e.code})"]
    except Exception as e:
        return [f"torchtitan: {type(e).__name__}: " + " ".join(str(e).split())[:400]]
    try:
        return plan_problems(config, plan, model)
    except (AssertionError, ValueError) as e:  # ParallelDims' and update_from_config's own checks
        return [f"torchtitan: {type(e).__name__}: " + " ".join(str(e).split())[:400]]


def model_facts(binary: Path, name: str) -> Dict[str, Any]:
    """The plan model's parameter count (mst-plan show), Hugging Face repository (its _mst.source), and whether it is a
    Mixture-of-Experts model."""
    r = matrix.run_mst(binary, ["--json", "show", name])
    shown = json.loads(r.stdout) if r.returncode == 0 else {}
    from mst_referee import jobs
    raw = jobs.load_model_config(jobs.resolve_model(name)[1])
    return {"parameters": (shown.get("parameters") or {}).get("total"), "layers": shown.get("num_hidden_layers"),
            "hf_repo": hf_repo(raw), "rope": rope_of_config(raw),
            "moe": matrix.moe_config(raw)}


def hf_repo(config: Mapping[str, Any]) -> str:
    """"org/name" of the Hugging Face repository a model's config.json was downloaded from (its ``_mst.source``, as
    the emitter's hf_repo reads it), or "" for a config from elsewhere."""
    source = (config.get("_mst") or {}).get("source", "")
    prefix = "https://huggingface.co/"
    return "/".join(source[len(prefix):].split("/")[:2]) if source.startswith(prefix) else ""


def main(argv=None) -> int:
    a = matrix.command_line("check-clients torchtitan", __doc__.splitlines()[0], argv, ("torchtitan",))
    if isinstance(a, int):
        return a
    import logging
    logging.getLogger().setLevel(logging.ERROR)  # torchtitan's notes on absent tokenizer assets

    def check_one(em: "matrix.Emitted"):
        s = em.plan["setup"]
        facts = model_facts(a.mst_plan, em.plan["model"])
        layout = (f"dp {s['dp']} ZeRO {s['zero_stage']}{' ep ' + str(s['ep']) if s.get('ep', 1) > 1 else ''} "
                  f"mb {s['micro_batch']} ga {s['grad_accum']} "
                  f"ckpt {len(s['checkpoint'])}/{facts['layers']} LM {s['lm_chunks']} {s['precision']}")
        return layout, check(em.files["mst_torchtitan.py"].parent, em.plan, facts)

    entries = [e for e in matrix.titan_matrix() if a.only in e.name]
    return matrix.check_matrix(a.mst_plan, entries, "torchtitan", a.out_dir, check_one,
                               "mst_torchtitan.py files", "torchtitan 0.3.0's ConfigManager")


if __name__ == "__main__":
    sys.exit(main())
