"""A ds_config.json through the code that trains with it: transformers' Trainer, accelerate, DeepSpeed.

The run a user starts with ``TrainingArguments(deepspeed="ds_config.json", ...)`` is replayed in
this process, with the real classes all the way to a built DeepSpeed engine:

1. ``TrainingArguments`` (transformers' ``trainer_config_process`` and accelerate's
   ``DeepSpeedPlugin``) with the plan's micro-batch, accumulation and precision, and for Ulysses
   (sp > 1) the ``ParallelismConfig(sp_backend="deepspeed", sp_size, dp_shard_size)`` that the
   emitted notes tell the user to pass;
2. ``Trainer(...).train()`` on a small model of the plan's family (same ``model_type`` and
   architecture keys, shrunk dimensions): the Trainer builds its accelerator, runs
   ``deepspeed_init`` and accelerate's ``_prepare_deepspeed`` (config values filled and
   checked, the Ulysses attention registered with transformers and its process groups built);
3. ``deepspeed.initialize`` builds the engine (``DeepSpeedConfig``'s validation and batch
   arithmetic, the ZeRO optimizer); the run stops there, before the first step;
4. the engine's own answers are compared with the plan: sequences per step, micro-batch,
   accumulation, ZeRO stage, data-parallel and Ulysses degrees, bf16 or autocast.

Only the world is stood in for: one process holds rank 0 of a process group of the plan's GPU
count on torch's ``fake`` backend (groups exist, collectives send nothing), DeepSpeed runs on its
CPU accelerator. Everything that accepts or refuses the file is the clients' own code.
"""

import contextlib
import copy
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks an accelerator on import
os.environ.setdefault("OMP_NUM_THREADS", "1")  # (accelerate warns and sets it otherwise)

# The stand-in model: the plan's architecture with its own attention and key/value head counts
# (Ulysses splits heads, so their divisibility is the real model's) at these sizes; 64 tokens,
# split over up to 16 sequence-parallel ranks.
TINY = {"head_dim": 8, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 256}
TINY_MOE = {"num_local_experts": 4, "num_experts": 4, "moe_intermediate_size": 32}
TOKENS = 64


def tiny_model_config(raw: Mapping[str, Any]) -> Dict[str, Any]:
    """The config.json ``raw`` (a catalog model's, "_mst" block included) at stand-in sizes."""
    out = {k: copy.deepcopy(v) for k, v in raw.items() if k != "_mst"}
    out.update(TINY)
    out["hidden_size"] = out["num_attention_heads"] * TINY["head_dim"]
    for key, value in TINY_MOE.items():
        if key in out:
            out[key] = value
    if "num_experts_per_tok" in out:
        out["num_experts_per_tok"] = min(out["num_experts_per_tok"], 2)
    if isinstance(out.get("layer_types"), list):
        out["layer_types"] = out["layer_types"][:TINY["num_hidden_layers"]]
    for key in ("rope_scaling", "rope_parameters"):  # per-dimension factor lists follow head_dim
        if isinstance(out.get(key), dict) and "long_factor" in out[key]:
            out.pop(key)
    out["max_position_embeddings"] = max(int(out.get("max_position_embeddings") or 0), 4 * TOKENS)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # token ids inside the small vocabulary
        ids = out.get(key)
        if isinstance(ids, int) and ids >= TINY["vocab_size"]:
            out[key] = TINY["vocab_size"] - 1
        elif isinstance(ids, list):
            out[key] = [min(i, TINY["vocab_size"] - 1) for i in ids]
    return out


class _EngineBuilt(Exception):
    """Raised from inside Trainer.train() once DeepSpeed's engine exists: the check stops there."""

    def __init__(self, engine):
        super().__init__("engine built")
        self.engine = engine


def _reset_clients() -> None:
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    AcceleratorState._reset_state(reset_partial_state=True)
    unset_hf_deepspeed_config()


@contextlib.contextmanager
def _stop_at_engine():
    """deepspeed.initialize runs for real, then the train() that called it stops."""
    import deepspeed

    real = deepspeed.initialize

    def initialize(*args, **kwargs):
        result = real(*args, **kwargs)
        raise _EngineBuilt(result[0])

    deepspeed.initialize = initialize
    try:
        yield
    finally:
        deepspeed.initialize = real


