"""python/mst_clients: the plan matrix, the stand-in model, and the client check's verdicts on
configs stated by hand.

The pure-Python parts always run. The verdicts need DeepSpeed and accelerate
(scripts/python-env.sh's mst_clients_env installs them; ctest passes their directory as
MST_CLIENTS_PATH, and then they must run); they run in a fresh interpreter, because the check
owns the process's default process group, which must not leak into the other tests. The
configs are written here by hand from transformers', accelerate's and DeepSpeed's rules (each
verdict names the code it comes from), so every verdict is independent of the emitter.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mst_clients import ds_check, matrix

REPO = Path(__file__).resolve().parents[2]
CLIENTS = os.environ.get("MST_CLIENTS_PATH", "")


def test_the_matrix_has_thirty_plans_with_distinct_names_on_one_to_sixteen_gpus():
    entries = matrix.default_matrix()
    assert len(entries) >= 30
    assert len({e.name for e in entries}) == len(entries)
    assert {e.gpus for e in entries} >= {1, 2, 4, 8, 16}
    assert {p.split("=")[0] for e in entries for p in e.pins} >= {"zero", "sp", "offload", "micro_batch"}


def test_recommend_arguments_name_the_format_and_the_runtime():
    one = matrix.Entry("llama-3.2-1b", 1, 8192).recommend_args("deepspeed")
    assert one[one.index("--for") + 1] == "deepspeed"
    assert one[one.index("--runtime") + 1] == "hf"
    eight = matrix.Entry("llama-3-8b", 8, 65536, pins=("sp=4", "zero=3")).recommend_args("axolotl")
    assert eight[eight.index("--runtime") + 1] == "kernels"
    assert eight[-4:] == ["--pin", "sp=4", "--pin", "zero=3"]


def test_the_stand_in_keeps_the_architecture_and_the_head_counts():
    raw = {"model_type": "qwen3_moe", "hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 4,
           "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
           "num_hidden_layers": 48, "vocab_size": 151936, "pad_token_id": 151643, "eos_token_id": [151645, 7],
           "layer_types": ["full_attention"] * 48, "max_position_embeddings": 40960, "_mst": {"name": "x"}}
    tiny = ds_check.tiny_model_config(raw)
    assert tiny["model_type"] == "qwen3_moe" and "_mst" not in tiny
    # Ulysses divides heads: the real counts stay, the width follows them (32 x 8)
    assert (tiny["num_attention_heads"], tiny["num_key_value_heads"], tiny["hidden_size"]) == (32, 4, 256)
    assert (tiny["num_experts"], tiny["num_experts_per_tok"], tiny["moe_intermediate_size"]) == (4, 2, 32)
    assert tiny["num_hidden_layers"] == 2 and tiny["layer_types"] == ["full_attention"] * 2
    assert tiny["pad_token_id"] == 255 and tiny["eos_token_id"] == [255, 7]  # inside the 256-token vocabulary
    assert tiny["max_position_embeddings"] == 40960
    longrope = {"model_type": "phi3", "num_attention_heads": 24, "vocab_size": 200064, "max_position_embeddings": 4096,
                "rope_scaling": {"type": "longrope", "long_factor": [1.0] * 48, "short_factor": [1.0] * 48}}
    assert "rope_scaling" not in ds_check.tiny_model_config(longrope)  # its factor lists follow head_dim


def _verdicts(cases, gpus=8, model="tiny-llama"):
    """ds_check.check of each (ds_config, setup) in one fresh interpreter (the check owns the
    process's default process group, which must not leak into the other tests)."""
    code = ("import json, sys; from mst_clients import ds_check; from mst_referee import jobs; "
            "a = json.loads(sys.argv[1]); raw = jobs.load_model_config(jobs.resolve_model(a['model'])[1]); "
            "print(json.dumps([ds_check.check(ds, {'gpus': a['gpus'], 'setup': s}, raw, a['out']) "
            "for ds, s in a['cases']]))")
    env = dict(os.environ, PYTHONPATH=f"{CLIENTS}:{REPO / 'python'}")
    arg = json.dumps({"cases": cases, "gpus": gpus, "model": model, "out": "/tmp/mst-clients-test"})
    r = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


needs_clients = pytest.mark.skipif(not CLIENTS, reason="MST_CLIENTS_PATH is not set (scripts/test sets it)")

# 8 GPUs as dp 4 x Ulysses sp 2, ZeRO 3, micro-batch 1, accumulation 4: DeepSpeed's data-parallel
# world is 8 / 2 = 4 ranks, so it trains 1 x 4 x 4 = 16 sequences per step; the Trainer computes
# world_size 8 x 1 x 4 = 32 (transformers/integrations/deepspeed.py, trainer_config_process).
SETUP = {"dp": 4, "sp": 2, "zero_stage": 3, "micro_batch": 1, "grad_accum": 4, "precision": "bf16-master",
         "optimizer": "adamw", "attention": "flash"}
BASE = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 4, "gradient_clipping": 1.0,
        "bf16": {"enabled": True}, "zero_optimization": {"stage": 3}, "sequence_parallel_size": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                  "weight_decay": "auto"}}}
