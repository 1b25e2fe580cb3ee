"""python/mst_referee/deepspeed_zero.py: DeepSpeed's ZeRO-2 engine recorded, and what it allocates.

The run is tiny-llama (models/tiny-llama.json) on 8 data-parallel ranks, ZeRO-2, bf16 with fp32
master weights, a 256-token sequence, eager attention, and DeepSpeed's gradient bucket cut to 4096
elements so that backward fills it several times. Rank 6 is recorded: its partition straddles
several parameters.

The sizes asserted here are derived by hand from the config and DeepSpeed's partitioning rule
(one flat buffer in ``model.parameters()`` order, cut into 8 equal partitions):

* P = 125248 parameters: embedding 256 x 64 = 16384; per layer q 64 x 64 = 4096, k and v
  64 x 32 = 2048 each, o 4096, gate/up/down 64 x 176 = 11264 each, two norms of 64 (46208);
  two layers 92416; final norm 64; lm_head 16384 (untied). 125248 is a multiple of 2 x 8 (the
  NCCL start alignment of bf16 times the ranks), so nothing is padded: a partition is 15656.
* Rank 6 holds elements [93936, 109592). In parameter order layer 1 runs from 62592: q, k, v, o,
  gate (74880), up (86144), down (97408), the norms (108672, 108736); the final norm 108800;
  lm_head 108864. So rank 6 holds the last 3472 elements of up, down (11264), both norms, the
  final norm and the first 728 of lm_head; the parameters it touches hold 11264 + 11264 + 64 + 64
  + 64 + 16384 = 39104 elements (DeepSpeed's ``grads_in_partition`` takes them whole).

With the bucket DeepSpeed's default (5e8 elements, as ``mst-plan emit --format deepspeed`` leaves it),
the hf runtime's prediction of the same setup (src/core/sim/deepspeed.cpp) is compared event by event
(``mst-plan compare --run``): ZeRO-2 on rank 6; ZeRO-1 with three micro-steps; pure bf16 (DeepSpeed's
bf16 master flags) on 3 ranks, whose last partition ends in padding.

ZeRO-3 runs tiny-llama on 3 ranks (rank 1), with nothing persistent
(``stage3_param_persistence_threshold`` 0: every parameter is partitioned and gathered) and the same
4096-element bucket. Each parameter is partitioned on its own: part(n) = ceil(n / 3), so
embedding and lm_head 16384 -> 5462, q and o 4096 -> 1366, k and v 2048 -> 683, gate/up/down
11264 -> 3755, a norm 64 -> 22; a layer 1366 + 683 + 683 + 1366 + 3 x 3755 + 2 x 22 = 15407; the
model 5462 + 2 x 15407 + 22 + 5462 = 41760 per rank (125248 elements padded to 125280 on 3).

They run in a fresh interpreter (the run owns the process's default process group), with
DeepSpeed from MST_CLIENTS_PATH (scripts/test installs it; ctest then requires it).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLIENTS = os.environ.get("MST_CLIENTS_PATH", "")

P, RANKS, RANK, BUCKET = 125248, 8, 6, 4096
PARTITION = P // RANKS
SETUP = {"micro_batch": 1, "seq_len": 256, "grad_accum": 1, "precision": "bf16-master", "optimizer": "adamw",
         "optimizer_state_dtype": "fp32", "attention": "eager", "dp": RANKS, "zero_stage": 2, "runtime": "kernels",
         "checkpoint": [], "reduce_bucket_size": BUCKET}
DS_CONFIG = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
             "bf16": {"enabled": True}, "zero_optimization": {"stage": 2, "reduce_bucket_size": BUCKET},
             "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                       "weight_decay": "auto"}}}


# ZeRO-1 with three micro-steps: it reduces the gradients in the last micro-step's backward only.
ZERO1 = dict(SETUP, zero_stage=1, grad_accum=3)
ZERO1_DS = dict(DS_CONFIG, gradient_accumulation_steps=3, zero_optimization={"stage": 1, "reduce_bucket_size": BUCKET})
# ZeRO-3 on 3 ranks, nothing persistent.
W3, RANK3 = 3, 1
PARTS3 = {"embed": 5462, "q": 1366, "k": 683, "v": 683, "o": 1366, "mlp": 3755, "norm": 22, "lm_head": 5462}
LAYER3 = ["q", "k", "v", "o", "mlp", "mlp", "mlp", "norm", "norm"]  # (parameter order: attention, MLP, norms)
ORDER3 = ["embed"] + LAYER3 * 2 + ["norm", "lm_head"]  # model.parameters(): 21 parameters
NUMEL = {"embed": 16384, "q": 4096, "k": 2048, "v": 2048, "o": 4096, "mlp": 11264, "norm": 64, "lm_head": 16384}
PART3 = sum(PARTS3[p] for p in ORDER3)
ZERO3 = dict(SETUP, dp=W3, zero_stage=3, runtime="hf", param_persistence_threshold=0)
ZERO3_DS = dict(DS_CONFIG, zero_optimization={"stage": 3, "reduce_bucket_size": BUCKET,
                                              "stage3_param_persistence_threshold": 0})
DEFAULT_BUCKET = 500_000_000  # DeepSpeed's reduce_bucket_size
# ZeRO-3 as the hf runtime predicts it, event for event (src/core/sim/zero3.cpp): the run above; every
# layer checkpointed with two micro-steps and the norms persistent (a threshold of 100 elements), rank 2;
# two MLP mini-sequences with every layer checkpointed and the 4096-element bucket, rank 1; flash
# attention with layer 1 checkpointed, rank 0.
PERSISTENT = {"param_persistence_threshold": 100}
ZERO3_CASES = {
    "checkpointed": (dict(SETUP, dp=W3, zero_stage=3, runtime="hf", checkpoint=[0, 1], grad_accum=2,
                          reduce_bucket_size=DEFAULT_BUCKET, **PERSISTENT),
                     dict(DS_CONFIG, gradient_accumulation_steps=2,
                          zero_optimization={"stage": 3, "stage3_param_persistence_threshold": 100}), 2),
    "mlp chunks": (dict(SETUP, dp=W3, zero_stage=3, runtime="hf", checkpoint=[0, 1], mlp_chunks=2, **PERSISTENT),
                   dict(DS_CONFIG, zero_optimization={"stage": 3, "reduce_bucket_size": BUCKET,
                                                      "stage3_param_persistence_threshold": 100}), 1),
    "flash": (dict(SETUP, dp=W3, zero_stage=3, runtime="hf", attention="flash", checkpoint=[1],
                   reduce_bucket_size=DEFAULT_BUCKET, **PERSISTENT),
              dict(DS_CONFIG, zero_optimization={"stage": 3, "stage3_param_persistence_threshold": 100}), 0),
    # transformers' default sdpa: PyTorch's flash kernel, aten's node
    "sdpa": (dict(SETUP, dp=W3, zero_stage=3, runtime="hf", attention="sdpa", checkpoint=[0], mlp_chunks=2,
                  reduce_bucket_size=DEFAULT_BUCKET, **PERSISTENT),
             dict(DS_CONFIG, zero_optimization={"stage": 3, "stage3_param_persistence_threshold": 100}), 1),
    # python/mst_hf's chunked loss inside lm_head's forward: recomputed with MLP chunks and two
    # micro-steps; fused with nothing checkpointed
    "lm chunks": (dict(SETUP, dp=W3, zero_stage=3, runtime="hf", checkpoint=[0, 1], grad_accum=2, mlp_chunks=2,
                       lm_chunks=3, lm_impl="recompute", **PERSISTENT),
                  dict(DS_CONFIG, gradient_accumulation_steps=2,
                       zero_optimization={"stage": 3, "reduce_bucket_size": BUCKET, "stage3_param_persistence_threshold": 100}), 2),
    "lm chunks fused": (dict(SETUP, dp=W3, zero_stage=3, runtime="hf", lm_chunks=2, lm_impl="fused", **PERSISTENT),
                        dict(DS_CONFIG, zero_optimization={"stage": 3, "reduce_bucket_size": BUCKET,
                                                           "stage3_param_persistence_threshold": 100}), 0),
    # checkpoints offloaded by python/mst_hf (save_on_cpu), nothing persistent: the input norms too are
    # gathered and released around the recompute
    "offload": (dict(SETUP, dp=W3, zero_stage=3, runtime="hf", checkpoint=[0, 1], offload_checkpoints=True, grad_accum=2,
                     lm_chunks=2, param_persistence_threshold=0),
                dict(DS_CONFIG, gradient_accumulation_steps=2,
                     zero_optimization={"stage": 3, "reduce_bucket_size": BUCKET, "stage3_param_persistence_threshold": 0}), 1),
    # python/mst_hf's tiled MLP (ALST's way under ZeRO-3), layer 1 checkpointed, 4 chunks: the 4096 bucket is
    # flushed by chunks whose gradients it does not take yet
    "tiled": (dict(SETUP, dp=W3, zero_stage=3, runtime="hf", checkpoint=[1], mlp_chunks=4, mlp_impl="tiled", **PERSISTENT),
              dict(DS_CONFIG, zero_optimization={"stage": 3, "reduce_bucket_size": BUCKET, "stage3_param_persistence_threshold": 100}),
              1),
    # Qwen2 (untied): q, k and v biases, second parameters of their modules; nothing persistent (each
    # gathered with its weight)
    "qwen2": (dict(SETUP, dp=W3, zero_stage=3, runtime="hf", checkpoint=[0], lm_chunks=2, param_persistence_threshold=0),
              dict(DS_CONFIG, zero_optimization={"stage": 3, "reduce_bucket_size": BUCKET, "stage3_param_persistence_threshold": 0}),
              1, str(REPO / "tests" / "data" / "tiny_qwen2_untied.json")),
    # Qwen3 (untied): its q and k head norms are modules of the attention, gathered and released too
    "qwen3": (dict(SETUP, dp=W3, zero_stage=3, runtime="hf", checkpoint=[1], lm_chunks=2, param_persistence_threshold=0),
              dict(DS_CONFIG, zero_optimization={"stage": 3, "reduce_bucket_size": BUCKET, "stage3_param_persistence_threshold": 0}),
              2, str(REPO / "tests" / "data" / "tiny_qwen3_untied.json")),
    # tied embeddings (one Parameter in embed_tokens and lm_head, fetched by both): lm_head's gradient takes
    # the embedding's in place before DeepSpeed's hook; two micro-steps, MLP and LM head chunks, the norms
    # persistent
    "tied": (dict(SETUP, dp=W3, zero_stage=3, runtime="hf", checkpoint=[0, 1], grad_accum=2, mlp_chunks=2, lm_chunks=3,
                  lm_impl="recompute", **PERSISTENT),
             dict(DS_CONFIG, gradient_accumulation_steps=2,
                  zero_optimization={"stage": 3, "reduce_bucket_size": BUCKET, "stage3_param_persistence_threshold": 100}),
             1, str(REPO / "tests" / "data" / "tiny_qwen3.json")),
    # Phi-3 (tied, partial rotary, longrope): fused qkv_proj and gate_up_proj, one parameter each; its
    # residual dropouts are modules whose hooks count; longrope's long_inv_freq is held as a buffer
    "phi3": (dict(SETUP, dp=W3, zero_stage=3, runtime="hf", checkpoint=[0], mlp_chunks=2, lm_chunks=2, **PERSISTENT),
             dict(DS_CONFIG, zero_optimization={"stage": 3, "reduce_bucket_size": BUCKET, "stage3_param_persistence_threshold": 100}),
             2, str(REPO / "tests" / "data" / "tiny_phi3_longrope.json")),
    # Gemma-2 (tied, soft-capped): four norms per layer, each a module; a checkpointed layer's recompute
    # runs in the backward of the norm after its MLP, before the MLP's pre-backward fetch
    "gemma2": (dict(SETUP, dp=W3, zero_stage=3, runtime="hf", checkpoint=[1], mlp_chunks=2, grad_accum=2, **PERSISTENT),
               dict(DS_CONFIG, gradient_accumulation_steps=2,
                    zero_optimization={"stage": 3, "reduce_bucket_size": BUCKET, "stage3_param_persistence_threshold": 100}),
               0, str(REPO / "tests" / "data" / "tiny_gemma2.json")),
    # Gemma-3 (tied, 5 local : 1 global): its head norms after the three projections; the rotary module
    # called once per layer type
    "gemma3": (dict(SETUP, dp=W3, zero_stage=3, runtime="hf", checkpoint=[1], mlp_chunks=2, lm_chunks=3, lm_impl="recompute",
                    **PERSISTENT),
               dict(DS_CONFIG, zero_optimization={"stage": 3, "reduce_bucket_size": BUCKET, "stage3_param_persistence_threshold": 100}),
               2, str(REPO / "tests" / "data" / "tiny_gemma3.json")),
    # Mixtral: its sparse block is one of DeepSpeed's default leaf modules (router and experts gathered and
    # reduced together); three MLP chunks, whose stacked experts' gradients are summed in place after the
    # first sum, layer 1 checkpointed, two micro-steps
    "mixtral": (dict(SETUP, dp=W3, zero_stage=3, runtime="hf", checkpoint=[1], mlp_chunks=3, grad_accum=2,
                     reduce_bucket_size=DEFAULT_BUCKET, param_persistence_threshold=0),
                dict(DS_CONFIG, gradient_accumulation_steps=2,
                     zero_optimization={"stage": 3, "stage3_param_persistence_threshold": 0}),
                0, str(REPO / "tests" / "data" / "tiny_mixtral.json")),
    # Qwen3-MoE (tied; experts registered before the router), every layer checkpointed, offloaded
    "qwen3 moe": (dict(SETUP, dp=W3, zero_stage=3, runtime="hf", checkpoint=[0, 1], offload_checkpoints=True, mlp_chunks=2,
                       lm_chunks=2, **PERSISTENT),
                  dict(DS_CONFIG, zero_optimization={"stage": 3, "reduce_bucket_size": BUCKET, "stage3_param_persistence_threshold": 100}),
                  2, str(REPO / "tests" / "data" / "tiny_qwen3_moe.json")),
    # gpt-oss: no leaf, its router and experts modules hooked per chunk; q, k, v, o and router biases, the
    # experts' biases and the attention's sinks gathered with their modules (nothing persistent); the
    # chunked router's weight and bias gradients summed anew
    "gpt-oss": (dict(SETUP, dp=W3, zero_stage=3, runtime="hf", checkpoint=[1], mlp_chunks=2, grad_accum=2,
                     param_persistence_threshold=0),
                dict(DS_CONFIG, gradient_accumulation_steps=2,
                     zero_optimization={"stage": 3, "reduce_bucket_size": BUCKET, "stage3_param_persistence_threshold": 0}),
                1, str(REPO / "tests" / "data" / "tiny_gpt_oss.json")),
}
# python/mst_hf's tiled MLP under ZeRO-3 (ALST's way: its gradients accumulate chunk by chunk, reduced
# after the last): DeepSpeed runs it alike on fake and real tensors.
ZERO3_TILED = dict(ZERO3, mlp_chunks=3, mlp_impl="tiled", checkpoint=[1])
# overlap_comm: two buckets; ZeRO-2 on rank 6, ZeRO-1 (three micro-steps) reducing in the last one's hooks.
OVERLAP = {"zero2": (dict(SETUP, runtime="hf", overlap_comm=True),
                     dict(DS_CONFIG, zero_optimization={"stage": 2, "reduce_bucket_size": BUCKET, "overlap_comm": True})),
           "zero1": (dict(ZERO1, runtime="hf", overlap_comm=True),
                     dict(ZERO1_DS, zero_optimization={"stage": 1, "reduce_bucket_size": BUCKET, "overlap_comm": True}))}
# The emitted defaults (no reduce_bucket_size), for the comparison with the hf runtime.
DEFAULTS = {
    "zero2": (dict(SETUP, runtime="hf", reduce_bucket_size=DEFAULT_BUCKET), dict(DS_CONFIG, zero_optimization={"stage": 2}), RANK),
    "zero1": (dict(ZERO1, runtime="hf", reduce_bucket_size=DEFAULT_BUCKET), dict(ZERO1_DS, zero_optimization={"stage": 1}), RANK),
    "pure3": (dict(SETUP, runtime="hf", dp=3, precision="pure-bf16", optimizer_state_dtype="bf16",
                   reduce_bucket_size=DEFAULT_BUCKET),
              dict(DS_CONFIG, bf16={"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True},
                   zero_optimization={"stage": 2}), 2),
}
needs_clients = pytest.mark.skipif(not CLIENTS, reason="MST_CLIENTS_PATH is not set (scripts/test sets it)")
# (hash seed 0: Gemma-3's rotary tables come in the order of a set of strings, the order mst-plan models)
ENV = dict(os.environ, PYTHONPATH=f"{CLIENTS}:{REPO / 'python'}", PYTHONHASHSEED="0")


@pytest.fixture(scope="module")
def runs():
    """The step's events on fake tensors and on real ones (CPU), and ZeRO-1's on fake tensors, in one
    fresh interpreter."""
    if not CLIENTS:
        pytest.skip("MST_CLIENTS_PATH is not set (scripts/test sets it)")
    code = ("import json, sys; from mst_referee import deepspeed_zero as dz; a = json.loads(sys.argv[1]); "
            "job = lambda setup, model='tiny-llama': dz.job_for_deepspeed({'format': 'mst-plan/1', 'model': model, "
            "'gpu': 'h100-sxm-80gb', 'gpus': setup['dp'], 'setup': setup}); "
            "out = {d: dz.deepspeed_step(job(a['setup']), a['ds'], a['rank'], device=d) for d in ('fake', 'cpu')}; "
            "out['zero1'] = dz.deepspeed_step(job(a['zero1']), a['zero1_ds'], a['rank']); "
            "out['zero3'] = {d: dz.deepspeed_step(job(a['zero3']), a['zero3_ds'], a['rank3'], device=d) for d in ('fake', 'cpu')}; "
            "out['zero3_files'] = {'bucket 4096': dz.measurement_file(job(a['zero3']), out['zero3']['fake'])}; "
            "out['zero3_files'].update({k: (lambda j: dz.measurement_file(j, dz.deepspeed_step(j, ds, rank)))(job(setup, *model)) "
            "for k, (setup, ds, rank, *model) in a['zero3_cases'].items()}); "
            "out['small_bucket'] = {'zero2': dz.measurement_file(job(a['setup']), out['fake']), "
            "'zero1': dz.measurement_file(job(a['zero1']), out['zero1'])}; "
            "out['defaults'] = {k: (lambda j: dz.measurement_file(j, dz.deepspeed_step(j, ds, rank)))(job(setup)) "
            "for k, (setup, ds, rank) in a['defaults'].items()}; "
            "out['overlap'] = {k: (lambda j: dz.measurement_file(j, dz.deepspeed_step(j, ds, a['rank'])))(job(setup)) "
            "for k, (setup, ds) in a['overlap'].items()}; "
            "out['zero3_tiled'] = {d: dz.deepspeed_step(job(a['zero3_tiled']), a['zero3_ds'], a['rank3'], device=d)['events'] "
            "for d in ('fake', 'cpu')}; print(json.dumps(out))")
    arg = json.dumps({"setup": SETUP, "ds": DS_CONFIG, "zero1": ZERO1, "zero1_ds": ZERO1_DS, "rank": RANK,
                      "zero3": ZERO3, "zero3_ds": ZERO3_DS, "rank3": RANK3, "zero3_cases": ZERO3_CASES, "defaults": DEFAULTS,
                      "overlap": OVERLAP, "zero3_tiled": ZERO3_TILED})
    r = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, env=ENV, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _named(events, name_prefix, phase=None):
    return [e for e in events if e[0] == "alloc" and e[9].startswith(name_prefix) and (phase is None or e[5] == phase)]


def _numel(name):
    """Elements of the tensor a recorder event names ("_to_copy torch.float64[64, 176]": 11264)."""
    n = 1
    for d in name[name.index("[") + 1:name.index("]")].split(","):
        n *= int(d)
    return n


def _freed_in(events, tensor):
    return [e[5] for e in events if e[0] == "free" and e[1] == tensor]


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_fake_tensors_and_the_stand_ins_allocate_what_real_tensors_do(runs, stage):
    r = runs if stage == "zero2" else runs["zero3"]
    fake, real = r["fake"]["events"], r["cpu"]["events"]
    # (the tensor ids are compared through the order; names of what DeepSpeed keeps are generic)
    step = lambda events: [e[:1] + e[2:] for e in events if e[5] != "init"]
    assert step(fake) == step(real)
    held = lambda events: [e[2:] for e in events if e[5] == "init" and e[8] != "init.deepspeed"]
    assert held(fake) == held(real)


def test_python_mst_hfs_tiled_mlp_runs_under_zero_3(runs):
    fake, real = runs["zero3_tiled"]["fake"], runs["zero3_tiled"]["cpu"]
    step = lambda events: [e[:1] + e[2:] for e in events if e[5] != "init"]
    assert step(fake) == step(real)
    # layer 0's backward, chunk by chunk (256 tokens in 86, 85, 85): down_proj's input gradient [n, 176], and
    # its weight's gradient [64, 176], the first chunk's kept as .grad, the others summed into it and freed
    down = [e for e in fake if e[0] == "alloc" and e[5] == "backward" and e[6] == 0 and e[8] == "model.layers.0.mlp.down_proj"]
    assert [e[9] for e in down if e[9].endswith(", 176]") and not e[9].startswith("mm bf16[64")] == \
        ["mm bf16[86, 176]", "mm bf16[85, 176]", "mm bf16[85, 176]"]
    assert [e[3] for e in down if e[9] == "mm bf16[64, 176]"] == ["gradients", "transient", "transient"]


def test_the_partition_and_the_flat_buffer_follow_deepspeeds_partitioning(runs):
    r = runs["fake"]
    assert r["engine"]["partition_numel"] == [PARTITION]
    events = r["events"]
    assert [e[2] for e in _named(events, "flat_bf16_group0", "init")] == [2 * P]
    assert [e[2] for e in _named(events, "fp32_partition_group0", "init")] == [4 * PARTITION] * 3  # master, exp_avg, exp_avg_sq


def test_backward_holds_one_gradient_bucket_and_the_partitions_gradients(runs):
    events = runs["fake"]["events"]
    bucket = _named(events, "empty bf16[4096]", "backward")
    assert len(bucket) == 1 and bucket[0][8] == "lm_head"  # made for the first gradient (overlap_comm off: one)
    assert _freed_in(events, bucket[0][1]) == ["backward"]
    grads = _named(events, "empty bf16[39104]", "backward")
    assert len(grads) == 1 and _freed_in(events, grads[0][1]) == ["optimizer"]
    assert bucket[0][3] == grads[0][3] == "gradients"  # (DeepSpeed's gradient memory, as .grad is in a plain step)


def test_the_step_copies_the_partitions_gradient_to_fp32_and_takes_norms_in_fp64(runs):
    events = runs["fake"]["events"]
    pieces = sorted(_numel(e[9]) for e in _named(events, "_to_copy torch.float64", "optimizer"))
    assert pieces == sorted([3472, 11264, 64, 64, 64, 728])  # every piece of rank 6's partition
    flat, fp32 = _named(events, "cat bf16[15656]", "optimizer"), _named(events, "_to_copy f32[15656]", "optimizer")
    assert len(flat) == 1 and len(fp32) == 1 and fp32[0][1] > flat[0][1]
    assert (flat[0][3], fp32[0][3]) == ("transient", "gradients")


def test_zero_1_reduces_in_the_last_micro_steps_backward_which_is_recorded(runs):
    events = runs["zero1"]["events"]
    grads = _named(events, "empty bf16[39104]", "backward")
    assert len(grads) == 1 and grads[0][7] == 1  # the last of three micro-steps, recorded as micro-step 1
    assert _freed_in(events, grads[0][1]) == ["optimizer"]
    assert runs["zero1"]["micro_steps"] == 3 and runs["zero1"]["micro_steps_recorded"] == 2


def test_zero_3_holds_the_partitions_their_gradients_and_one_bucket(runs):
    r = runs["zero3"]["fake"]
    assert r["engine"]["zero_stage"] == 3 and r["engine"]["partition_numel"] == [PART3] == [41760]
    init = {e[9]: (e[2], e[3]) for e in r["events"] if e[5] == "init"}
    assert init["lp_param_buffer"] == (2 * PART3, "weights")
    assert init["grad_partitions_flat_buffer"] == (2 * PART3, "gradients")
    assert init["ipg_bucket.torch.bfloat16"] == (2 * BUCKET, "gradients")
    for name in ("fp32_partition_group0", "fp32_partition_group0.exp_avg", "fp32_partition_group0.exp_avg_sq"):
        assert init[name][0] == 4 * PART3
    # nothing persistent: no parameter is whole between steps
    assert not [e for e in r["events"] if e[5] == "init" and e[9].startswith("model.") and "rotary" not in e[9]]


def test_zero_3_gathers_every_parameter_in_one_window_and_keeps_it_for_backward(runs):
    """The steady step's first fetch prefetches up to stage3_max_live_parameters (1e9) elements: the
    whole model, in one coalesced gather (its flat buffer W x the partitions), then one copy per
    parameter in parameter order; each copy is used again within stage3_max_reuse_distance (1e9), so
    it is freed in backward."""
    events = runs["zero3"]["fake"]["events"]
    gathered = [e for e in events if e[0] == "alloc" and e[3] == "weights" and e[5] == "forward"]
    assert gathered[0][9] == f"empty bf16[{W3 * PART3}]" and W3 * PART3 == 125280
    assert [_numel(e[9]) for e in gathered[1:]] == [NUMEL[p] for p in ORDER3]
    assert all(e[9].startswith("cat bf16") for e in gathered[1:])
    assert _freed_in(events, gathered[0][1]) == ["forward"]
    assert all(_freed_in(events, e[1]) == ["backward"] for e in gathered[1:])
    assert not [e for e in events if e[0] == "alloc" and e[3] == "weights" and e[5] == "backward"]  # (no gather again)


def test_zero_3_reduce_scatters_each_bucket_padded_to_the_ranks(runs):
    """The bucket rule, by hand: gradients arrive in backward order; one that would take the bucket
    past its 4096 elements first reduces what the bucket holds (a gradient larger than the bucket is
    held as it is, alone); the last bucket is reduced at the end. reduce_scatter_coalesced cats a
    bucket's gradients, each padded to a multiple of the 3 ranks (part(n) x 3), into one buffer."""
    arrivals = ["lm_head", "norm"] + ["mlp", "mlp", "mlp", "norm", "o", "v", "k", "q", "norm"] * 2 + ["embed"]
    buckets, held = [], []
    for p in arrivals:
        if held and sum(NUMEL[q] for q in held) + NUMEL[p] > BUCKET:
            buckets.append(held)
            held = []
        held.append(p)
    buckets.append(held)
    expected = [sum(PARTS3[q] * W3 for q in b) for b in buckets]
    assert expected[:4] == [16386, 66, 11265, 11265] and buckets.count(["v", "k"]) == 2  # (2 x 2048 fill it)
    events = runs["zero3"]["fake"]["events"]
    cats = [_numel(e[9]) for e in events if e[0] == "alloc" and e[5] == "backward" and e[9].startswith("cat bf16")]
    assert cats == expected


