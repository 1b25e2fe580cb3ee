"""A ds_config.json through the code that reads it in a Hugging Face + DeepSpeed run.

1. The Trainer: ``TrainingArguments(deepspeed=...)`` builds ``HfTrainerDeepSpeedConfig`` and runs
   ``trainer_config_process`` (fills "auto" values from the arguments, records every value that
   disagrees with them), then the Trainer runs ``trainer_config_finalize``, which raises on any
   disagreement. The arguments are the plan's: micro-batch, accumulation, bf16, and the world
   size of its GPUs (``args.world_size``: every process, sequence-parallel ones included).
2. DeepSpeed: ``DeepSpeedConfig`` of the config the Trainer handed on, on a process group of
   the plan's world size (torch's ``fake`` backend: the group exists, nothing is sent), which
   validates every block (pydantic models that refuse unknown keys) and the batch arithmetic
   (train_batch_size = micro x accumulation x world / sequence_parallel_size).
3. The plan: the batch DeepSpeed derives, its ZeRO stage, precision and Ulysses degree are the
   ones the plan was simulated with.

Only the distributed environment is stood in for (no processes are launched): the checks
themselves are transformers' and DeepSpeed's code.
"""

import copy
import os
from types import SimpleNamespace
from typing import Dict, List

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks an accelerator on import


def _world(size: int) -> None:
    """A default process group of `size` ranks (this process is rank 0), which deepspeed.comm uses.

    Without deepspeed.comm initialised, DeepSpeedConfig catches the failed world-size query and
    silently assumes one rank: the batch arithmetic would then check nothing.
    """
    import deepspeed.comm
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        if dist.get_world_size() == size:
            return
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=size)
    deepspeed.comm.init_distributed(dist_backend="fake", auto_mpi_discovery=False, verbose=False)
    if deepspeed.comm.get_world_size() != size:
        raise RuntimeError(f"deepspeed.comm sees {deepspeed.comm.get_world_size()} ranks, expected {size}")


def _training_args(setup: Dict, world_size: int, out_dir: str):
    from transformers import TrainingArguments

    class PlanArguments(TrainingArguments):
        @property
        def world_size(self):  # the launcher's WORLD_SIZE processes
            return world_size

    return PlanArguments(output_dir=out_dir, per_device_train_batch_size=setup["micro_batch"],
                         gradient_accumulation_steps=setup["grad_accum"], bf16=True, use_cpu=True,
                         report_to=[], save_strategy="no")


def check(ds_config: Dict, plan: Dict, hidden_size: int, out_dir: str) -> List[str]:
    """What stops this config from training the plan with the Trainer and DeepSpeed ([] when nothing)."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    setup, world = plan["setup"], plan["gpus"]
    problems: List[str] = []
    hf = HfTrainerDeepSpeedConfig(copy.deepcopy(ds_config))
    try:
        args = _training_args(setup, world, out_dir)
        hf.trainer_config_process(args)
        model = SimpleNamespace(config=SimpleNamespace(hidden_size=hidden_size))
        hf.trainer_config_finalize(args, model, num_training_steps=1000)
    except ValueError as e:
        problems.append("transformers: " + " ".join(str(e).split()))
    finally:
        unset_hf_deepspeed_config()
    if problems:
        return problems

    _world(world)
    try:
        ds = DeepSpeedConfig(copy.deepcopy(hf.config))
    except Exception as e:  # DeepSpeed's assertions and pydantic's validation errors alike
        return ["deepspeed: " + type(e).__name__ + ": " + " ".join(str(e).split())]

    dp, sp = setup["dp"], setup["sp"]
    want_batch = setup["micro_batch"] * setup["grad_accum"] * dp
    if ds.train_batch_size != want_batch:
        problems.append(f"plan: DeepSpeed trains {ds.train_batch_size} sequences per step, the plan {want_batch}")
    if ds.world_size != dp:  # world / sequence_parallel_size
        problems.append(f"plan: DeepSpeed's data-parallel world is {ds.world_size}, the plan's dp {dp}")
    if ds.zero_optimization_stage != setup["zero_stage"]:
        problems.append(f"plan: ZeRO stage {ds.zero_optimization_stage}, the plan's {setup['zero_stage']}")
    bf16 = bool(ds.bfloat16_config.enabled)
    if bf16 != (setup["precision"] in ("pure-bf16", "bf16-master")):
        problems.append(f"plan: bf16 enabled {bf16} for precision {setup['precision']}")
    ds_sp = ds_config.get("sequence_parallel_size", 1)
    if ds_sp != sp:
        problems.append(f"plan: sequence_parallel_size {ds_sp}, the plan's sp {sp}")
    return problems