# one GPU, ZeRO 0, accumulation 2
ONE = {"dp": 1, "sp": 1, "zero_stage": 0, "micro_batch": 2, "grad_accum": 2, "precision": "bf16-master",
       "optimizer": "adamw", "attention": "flash"}
ONE_DS = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
          "bf16": {"enabled": True}, "zero_optimization": {"stage": 0},
          "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}


def _without(d, key):
    return {k: v for k, v in d.items() if k != key}


@pytest.fixture(scope="module")
def ulysses():
    """The verdicts on the dp 4 x sp 2 plan, in one interpreter."""
    if not CLIENTS:
        pytest.skip("MST_CLIENTS_PATH is not set (scripts/test sets it)")
    zero2 = dict(SETUP, zero_stage=2)
    cases = {
        "plain": (BASE, SETUP),
        "given": (dict(BASE, train_batch_size=16), SETUP),
        "auto": (dict(BASE, train_batch_size="auto"), SETUP),
        "auto zero2": (dict(BASE, train_batch_size="auto", zero_optimization={"stage": 2}), zero2),
        "zero2": (dict(BASE, zero_optimization={"stage": 2}), SETUP),
        "no sp key": (_without(BASE, "sequence_parallel_size"), SETUP),
        "unknown key": (dict(BASE, zero_optimization={"stage": 3, "mst_plan_note": "x"}), SETUP),
        "no zero block": (_without(BASE, "zero_optimization"), SETUP),
        "eager": (BASE, dict(SETUP, attention="eager")),
    }
    return dict(zip(cases, _verdicts([list(case) for case in cases.values()])))


def test_without_train_batch_size_the_engine_trains_the_plans_batch(ulysses):
    assert ulysses["plain"] == []


def test_a_train_batch_size_is_refused_by_the_trainer_under_ulysses(ulysses):
    problems = ulysses["given"]
    assert len(problems) == 1
    assert problems[0].startswith("transformers: ValueError: ")
    assert "ds train_batch_size=16 vs hf train_batch_size (calculated)=32" in problems[0]


def test_auto_is_reset_by_accelerates_ulysses_fix_up_under_zero_2(ulysses):
    # the Trainer fills 32; accelerate's _prepare_deepspeed then sets micro x accum x its
    # data_parallel_size (dp_shard_size 4) = 16, which DeepSpeed accepts
    assert ulysses["auto zero2"] == []


def test_auto_is_refused_under_zero_3_when_the_model_is_loaded(ulysses):
    # with ZeRO-3 the model is built inside deepspeed.zero.Init once TrainingArguments exist
    # (transformers' is_deepspeed_zero3_enabled), and zero.Init checks the config as the Trainer
    # filled it, before accelerate's fix-up: 32 against 1 x 4 x (8 / 2)
    problems = ulysses["auto"]
    assert len(problems) == 1
    assert problems[0].startswith("deepspeed: AssertionError: ")
    assert "32 != 1 * 4 * 4" in problems[0]


def test_what_deepspeed_accepts_must_still_be_the_plan(ulysses):
    assert ulysses["zero2"] == ["plan: DeepSpeed's ZeRO stage is 2, the plan's 3"]


def test_the_ulysses_degree_comes_from_accelerates_parallelism_config(ulysses):
    # the ParallelismConfig's mpu sets DeepSpeed's sequence-parallel groups; the top-level key
    # is then not needed (DeepSpeed reads it only without an mpu)
    assert ulysses["no sp key"] == []