def _origin(exc: BaseException) -> str:
    """Which client raised ``exc``: the package of the innermost frame among the clients'."""
    import traceback

    owner = "python"
    for frame in traceback.extract_tb(exc.__traceback__):
        parts = Path(frame.filename).parts
        for name in ("deepspeed", "accelerate", "transformers"):
            if name in parts:
                owner = name
    return owner


def _say(exc: BaseException) -> str:
    return f"{_origin(exc)}: {type(exc).__name__}: " + " ".join(str(exc).split())[:400]


def _arguments(plan: Mapping[str, Any], ds_config: Dict, out_dir: str):
    from transformers import TrainingArguments

    setup = plan["setup"]
    parallelism = None
    if setup["sp"] > 1:  # what the emitted note tells the user to pass
        from accelerate.parallelism_config import ParallelismConfig
        from accelerate.utils import DeepSpeedSequenceParallelConfig

        parallelism = ParallelismConfig(
            sp_backend="deepspeed", sp_size=setup["sp"], dp_shard_size=setup["dp"],
            sp_handler=DeepSpeedSequenceParallelConfig(sp_seq_length_is_variable=True,
                                                       sp_attn_implementation=_attention(setup)))
    # amp: DeepSpeed's torch_autocast block does the casting; the Trainer's --bf16 would make
    # accelerate add a bf16 block (bf16 weights), which is not the plan.
    return TrainingArguments(output_dir=out_dir, per_device_train_batch_size=setup["micro_batch"],
                             gradient_accumulation_steps=setup["grad_accum"],
                             bf16=setup["precision"] != "amp", use_cpu=True, report_to=[], save_strategy="no",
                             max_steps=1, deepspeed=copy.deepcopy(ds_config), parallelism_config=parallelism,
                             dataloader_num_workers=0)


def _attention(setup: Mapping[str, Any]) -> str:
    """The model's attn_implementation: eager as planned; sdpa stands in for flash attention,
    which has no CPU build (both keep no S x S scores, and Ulysses wraps either)."""
    return "eager" if setup["attention"] == "eager" else "sdpa"


class _NoFlash(Exception):
    """The plan's model class has no flash attention in transformers."""


def _model(raw_model_config: Mapping[str, Any], setup: Mapping[str, Any]):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    data = tiny_model_config(raw_model_config)
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    attention = _attention(setup)
    torch.manual_seed(0)
    if attention == "eager":
        return AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    cls = AutoModelForCausalLM._model_mapping[type(config)]
    if not cls._supports_flash_attn:
        raise _NoFlash(f"transformers: {cls.__name__} has no flash attention (_supports_flash_attn is False)")
    if cls._supports_sdpa:
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    # A class with flash attention but no sdpa (Gemma-2: sdpa has no logit softcapping) is built
    # eager and then labelled sdpa, the stand-in for its flash kernel: the run stops before any
    # attention is computed, and Ulysses only reads the label.
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    model.config._attn_implementation = "sdpa"
    return model


def _dataset(plan: Mapping[str, Any]) -> List[Dict]:
    import torch

    setup = plan["setup"]
    n = setup["micro_batch"] * setup["grad_accum"] * setup["dp"] * 4
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": ids, "labels": ids.clone()}
            for ids in torch.randint(0, TINY["vocab_size"], (n, TOKENS), generator=g)]


def check(ds_config: Dict, plan: Mapping[str, Any], raw_model_config: Mapping[str, Any],
          out_dir: str) -> List[str]:
    """What stops this config from training the plan with the Trainer and DeepSpeed ([] when nothing)."""
    from mst_referee.deepspeed_zero import fake_world
    from transformers import Trainer

    setup = plan["setup"]
    if setup["optimizer"] == "adamw-8bit":
        return ["check-clients: adamw-8bit plans need bitsandbytes, which the client check does not install"]
    fake_world(plan["gpus"], local_world_size=min(plan["gpus"], 8))
    _reset_clients()
    engine: Optional[Any] = None
    try:
        args = _arguments(plan, ds_config, out_dir)
        trainer = Trainer(model=_model(raw_model_config, setup), args=args, train_dataset=_dataset(plan))
        with _stop_at_engine():
            trainer.train()
    except _EngineBuilt as built:
        engine = built.engine
    except _NoFlash as e:
        return [str(e)]
    except Exception as e:  # the clients' refusals: ValueError, AssertionError, pydantic errors, ...
        return [_say(e)]
    finally:
        _reset_clients()
    if engine is None:
        return ["check-clients: Trainer.train() returned without building a DeepSpeed engine"]
    return plan_problems(engine, setup)