def test_zero_3_steps_on_fp64_norms_of_every_partition_piece_and_one_fp32_gradient(runs):
    events = runs["zero3"]["fake"]["events"]
    pieces = [_numel(e[9]) for e in _named(events, "_to_copy torch.float64", "optimizer")]
    assert pieces == [PARTS3[p] for p in ORDER3]  # (parameter order)
    flat, fp32 = _named(events, f"cat bf16[{PART3}]", "optimizer"), _named(events, f"_to_copy f32[{PART3}]", "optimizer")
    assert len(flat) == 1 and len(fp32) == 1 and fp32[0][3] == "gradients"
    assert _freed_in(events, fp32[0][1]) == ["optimizer"]


def _refused(tmp_path, setup, ds_config, blamed, expected):
    """The referee's command on this plan and file: one line naming `blamed` ("plan" or "ds"), exit 2,
    no output file."""
    files = {"plan": tmp_path / "plan.json", "ds": tmp_path / "ds_config.json"}
    files["plan"].write_text(json.dumps({"format": "mst-plan/1", "model": "tiny-llama", "gpu": "h100-sxm-80gb",
                                         "gpus": setup["dp"], "setup": setup}))
    files["ds"].write_text(json.dumps(ds_config))
    r = subprocess.run([sys.executable, "-m", "mst_referee.deepspeed_zero", str(files["plan"]), str(files["ds"]), "--out",
                        str(tmp_path / "out.json")], capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {files[blamed]}: {expected}"), r.stdout
    assert not (tmp_path / "out.json").exists()


@needs_clients
@pytest.mark.parametrize("change, expected", [
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps: expected 1 (the plan's), got 4"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
     "zero_optimization.offload_optimizer: expected none (DeepSpeed's CPU Adam is not run here)"),
    ({"zero_optimization": {"stage": 2, "bogus": 1, "reduce_bucket_size": BUCKET}},
     "deepspeed: DeepSpeed 0.19.8 refused it: ValidationError"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": 2 * BUCKET}},
     f"zero_optimization.reduce_bucket_size: expected the plan's reduce_bucket_size {BUCKET} (elements), got {2 * BUCKET}"),
    ({"zero_optimization": {"stage": 2}},
     f"zero_optimization.reduce_bucket_size: expected the plan's reduce_bucket_size {BUCKET} (elements), got none "
     "(DeepSpeed's default 500000000)"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": True}},
     f"zero_optimization.reduce_bucket_size: expected the plan's reduce_bucket_size {BUCKET} (elements), got true"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": BUCKET, "overlap_comm": True}},
     "zero_optimization.overlap_comm: expected the plan's overlap_comm false, got true"),
])
def test_a_file_that_is_not_the_plans_is_one_line_and_exit_2(tmp_path, change, expected):
    _refused(tmp_path, SETUP, dict(DS_CONFIG, **change), "ds", expected)


@needs_clients
@pytest.mark.parametrize("zero, expected", [
    ({"stage": 3, "reduce_bucket_size": BUCKET},
     "zero_optimization.stage3_param_persistence_threshold: expected the plan's param_persistence_threshold 0 (elements), got "
     "none (DeepSpeed's default 100000)"),
    ({"stage": 3, "reduce_bucket_size": BUCKET, "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 1000},
     "zero_optimization.stage3_prefetch_bucket_size: expected the plan's prefetch_bucket_size 50000000 (elements), got 1000"),
    ({"stage": 3, "reduce_bucket_size": BUCKET, "stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 10},
     "zero_optimization.stage3_max_live_parameters: expected the plan's max_live_parameters 1000000000 (elements), got 10"),
])
def test_a_zero_3_file_that_is_not_the_plans_is_one_line_and_exit_2(tmp_path, zero, expected):
    _refused(tmp_path, ZERO3, dict(DS_CONFIG, zero_optimization=zero), "ds", expected)


@needs_clients
@pytest.mark.parametrize("setup, expected", [
    (dict(SETUP, reduce_bucket_size="4096"), 'setup.reduce_bucket_size: expected an integer in [1, 1099511627776], got "4096"'),
    (dict(SETUP, reduce_bucket_size=0), "setup.reduce_bucket_size: expected an integer in [1, 1099511627776], got 0"),
    (dict(SETUP, param_persistence_threshold=0), "setup.param_persistence_threshold: expected DeepSpeed's default 100000 "
                                                 "unless ZeRO-3 runs, got 0"),
    (dict(ZERO3, prefetch_bucket_size=-1), "setup.prefetch_bucket_size: expected an integer in [0, 1099511627776], got -1"),
    (dict(SETUP, reduce_bucket_size=4096.5), "setup.reduce_bucket_size: expected an integer in [1, 1099511627776], got 4096.5"),
    (dict(SETUP, overlap_comm="yes"), 'setup.overlap_comm: expected true or false (false under ZeRO-3: mst-plan plans the '
                                      'overlap_comm of ZeRO 1/2 only), got "yes"'),
    (dict(ZERO3, overlap_comm=True), "setup.overlap_comm: expected true or false (false under ZeRO-3"),
])
def test_a_plan_whose_bucket_mst_plan_would_refuse_is_one_line_and_exit_2(tmp_path, setup, expected):
    _refused(tmp_path, setup, DS_CONFIG, "plan", expected)


def test_a_plans_bucket_reads_as_mst_plan_reads_it():
    """An integral number (4096.0, 5e8) is an integer and null the default, as parse_setup reads them."""
    from mst_referee import deepspeed_zero as dz

    read = lambda value: dz.check_plan({"setup": dict(SETUP, reduce_bucket_size=value)}, "plan")["reduce_bucket_size"]
    assert read(4096.0) == 4096 and isinstance(read(4096.0), int)
    assert read(5e8) == read(None) == 500_000_000


@pytest.mark.parametrize("stage", sorted(OVERLAP))
def test_overlap_comm_makes_a_second_bucket_with_the_first(runs, stage):
    """setup_buckets makes both at the first gradient (lm_head's, micro-step 0: ZeRO-2's one micro-step,
    ZeRO-1's first of three, kept to the last one's epilogue) and _release_ipg_buffers lets both go."""
    events = runs["overlap"][stage]["timeline"]["events"]
    buckets = [e for e in events if e[0] == "alloc" and e[9] == f"empty bf16[{BUCKET}]"]
    assert [(e[2], e[8], e[7]) for e in buckets] == [(2 * BUCKET, "lm_head", 0)] * 2
    freed = [e for e in events if e[0] == "free" and e[1] in {b[1] for b in buckets}]
    assert [e[5] for e in freed] == ["backward"] * len(buckets)


@pytest.mark.parametrize("case", sorted(DEFAULTS) + ["zero2 bucket 4096", "zero1 bucket 4096", "zero2 overlap_comm",
                                  "zero1 overlap_comm"])
def test_the_hf_runtime_predicts_deepspeeds_step_event_for_event(runs, case, tmp_path, mst_plan):
    """With the emitted defaults, with the bucket cut to 4096 elements (the plan's reduce_bucket_size:
    several reductions per backward, the groups of allreduce_and_scatter), and with overlap_comm on it
    (two buckets taking turns; ZeRO-1 reducing in the last micro-step's hooks)."""
    measured = tmp_path / "measured.json"
    stage, kind = (case, "") if case in DEFAULTS else case.split(" ", 1)
    record = runs["defaults"][case] if case in DEFAULTS else runs["overlap" if kind == "overlap_comm" else "small_bucket"][stage]
    measured.write_text(json.dumps(record))
    assert record["timeline"]["rank"] == (DEFAULTS[case][2] if case in DEFAULTS else RANK)
    assert record["setup"]["reduce_bucket_size"] == (BUCKET if case not in DEFAULTS else DEFAULT_BUCKET)
    assert record["setup"]["overlap_comm"] is (kind == "overlap_comm")
    assert f"overlap_comm {kind == 'overlap_comm'}" in record["notes"][1]  # (the engine's own value)
    r = subprocess.run([str(mst_plan), "--json", "compare", "--run", str(measured)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["first_divergence"] is None and out["identical"] is True, out["first_divergence"]



@pytest.mark.parametrize("case", ["bucket 4096"] + sorted(ZERO3_CASES))
def test_the_hf_runtime_predicts_deepspeeds_zero_3_step_event_for_event(runs, case, tmp_path, mst_plan):
    """ZeRO-3: every gather, copy and release of DeepSpeed's coordinator, the bucket's reduce-scatters and the
    step, with nothing persistent and a 4096-element bucket; with the norms persistent, every layer
    checkpointed (the recompute's fetches) and two micro-steps; with flash attention; with python/mst_hf's
    MLP and LM head mini-sequences (the loss inside lm_head's forward); with offloaded checkpoints; Qwen2 and Qwen3;
    tied embeddings; Phi-3; Gemma-2; Gemma-3; Mixtral, Qwen3-MoE and gpt-oss."""
    record = runs["zero3_files"][case]
    assert record["setup"]["zero_stage"] == 3 and record["setup"]["runtime"] == "hf"
    assert "ZeRO-3 engine" in record["notes"][0]
    measured = tmp_path / "measured.json"
    measured.write_text(json.dumps(record))
    # (from the checkout's root: a test model's model_path is relative to it)
    r = subprocess.run([str(mst_plan), "--json", "compare", "--run", str(measured)], capture_output=True, text=True, timeout=120,
                       cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["first_divergence"] is None and out["identical"] is True, out["first_divergence"]