def test_an_unknown_key_in_a_deepspeed_block_is_refused_by_its_model(ulysses):
    problems = ulysses["unknown key"]
    assert len(problems) == 1 and problems[0].startswith("deepspeed: ")
    assert "mst_plan_note" in problems[0]


def test_ulysses_refuses_eager_attention(ulysses):
    problems = ulysses["eager"]
    # accelerate's DeepSpeedSequenceParallelConfig refuses it first (DeepSpeed's
    # UlyssesSPAttentionHF would too)
    assert len(problems) == 1 and problems[0].startswith("accelerate: ValueError: ")
    assert "'eager' and 'flex_attention' are not supported with sequence parallelism" in problems[0]


def test_accelerate_refuses_a_config_without_a_zero_block(ulysses):
    problems = ulysses["no zero block"]
    assert len(problems) == 1
    assert problems[0].startswith("accelerate: ValueError: Please specify the ZeRO optimization config")


@needs_clients
def test_one_gpu_precisions_and_optimizers():
    amp = dict(ONE, precision="amp")
    amp_ds = dict(_without(ONE_DS, "bf16"), torch_autocast={"enabled": True, "dtype": "bfloat16"})
    sgd = dict(ONE, optimizer="sgd", zero_stage=1)
    sgd_ds = dict(ONE_DS, zero_optimization={"stage": 1}, optimizer={"type": "SGD", "params": {"lr": "auto", "momentum": 0.9}})
    sgd_ok = dict(sgd_ds, zero_allow_untested_optimizer=True)
    zero1 = dict(ONE, zero_stage=1)
    offloaded = dict(ONE_DS, zero_optimization={"stage": 1, "offload_optimizer": {"device": "cpu"}})
    got = _verdicts([[ONE_DS, ONE], [amp_ds, amp], [ONE_DS, amp], [sgd_ds, sgd], [sgd_ok, sgd],
                     [dict(sgd_ok, optimizer={"type": "AdamW", "params": {"lr": "auto"}}), sgd],
                     [dict(sgd_ok, optimizer={"type": "SGD", "params": {"lr": "auto", "momentum": 0}}), sgd],
                     [offloaded, zero1]], gpus=1)
    assert got[0] == []
    assert got[1] == []
    # a bf16 config for an amp plan (fp32 weights): the Trainer runs without --bf16 and refuses it
    assert len(got[2]) == 1
    assert got[2][0].startswith("transformers: ValueError: ") and "ds bf16.enabled=True vs hf" in got[2][0]
    # ZeRO wraps only the optimizers it tested unless told otherwise (deepspeed/runtime/engine.py)
    assert len(got[3]) == 1 and got[3][0].startswith("deepspeed: AssertionError: You are using an untested ZeRO")
    assert got[4] == []
    # an accepted file that trains another optimizer, or offloads what the plan keeps on the GPU:
    # AdamW holds two states per parameter where SGD holds one momentum buffer (none at momentum 0)
    assert got[5] == ["plan: DeepSpeed's optimizer is AdamW, the plan's SGD with momentum"]
    assert got[6] == ["plan: DeepSpeed's optimizer is SGD without momentum, the plan's SGD with momentum"]
    assert got[7] == ["plan: DeepSpeed's offloaded optimizer states is True, the plan's False"]


# ---- torchtitan (python/mst_clients/titan.py) ----------------------------------------------------

TITAN = os.environ.get("MST_TITAN_PATH", "")


def test_the_torchtitan_matrix_covers_its_own_models_and_the_transformers_backend():
    entries = matrix.titan_matrix()
    assert len(entries) >= 12 and len({e.name for e in entries}) == len(entries)
    assert all(e.formats == ("torchtitan",) for e in entries)
    assert {e.gpus for e in entries} >= {1, 8, 16}
    assert {e.precision for e in entries} == {"bf16-master", "pure-bf16", "amp"}
    models = {e.model for e in entries}
    assert {"llama-3-8b", "qwen3-30b-a3b"} <= models  # torchtitan's own Llama-3 and Qwen3-MoE
    assert {"mistral-7b-v0.1", "mixtral-8x7b"} <= models  # its transformers backend, dense and MoE
    # expert parallelism pinned on and off (recommend's own Mixtral plan has it: the backend's swapped-in MoE)
    assert {"ep=8", "ep=1"} <= {pin for e in entries for pin in e.pins}


