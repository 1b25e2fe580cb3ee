"""The simulator's hf runtime equals the referee event by event.

Each case runs the real transformers + PyTorch step (python/mst_referee on fake tensors: the
model built from its config.json, the setup applied through python/mst_hf as a GPU run applies
it) and hands the record to `mst-plan compare --run`, which simulates the same setup with the
hf runtime and compares every allocation and free: same bytes, same order, same phase. The
cases cover the knobs a user sets and the model families whose code differs (Llama; Mistral
with sliding windows and tied embeddings; Qwen2's attention biases; Qwen3's q/k norms; Gemma-2's
post-norms, soft-capping, scaled embeddings and GeGLU; Gemma-3; Phi-3's fused projections and
partial rotary; Mixtral's, Qwen3-MoE's and gpt-oss's experts; gpt-oss's attention sinks), and one rank of data parallelism (DDP). Nothing here is a number written by hand: both
sides are computed, one by PyTorch and one by mst-plan.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from mst_referee import cli, jobs  # noqa: E402

REPO = jobs.REPO_ROOT
LLAMA = "tiny-llama"
MISTRAL = str(REPO / "tests" / "data" / "tiny_sliding_tied.json")
QWEN2 = str(REPO / "tests" / "data" / "tiny_qwen2.json")
GEMMA2 = str(REPO / "tests" / "data" / "tiny_gemma2.json")
QWEN3 = str(REPO / "tests" / "data" / "tiny_qwen3.json")
QWEN3_MQA = str(REPO / "tests" / "data" / "tiny_qwen3_mqa.json")
GEMMA3 = str(REPO / "tests" / "data" / "tiny_gemma3.json")
GEMMA3_GLOBAL = str(REPO / "tests" / "data" / "tiny_gemma3_global.json")
MQA = str(REPO / "tests" / "data" / "tiny_mqa.json")
MHA = str(REPO / "tests" / "data" / "tiny_mha.json")
PHI3 = str(REPO / "tests" / "data" / "tiny_phi3.json")
PHI3_SLIDING = str(REPO / "tests" / "data" / "tiny_phi3_sliding.json")
PHI3_LONGROPE = str(REPO / "tests" / "data" / "tiny_phi3_longrope.json")
PHI3_MQA = str(REPO / "tests" / "data" / "tiny_phi3_mqa.json")
MIXTRAL = str(REPO / "tests" / "data" / "tiny_mixtral.json")
QWEN3_MOE = str(REPO / "tests" / "data" / "tiny_qwen3_moe.json")
QWEN3_MOE_TOP1 = str(REPO / "tests" / "data" / "tiny_qwen3_moe_top1.json")
GPT_OSS = str(REPO / "tests" / "data" / "tiny_gpt_oss.json")
GPT_OSS_FULL = str(REPO / "tests" / "data" / "tiny_gpt_oss_full.json")
ONE_HEAD = str(REPO / "tests" / "data" / "tiny_one_head.json")

CASES = [
    # Llama: attention, checkpointing (ours and Hugging Face's everywhere), offload.
    (LLAMA, {}),
    (LLAMA, {"checkpoint": [1]}),
    (LLAMA, {"checkpoint": "all"}),
    (LLAMA, {"attention": "eager", "checkpoint": "all", "micro_batch": 2, "mlp_chunks": 2}),
    (LLAMA, {"checkpoint": "all", "offload_checkpoints": True}),
    (LLAMA, {"checkpoint": [0], "offload_checkpoints": True, "grad_accum": 2, "mlp_chunks": 2, "lm_chunks": 2}),
    # sdpa (transformers' default): PyTorch's own FlashAttention-2 kernel, aten's node saving key,
    # query, value, logsumexp and output (released in that order), no packed-sequence check, host RNG
    # seeds; autocast casting q and k; micro-batches, checkpointing and offload around it.
    (LLAMA, {"attention": "sdpa"}),
    (LLAMA, {"attention": "sdpa", "checkpoint": "all"}),
    (LLAMA, {"attention": "sdpa", "precision": "amp", "checkpoint": [1], "grad_accum": 2}),
    (LLAMA, {"attention": "sdpa", "micro_batch": 2, "mlp_chunks": 2, "checkpoint": [0], "offload_checkpoints": True}),
    # MsT: loop and tiled MLP, recompute and fused LM head, with accumulation and micro-batches.
    (LLAMA, {"mlp_chunks": 3, "checkpoint": "all"}),
    (LLAMA, {"mlp_chunks": 3, "mlp_impl": "tiled", "checkpoint": "all", "grad_accum": 2}),
    (LLAMA, {"lm_chunks": 3, "grad_accum": 2, "micro_batch": 2}),
    (LLAMA, {"lm_chunks": 2, "lm_impl": "fused", "grad_accum": 2, "micro_batch": 2, "checkpoint": "all",
             "mlp_chunks": 2}),
    # Optimizers: AdamW's three implementations, SGD, in backward, bf16 master weights.
    (LLAMA, {"optimizer_impl": "foreach"}),
    (LLAMA, {"optimizer_impl": "for-loop"}),
    (LLAMA, {"optimizer": "sgd"}),
    (LLAMA, {"optimizer_in_backward": True}),
    (LLAMA, {"optimizer_in_backward": True, "precision": "bf16-master", "optimizer_impl": "for-loop"}),
    (LLAMA, {"precision": "bf16-master", "grad_accum": 2, "mlp_chunks": 2}),
    # AMP (fp32 weights, bf16 autocast: the HF Trainer's bf16=True on an fp32 model): the fp32
    # residual stream and norms, each linear's weight copy in autocast's cache and its input's own
    # copy, fp32 rotary products, flash-attn's casts, the casts' gradient nodes (a weight copy's
    # sums every chunk's gradient), the cache emptied as each autocast region ends (the forward,
    # a checkpoint's recomputation, a tiled MLP chunk's replay, whose leaf input is cached too),
    # the chunked loss's own bf16 weight copy.
    (LLAMA, {"precision": "amp"}),
    (LLAMA, {"precision": "amp", "checkpoint": [1], "grad_accum": 2}),
    (LLAMA, {"precision": "amp", "checkpoint": "all", "offload_checkpoints": True, "optimizer_impl": "foreach"}),
    (LLAMA, {"precision": "amp", "mlp_chunks": 3, "lm_chunks": 3, "micro_batch": 2}),
    (LLAMA, {"precision": "amp", "mlp_chunks": 3, "mlp_impl": "tiled", "checkpoint": "all", "grad_accum": 2}),
    (LLAMA, {"precision": "amp", "lm_chunks": 2, "lm_impl": "fused", "grad_accum": 2, "micro_batch": 2,
             "checkpoint": "all", "mlp_chunks": 2}),
    (LLAMA, {"precision": "amp", "optimizer_in_backward": True, "optimizer_impl": "for-loop", "lm_chunks": 2}),
    (LLAMA, {"precision": "amp", "optimizer": "sgd"}),
    # Mistral: sliding windows in every layer, tied embeddings.
    (MISTRAL, {}),
    (MISTRAL, {"precision": "amp", "checkpoint": "all", "mlp_chunks": 2, "lm_chunks": 2}),
    (MISTRAL, {"checkpoint": "all", "mlp_chunks": 2, "lm_chunks": 2}),
    (MISTRAL, {"attention": "eager", "checkpoint": "all", "micro_batch": 2}),
    # Qwen2: q/k/v biases, sliding layers, tied embeddings.
    (QWEN2, {}),
    (QWEN2, {"precision": "amp", "checkpoint": [1], "mlp_chunks": 2, "mlp_impl": "tiled", "lm_chunks": 2,
             "grad_accum": 2}),
    (QWEN2, {"attention": "eager", "checkpoint": "all", "mlp_chunks": 2, "lm_chunks": 2}),
    (QWEN2, {"precision": "bf16-master", "optimizer_in_backward": True, "checkpoint": [1], "offload_checkpoints": True}),
    (QWEN2, {"precision": "bf16-master", "grad_accum": 2, "mlp_chunks": 2, "mlp_impl": "tiled",
             "optimizer_impl": "foreach"}),
    # Qwen3: a norm over every query and key head (head_dim 32 != hidden / heads), tied embeddings.
    (QWEN3, {}),
    (QWEN3, {"attention": "eager", "checkpoint": [1], "micro_batch": 2}),
    (QWEN3, {"checkpoint": "all", "mlp_chunks": 2, "lm_chunks": 2, "lm_impl": "fused"}),
    (QWEN3, {"checkpoint": [0], "offload_checkpoints": True, "optimizer_impl": "foreach"}),
    (QWEN3, {"precision": "bf16-master", "optimizer_in_backward": True, "mlp_chunks": 3, "mlp_impl": "tiled"}),
    # AMP: the head norms' fp32 weight leaves q and k fp32 (rotate_half and the RoPE gradients too).
    (QWEN3, {"precision": "amp", "checkpoint": "all", "mlp_chunks": 2, "lm_chunks": 2, "lm_impl": "fused"}),
    (QWEN3, {"precision": "amp", "checkpoint": [0], "offload_checkpoints": True, "mlp_chunks": 3, "mlp_impl": "tiled",
             "grad_accum": 2}),
    # One KV head: k's head norm runs over [tokens, head_dim] rows, as many as the stream's, on a bf16 input.
    (QWEN3_MQA, {"precision": "amp", "checkpoint": "all", "mlp_chunks": 2}),
    # Gemma-2: post-norms, soft-capping (eager and final), scaled embeddings, GeGLU.
    (GEMMA2, {}),
    (GEMMA2, {"attention": "eager", "checkpoint": [0], "micro_batch": 2}),
    # AMP with eager attention: matmul's autocast casts k then q (a cast keeps q's permuted layout,
    # which matmul copies with micro-batches; an expanded k comes out whole); the fp32 mask makes the
    # scores fp32; softmax's fp32 output is the probabilities, cast for P @ v.
    (GEMMA2, {"precision": "amp", "attention": "eager", "checkpoint": [0], "micro_batch": 2}),
    (GEMMA2, {"lm_chunks": 2, "mlp_chunks": 2, "mlp_impl": "tiled", "checkpoint": "all"}),
    (GEMMA2, {"lm_chunks": 3, "lm_impl": "fused", "grad_accum": 2}),
    # AMP: the fp32 scaled embeddings; the fp32 weight's 1 + w needs no copy; a norm on the fp32
    # residual stream keeps its fp32 output, a post-norm casts back to its bf16 branch.
    (GEMMA2, {"precision": "amp", "lm_chunks": 2, "mlp_chunks": 2, "mlp_impl": "tiled", "checkpoint": "all"}),
    (GEMMA2, {"precision": "amp", "checkpoint": [0], "mlp_chunks": 3, "micro_batch": 2, "lm_chunks": 3,
              "lm_impl": "fused", "grad_accum": 2}),
    # One KV head (Gemma-3-1B's): the gradients' reshapes and repeat_kv are views, matmul copies.
    (MQA, {}),
    (MQA, {"attention": "eager", "micro_batch": 2, "checkpoint": "all"}),
    (MQA, {"attention": "eager", "mlp_chunks": 2}),
    (MQA, {"precision": "amp", "attention": "eager", "micro_batch": 2, "checkpoint": "all"}),
    # Gemma-3: q/k norms after the projections, a rotary table per layer type, 2 local : 1 global.
    (GEMMA3, {}),
    (GEMMA3, {"attention": "eager", "checkpoint": [0], "micro_batch": 2}),
    (GEMMA3, {"checkpoint": "all", "mlp_chunks": 2, "lm_chunks": 2, "lm_impl": "fused"}),
    (GEMMA3, {"checkpoint": [2], "offload_checkpoints": True, "optimizer_impl": "foreach"}),
    (GEMMA3, {"precision": "amp", "checkpoint": "all", "mlp_chunks": 2, "lm_chunks": 2, "lm_impl": "fused"}),
    (GEMMA3, {"precision": "bf16-master", "optimizer_in_backward": True, "mlp_chunks": 3, "mlp_impl": "tiled",
              "checkpoint": "all"}),
    # Gemma-3 with every layer global still builds (and, eager, materialises) the sliding mask.
    (GEMMA3_GLOBAL, {"attention": "eager", "checkpoint": "all", "micro_batch": 2}),
    # No KV head shared (Llama-2-7B's attention): with micro-batches, matmul copies q, k and v.
    (MHA, {"attention": "eager", "micro_batch": 2}),
    (MHA, {"attention": "sdpa", "micro_batch": 2}),
    (MQA, {"attention": "sdpa", "checkpoint": "all"}),
    (QWEN3, {"attention": "sdpa", "precision": "bf16-master", "mlp_chunks": 3, "mlp_impl": "tiled", "checkpoint": "all"}),
    (MHA, {"precision": "amp", "attention": "eager", "checkpoint": "all", "micro_batch": 2, "grad_accum": 2}),
    # Phi-3: fused qkv_proj and gate_up_proj (views of one output each), a rotated share of each
    # head concatenated with the rest (partial: 3/4 of the dimensions, tied embeddings, GQA).
    (PHI3, {}),
    (PHI3, {"attention": "eager", "checkpoint": [0], "micro_batch": 2}),
    (PHI3, {"checkpoint": "all", "mlp_chunks": 2, "lm_chunks": 2, "lm_impl": "fused"}),
    (PHI3, {"precision": "bf16-master", "optimizer_in_backward": True, "mlp_chunks": 3, "mlp_impl": "tiled"}),
    # AMP: fused projections cast their input once; cat promotes the bf16 pass-through share to fp32.
    (PHI3, {"precision": "amp", "checkpoint": [0], "offload_checkpoints": True, "mlp_chunks": 3, "mlp_impl": "tiled",
            "grad_accum": 2}),
    (PHI3, {"precision": "amp", "checkpoint": "all", "mlp_chunks": 2, "lm_chunks": 2, "lm_impl": "fused"}),
    # Phi-3-mini's shape: every dimension rotated (the first share is an alias), no KV sharing, a
    # sliding window in every layer; and longrope's frequency choice in every forward.
    # The joined q is [B, H, S, D] in memory, and so is the kernels' output (empty_like(q)): transformers
    # copies it before o_proj; aten's backward (sdpa) makes it contiguous again.
    (PHI3, {"attention": "sdpa", "checkpoint": [0], "lm_chunks": 2}),
    (PHI3, {"attention": "sdpa", "precision": "amp", "checkpoint": "all", "mlp_chunks": 2}),
    (PHI3_SLIDING, {"attention": "eager", "checkpoint": "all", "micro_batch": 2, "mlp_chunks": 2}),
    (PHI3_SLIDING, {"checkpoint": [1], "offload_checkpoints": True, "optimizer_impl": "foreach", "lm_chunks": 2,
                    "mlp_chunks": 3, "mlp_impl": "tiled", "grad_accum": 2}),
    (PHI3_LONGROPE, {"checkpoint": "all"}),
    (PHI3_SLIDING, {"precision": "amp", "micro_batch": 2, "mlp_chunks": 2, "checkpoint": [1]}),
    # One KV head: its rotated k is expanded to every head (a zero stride), which matmul copies.
    (PHI3_MQA, {"attention": "eager", "micro_batch": 2}),
    (PHI3_MQA, {"precision": "amp", "attention": "eager", "micro_batch": 2}),
    # One head: [B, S, H, D] and [B, H, S, D] are one memory order, so neither matmul's folding nor
    # the output's transpose(1, 2).contiguous() copies (P @ v is what o_proj saves).
    (ONE_HEAD, {"attention": "eager", "micro_batch": 2, "checkpoint": [0]}),
    (ONE_HEAD, {"attention": "eager", "precision": "amp", "micro_batch": 2}),
    # Mixture-of-Experts (transformers' grouped_mm experts): Mixtral's fp32 routing weights and
    # renormalised top-2 (with a sliding window in every layer); MsT splitting the tokens before
    # routing, under checkpointing (the recomputation stops inside the experts).
    (MIXTRAL, {}),
    (MIXTRAL, {"checkpoint": "all", "mlp_chunks": 3, "lm_chunks": 2}),
    (MIXTRAL, {"attention": "eager", "micro_batch": 2, "checkpoint": [1], "mlp_chunks": 2}),
    (MIXTRAL, {"precision": "bf16-master", "optimizer_in_backward": True, "mlp_chunks": 2}),
    (MIXTRAL, {"checkpoint": "all", "mlp_chunks": 3, "mlp_impl": "tiled", "lm_chunks": 2}),
    # One-token chunks: the gradient of the pairs' sum is a view, not a copy.
    (MIXTRAL, {"mlp_chunks": 16, "mlp_impl": "tiled", "grad_accum": 2}),
    # AMP: the experts' grouped_mm has no autocast policy: they run on the fp32 stream with the fp32
    # weights (the block's output is fp32); the router is an autocast linear.
    (MIXTRAL, {"precision": "amp", "checkpoint": "all", "mlp_chunks": 3, "mlp_impl": "tiled", "lm_chunks": 2}),
    (MIXTRAL, {"precision": "amp", "micro_batch": 2, "checkpoint": [1], "mlp_chunks": 2}),
    # Qwen3-MoE: bf16 routing weights, top-3 without renormalisation, q/k norms, tied embeddings.
    (QWEN3_MOE, {}),
    (QWEN3_MOE, {"checkpoint": "all", "mlp_chunks": 2, "offload_checkpoints": True, "optimizer_impl": "foreach"}),
    (QWEN3_MOE, {"grad_accum": 2, "mlp_chunks": 3, "lm_chunks": 2, "lm_impl": "fused", "optimizer_impl": "for-loop"}),
    (QWEN3_MOE, {"mlp_chunks": 2, "mlp_impl": "tiled", "precision": "bf16-master", "grad_accum": 2, "checkpoint": [1]}),
    # Top-1 routing, renormalised: no copy of the pairs' gradient, no reduction of the divisor's.
    (QWEN3_MOE_TOP1, {"mlp_chunks": 5, "checkpoint": "all"}),
    (QWEN3_MOE, {"precision": "amp", "grad_accum": 2, "mlp_chunks": 3, "lm_chunks": 2, "lm_impl": "fused"}),
    # gpt-oss (eager attention: its flash path is the kernels hub's, not modelled): attention sinks
    # (a column joined to the scores, the softmax in bf16 over it, the max subtracted first), a
    # sliding and a full layer, half-width rotary tables, every projection biased, the router's
    # softmax over its top-k logits, the experts' clamped activation on interleaved gate and up,
    # each expert bias gathered per pair; its block returns the router scores too (the chunked
    # block None). Six gradients from the tiled MLP's node: their AccumulateGrad order is the
    # engine's heap's (micro-step 2 frees them in it).
    (GPT_OSS, {"attention": "eager"}),
    (GPT_OSS, {"attention": "eager", "checkpoint": "all", "mlp_chunks": 3, "lm_chunks": 2}),
    (GPT_OSS, {"attention": "eager", "micro_batch": 2, "checkpoint": [1], "mlp_chunks": 2, "grad_accum": 2}),
    (GPT_OSS, {"attention": "eager", "mlp_chunks": 3, "mlp_impl": "tiled", "checkpoint": "all", "grad_accum": 2}),
    (GPT_OSS, {"attention": "eager", "optimizer_in_backward": True, "optimizer_impl": "for-loop", "checkpoint": [0],
               "offload_checkpoints": True}),
    (GPT_OSS, {"attention": "eager", "precision": "bf16-master", "mlp_chunks": 2, "optimizer_impl": "foreach"}),
    (GPT_OSS, {"attention": "eager", "lm_chunks": 2, "lm_impl": "fused", "micro_batch": 2, "mlp_chunks": 16}),
    # Only full layers: the model still builds the sliding mask (and holds it to the end).
    (GPT_OSS_FULL, {"attention": "eager", "micro_batch": 2, "checkpoint": [0]}),
    # AMP: fp32 sinks joined to fp32 masked scores (the probabilities cast to v's bf16 by .to), the
    # experts and their bias gathers in fp32; the router's bias copy sums every chunk's gradient.
    (GPT_OSS, {"attention": "eager", "precision": "amp", "checkpoint": "all", "mlp_chunks": 2}),
    (GPT_OSS, {"attention": "eager", "precision": "amp", "mlp_chunks": 3, "mlp_impl": "tiled", "checkpoint": "all",
               "grad_accum": 2, "lm_chunks": 2}),
    (GPT_OSS, {"attention": "eager", "precision": "amp", "micro_batch": 2, "checkpoint": [1], "mlp_chunks": 3,
               "lm_chunks": 2, "lm_impl": "fused"}),
    # Data parallelism: one rank of DistributedDataParallel (its gradient buckets, rebuilt after
    # the first backward: mid-step with accumulation; each forward's broadcast of the buffers, a
    # single-tensor dtype group without a copy for Gemma's scale, two rotary tables for Gemma-3).
    (MHA, {"dp": 4}),
    (QWEN2, {"dp": 2, "grad_accum": 2, "micro_batch": 2, "checkpoint": [1], "lm_chunks": 4}),
    (MISTRAL, {"dp": 8, "precision": "amp", "checkpoint": "all", "optimizer_impl": "foreach"}),
    (GEMMA2, {"dp": 2, "mlp_chunks": 2, "mlp_impl": "tiled"}),
    (GEMMA3, {"dp": 2, "optimizer_impl": "foreach"}),
    (PHI3_LONGROPE, {"dp": 2, "attention": "eager"}),
    (QWEN3_MOE, {"dp": 2, "mlp_chunks": 2, "mlp_impl": "tiled", "checkpoint": "all"}),
    (GPT_OSS, {"attention": "eager", "dp": 2, "mlp_chunks": 2, "mlp_impl": "tiled"}),
]


def _binary():
    path = Path(os.environ.get("MST_PLAN", REPO / "build" / "src" / "mst-plan"))
    return path if path.is_file() else None


@pytest.mark.skipif(_binary() is None, reason="mst-plan is not built (set MST_PLAN or build/)")
@pytest.mark.parametrize("model, knobs", CASES, ids=[f"{Path(m).stem}-{json.dumps(k)}" for m, k in CASES])
def test_the_hf_runtime_equals_the_referee_event_by_event(tmp_path, model, knobs):
    setup = tmp_path / "knobs.json"
    setup.write_text(json.dumps(knobs))
    record = tmp_path / "run.json"
    args = [model, "--setup", str(setup), "--seq", "16", "--device", "fake", "--out", str(record)]
    if model in (GEMMA3, GEMMA3_GLOBAL) and os.environ.get("PYTHONHASHSEED") != "0":
        # Gemma-3's rotary tables come in the order of a set of strings: the command line runs the
        # referee with hash seed 0, the order mst-plan models.
        run = subprocess.run([sys.executable, str(REPO / "scripts" / "torch_crosscheck.py"), *args], capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    else:
        assert cli.main(args) == 0
    assert json.loads(record.read_text())["setup"]["runtime"] == "hf"
    # The record names its model by a path relative to the repository (results stay portable).
    run = subprocess.run([str(_binary()), "compare", "--run", str(record)], capture_output=True, text=True, timeout=120,
                         cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert "timelines identical: every allocation and free matches" in run.stdout, run.stdout[-3000:]
