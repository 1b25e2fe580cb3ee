"""mst-plan: llama-3-8b on 8 x h100-sxm-80gb (dp 8 x sp 1), seq 32768, micro-batch 1, grad-accum 1
predicted per GPU: peak 44.57 GiB allocated, 49.08 GiB reserved; 5620 tokens/s

torchtitan 0.3.0 config (https://github.com/pytorch/torchtitan/tree/v0.3.0): from the directory holding this file, with the model's tokenizer in ./assets/hf/Meta-Llama-3-8B
    PYTHONPATH=. torchrun --nproc_per_node=8 -m torchtitan.train --module mst_torchtitan --config mst_plan
(over several nodes: torchrun's --nnodes and --rdzv options; torchtitan options after these override the file).

The plan keeps bf16 weights next to fp32 masters; torchtitan keeps only the fp32 parameters and
casts them to bf16 for compute (FSDP2's mixed precision, or autocast without FSDP): memory at or
below the prediction.

ZeRO-2 is FSDP2 without resharding after forward: each block keeps its gathered parameters from
forward to backward, gradients and optimizer states stay sharded.

torchtitan keeps a RoPE table of seq_len positions in every layer (512.00 MiB per GPU,
ROPE_TABLE_BYTES below), which mst-plan's runtime does not: recommend --for torchtitan keeps
that much of the budget free; the prediction above is without it.

mst-plan predicts this plan with the runtime's model, not torchtitan's own step: its runtime is
outside what mst-plan models that step for (its Llama-3 code on one GPU or fully sharded by
FSDP2 over several, in pure bf16 or bf16-master, every layer checkpointed or none, the loss
whole or in chunks, which recommend --for torchtitan plans with that step (runtime hf), equal to
the referee event for event). The referee, running torchtitan's step from emitted modules,
measured -31 % to +99 % against such predictions (20 plans under FSDP2 or DDP, expert
parallelism among them; Llama-3-8B at 8192 tokens on 8 H100s: +14.1 %): FSDP2 even on one GPU,
gradients reduced in fp32, the chunked loss's fp32 logits. `python -m mst_referee.titan
PLAN.json DIR --out m.json` records a plan's step (python/README.md), `mst-plan compare --run
m.json` shows where it differs.
"""

import dataclasses

from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
from torchtitan.distributed.activation_checkpoint import FullAC
from torchtitan.models.llama3 import model_registry
from torchtitan.models.llama3.config_registry import llama3_8b as base_config

ROPE_TABLE_BYTES = 536870912  # per GPU, beyond the prediction

def mst_plan():
    config = base_config()
    config.model_spec = model_registry("8B")
    config.hf_assets_path = "./assets/hf/Meta-Llama-3-8B"
    config.training.seq_len = 32768
    # the model's rotary embedding (the flavor's may differ: Llama-3.2 scales by 32, Llama-3 not at all)
    for layer in config.model_spec.model.layers:
        layer.attention.rope = dataclasses.replace(layer.attention.rope, theta=500000.0, scaling="none")
    config.training.local_batch_size = 1
    # gradient accumulation 1 = global / (local x data-parallel degree 8)
    config.training.global_batch_size = 8
    config.training.dtype = "float32"
    config.training.mixed_precision_param = "bfloat16"
    config.parallelism.data_parallel_replicate_degree = 1
    config.parallelism.data_parallel_shard_degree = 8
    config.parallelism.context_parallel_degree = 1
    config.parallelism.expert_parallel_degree = 1
    # every degree the plan has none of (llama3_70b's base config sets tensor parallel 8)
    config.parallelism.tensor_parallel_degree = 1
    config.parallelism.pipeline_parallel_degree = 1
    config.training.enable_cpu_offload = False
    config.compile.enable = False  # the prediction is of eager PyTorch
    config.training.disable_cuda_graphs = True  # (a captured step keeps its own memory pool)
    config.parallelism.fsdp_reshard_after_forward = "never"
    config.activation_checkpoint = FullAC.Config()
    config.loss = ChunkedLossWrapper.Config(num_chunks=2, loss_fn=CrossEntropyLoss.Config(global_vocab_size=128256))
    config.optimizer.implementation = "fused"
    return config