# Llama-3.2-1B as torchtitan's "1B" flavor on 8 GPUs: FSDP2 over 8 ranks, micro-batch 2, 4
# accumulation steps (global 2 x 4 x 8 = 64), every layer checkpointed, the loss in 4 chunks.
TITAN_PLAN = {"gpus": 8, "setup": {"dp": 8, "sp": 1, "zero_stage": 3, "micro_batch": 2, "grad_accum": 4,
                                   "seq_len": 8192, "precision": "bf16-master", "checkpoint": list(range(16)),
                                   "lm_chunks": 4, "optimizer_impl": "fused"}}
# Llama-3.2-1B: 1,235,814,400 parameters (the safetensors total of meta-llama/Llama-3.2-1B; embeddings tied)
TITAN_MODEL = {"parameters": 1235814400, "layers": 16, "hf_repo": "meta-llama/Llama-3.2-1B",
               # its config.json: rope_theta 500000, rope_scaling llama3 with factor 32
               "rope": {"theta": 500000.0, "scaling": "llama", "factor": 32.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
TITAN_MODULE = '''"""written by hand for the test"""
import dataclasses

from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
from torchtitan.distributed.activation_checkpoint import FullAC
from torchtitan.models.llama3 import model_registry
from torchtitan.models.llama3.config_registry import llama3_8b as base_config

# 16 layers x 8192 positions x complex64 [head_dim 64 / 2]
ROPE_TABLE_BYTES = 33554432


def mst_plan():
    config = base_config()
    config.model_spec = model_registry("{flavor}")
    for layer in config.model_spec.model.layers:
        layer.attention.rope = dataclasses.replace(layer.attention.rope, scaling_factor={rope_factor})
    config.training.disable_cuda_graphs = True
    config.training.seq_len = {seq}
    config.training.local_batch_size = 2
    config.training.global_batch_size = {global_batch}
    config.training.dtype = "float32"
    config.parallelism.data_parallel_replicate_degree = 1
    config.parallelism.data_parallel_shard_degree = 8
    config.parallelism.tensor_parallel_degree = {tp}
    config.parallelism.fsdp_reshard_after_forward = "default"
    config.activation_checkpoint = FullAC.Config()
    config.loss = ChunkedLossWrapper.Config(num_chunks=4, loss_fn=CrossEntropyLoss.Config(global_vocab_size=128256))
    {extra}
    return config
'''


@pytest.fixture(scope="module")
def titan_verdicts(tmp_path_factory):
    """titan.check on hand-written modules, in one interpreter with torchtitan's pins first."""
    if not TITAN:
        pytest.skip("MST_TITAN_PATH is not set (scripts/test sets it)")
    right = dict(flavor="1B", global_batch=64, tp=1, seq=8192, rope_factor=32.0, extra="")
    cases = {"right": right,
             "8B": dict(right, flavor="8B"),
             "uneven": dict(right, global_batch=60),
             "tp": dict(right, tp=8),
             "long": dict(right, seq=262144),
             "flavor's rope": dict(right, rope_factor=8.0),
             "bf16 reduce": dict(right, extra='config.training.mixed_precision_reduce = "bfloat16"')}
    runs = []
    for name, fields in cases.items():
        d = tmp_path_factory.mktemp(name)
        (d / "mst_torchtitan.py").write_text(TITAN_MODULE.format(**fields))
        plan = json.loads(json.dumps(TITAN_PLAN))
        plan["setup"]["seq_len"] = fields["seq"]
        runs.append([str(d), plan])
    code = ("import json, sys; from pathlib import Path; from mst_clients import titan; a = json.loads(sys.argv[1]); "
            "print(json.dumps([titan.check(Path(d), plan, a['model']) for d, plan in a['runs']]))")
    env = dict(os.environ, PYTHONPATH=f"{TITAN}:{REPO / 'python'}")
    arg = json.dumps({"runs": runs, "model": TITAN_MODEL})
    r = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return dict(zip(cases, json.loads(r.stdout.strip().splitlines()[-1])))


def test_torchtitan_reads_a_module_that_states_the_plan_as_the_plan(titan_verdicts):
    # the optimizer implementation is the base config's (fused), the model built on the meta
    # device has Llama-3.2-1B's parameters
    assert titan_verdicts["right"] == []


def test_torchtitans_8b_flavor_is_not_the_plans_1b_model(titan_verdicts):
    problems = titan_verdicts["8B"]
    assert "plan: torchtitan's model parameters is 8030261248, the plan's 1235814400" in problems
    # its RoPE tables: 32 layers x 8192 x complex64 [64] = 128 MiB, not the module's 32 MiB
    assert "plan: torchtitan's RoPE table bytes is 134217728, the plan's 33554432" in problems


def test_the_flavors_rope_scaling_is_not_the_plan_models(titan_verdicts):
    # torchtitan's 1B flavor scales by 8; Llama-3.2-1B's config.json by 32
    (problem,) = titan_verdicts["flavor's rope"]
    assert problem.startswith("plan: torchtitan's RoPE is {'theta': 500000.0, 'scaling': 'llama', 'factor': 8.0")


def test_gradients_reduced_in_bf16_are_not_the_plans_fp32_reduction(titan_verdicts):
    # (a row of plan_rows, which the referee's check_config refuses too)
    assert titan_verdicts["bf16 reduce"] == ["plan: torchtitan's gradient reduction dtype is bfloat16, the plan's float32"]


def test_a_zero2_plan_on_one_gpu_is_the_module_torchtitan_reads(tmp_path):
    # The emitter writes fsdp_reshard_after_forward = "never" for ZeRO 1/2 on any ranks (torchtitan shards on one
    # GPU too; the kernels runtime plans ZeRO 2 there): the client check expects what it writes, also where dp is 1.
    binary = Path(os.environ.get("MST_PLAN", REPO / "build" / "src" / "mst-plan"))
    if not TITAN or not binary.is_file():
        pytest.skip("MST_TITAN_PATH is not set or mst-plan is not built")
    plan_file = tmp_path / "plan.json"
    subprocess.run([str(binary), "recommend", "--model", "llama-3.2-1b", "--gpu", "h100-sxm-80gb", "--seq", "4096",
                    "--for", "torchtitan", "--runtime", "kernels", "--pin", "zero=2", "--out", str(plan_file)],
                   check=True, capture_output=True)
    subprocess.run([str(binary), "emit", "--plan", str(plan_file), "--format", "torchtitan", "--out", str(tmp_path)],
                   check=True, capture_output=True)
    assert 'fsdp_reshard_after_forward = "never"' in (tmp_path / "mst_torchtitan.py").read_text()
    plan = json.loads(plan_file.read_text())
    assert plan["gpus"] == 1 and plan["setup"]["zero_stage"] == 2
    code = ("import json, sys; from pathlib import Path; from mst_clients import titan; a = json.loads(sys.argv[1]); "
            "print(json.dumps(titan.check(Path(a['dir']), a['plan'], a['model'])))")
    env = dict(os.environ, PYTHONPATH=f"{TITAN}:{REPO / 'python'}")
    r = subprocess.run([sys.executable, "-c", code, json.dumps({"dir": str(tmp_path), "plan": plan, "model": TITAN_MODEL})],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


def test_a_global_batch_that_is_no_multiple_of_local_times_dp_is_refused_as_torchtitan_asserts(titan_verdicts):
    assert titan_verdicts["uneven"] == ["torchtitan: global batch 60 is not a multiple of local 2 x data-parallel degree 8"]


def test_parallel_degrees_that_do_not_multiply_to_the_world_fail_torchtitans_parallel_dims(titan_verdicts):
    (problem,) = titan_verdicts["tp"]
    assert problem.startswith("torchtitan: AssertionError: Invalid parallel dims")
    assert "tp(8)" in problem and "WORLD_SIZE(8)" in problem


def test_a_sequence_beyond_the_flavors_rope_table_is_refused_as_the_trainer_refuses_it(titan_verdicts):
    # torchtitan/models/common/decoder.py: update_from_config raises past max_seq_len (131072 for
    # Llama-3's flavors); mst_torchtitan.py lengthens the table when the plan needs it
    (problem,) = titan_verdicts["long"]
    assert problem.startswith("torchtitan: ValueError: Training sequence length 262144 exceeds")
    assert "131072" in problem