# What each plan optimizer allocates per parameter: AdamW two states, SGD one momentum buffer.
_PLAN_OPTIMIZERS = {"adamw": "AdamW", "sgd": "SGD with momentum"}


def _optimizer_kind(optimizer) -> str:
    """The plan's name for the optimizer DeepSpeed built: "AdamW" for an Adam with decoupled weight
    decay (torch's AdamW, DeepSpeed's FusedAdam/CPUAdam in adam_w_mode), "SGD with momentum"."""
    name = type(optimizer).__name__
    group = optimizer.param_groups[0] if getattr(optimizer, "param_groups", None) else {}
    if name == "AdamW" or (name in ("FusedAdam", "DeepSpeedCPUAdam") and getattr(optimizer, "adam_w_mode", False)):
        return "AdamW"
    if name == "SGD":
        return "SGD with momentum" if group.get("momentum", 0) else "SGD without momentum"
    return name


def plan_problems(engine, setup: Mapping[str, Any]) -> List[str]:
    """Where the engine DeepSpeed built differs from the plan."""
    dp, sp = setup["dp"], setup["sp"]
    want = {
        "sequences per step": (engine.train_batch_size(), setup["micro_batch"] * setup["grad_accum"] * dp),
        "micro-batch": (engine.train_micro_batch_size_per_gpu(), setup["micro_batch"]),
        "gradient accumulation": (engine.gradient_accumulation_steps(), setup["grad_accum"]),
        "ZeRO stage": (engine.zero_optimization_stage(), setup["zero_stage"]),
        "data-parallel degree": (engine.seq_dp_world_size // max(engine.sequence_parallel_size, 1), dp),
        "Ulysses degree": (engine.sequence_parallel_size, sp),
        "bf16 weights": (bool(engine.bfloat16_enabled()), setup["precision"] in ("pure-bf16", "bf16-master")),
        "autocast": (bool(engine.torch_autocast_enabled()), setup["precision"] == "amp"),
    }
    # bf16 master weights (and then bf16 states) exactly for pure bf16
    want["bf16 master weights"] = (bool(engine.bf16_master_weights_and_gradients()), setup["precision"] == "pure-bf16")
    if setup["optimizer"] != "adamw-8bit":
        want["bf16 optimizer states"] = (bool(engine.bf16_optimizer_states()),
                                         setup.get("optimizer_state_dtype", "fp32") == "bf16")
    # the optimizer it steps (its states are the plan's) and nothing offloaded the plan keeps on the GPU
    want["offloaded optimizer states"] = (bool(engine.zero_offload_optimizer()), False)
    want["offloaded parameters"] = (bool(engine.zero_offload_param()), False)
    want["optimizer"] = (_optimizer_kind(engine.basic_optimizer), _PLAN_OPTIMIZERS.get(setup["optimizer"], "?"))
    # ZeRO 1/2's engine options, which the plan's memory and time follow (its bucket, a second one)
    if setup["zero_stage"] in (1, 2):
        from mst_referee.jobs import SETUP_DEFAULTS

        want["gradient bucket (elements)"] = (int(engine.zero_reduce_bucket_size()),
                                              setup.get("reduce_bucket_size", SETUP_DEFAULTS["reduce_bucket_size"]))
        want["overlap_comm"] = (bool(engine.zero_overlap_comm()), setup.get("overlap_comm", SETUP_DEFAULTS["overlap_comm"]))
    return [f"plan: DeepSpeed's {what} is {got}, the plan's {expected}"
            for what, (got, expected) in want.items() if got != expected]
