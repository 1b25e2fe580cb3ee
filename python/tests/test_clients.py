"""python/mst_clients: the plan matrix, and the DeepSpeed check's verdicts on configs stated by hand.

The pure-Python parts always run. The verdicts need DeepSpeed and accelerate
(scripts/python-env.sh's mst_clients_env installs them; ctest passes their directory as
MST_CLIENTS_PATH, and then they must run); each runs in its own interpreter, because the check
initialises a process group, which must not leak into the other tests. The configs are written
here by hand from DeepSpeed's and transformers' rules, so each verdict is independent of the
emitter: a train_batch_size the Trainer computes differently is refused, "auto" (as the Trainer fills
it, before accelerate's own sequence-parallel fix-up, which these checks do not run) is refused by
DeepSpeed under Ulysses, and leaving the key out passes both.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mst_clients import matrix

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


def _verdict(ds_config, setup, gpus):
    """ds_check.check in a fresh interpreter (it initialises a process group)."""
    code = ("import json, sys; from mst_clients import ds_check; a = json.loads(sys.argv[1]); "
            "print(json.dumps(ds_check.check(a['ds'], a['plan'], 4096, a['out'])))")
    plan = {"gpus": gpus, "setup": setup}
    env = dict(os.environ, PYTHONPATH=f"{CLIENTS}:{REPO / 'python'}")
    arg = json.dumps({"ds": ds_config, "plan": plan, "out": "/tmp/mst-clients-test"})
    r = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


needs_clients = pytest.mark.skipif(not CLIENTS, reason="MST_CLIENTS_PATH is not set (scripts/test sets it)")

# 8 GPUs as dp 4 x Ulysses sp 2, ZeRO 3, micro-batch 1, accumulation 4: DeepSpeed's world is
# 8 / 2 = 4 ranks, so it trains 1 x 4 x 4 = 16 sequences per step; the Trainer computes
# world_size 8 x 1 x 4 = 32.
SETUP = {"dp": 4, "sp": 2, "zero_stage": 3, "micro_batch": 1, "grad_accum": 4, "precision": "bf16-master"}
BASE = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 4, "gradient_clipping": 1.0,
        "bf16": {"enabled": True}, "zero_optimization": {"stage": 3}, "sequence_parallel_size": 2}


@needs_clients
def test_without_train_batch_size_both_checks_pass_and_deepspeed_trains_the_plans_batch():
    assert _verdict(BASE, SETUP, 8) == []


@needs_clients
def test_a_train_batch_size_is_refused_by_the_trainer_under_ulysses():
    problems = _verdict(dict(BASE, train_batch_size=16), SETUP, 8)
    assert len(problems) == 1
    assert problems[0].startswith("transformers: ")
    assert "ds train_batch_size=16 vs hf train_batch_size (calculated)=32" in problems[0]


@needs_clients
def test_auto_is_filled_by_the_trainer_and_then_refused_by_deepspeed():
    problems = _verdict(dict(BASE, train_batch_size="auto"), SETUP, 8)
    assert len(problems) == 1
    assert problems[0].startswith("deepspeed: AssertionError: ")
    assert "32 != 1 * 4 * 4" in problems[0]


@needs_clients
def test_what_deepspeed_accepts_must_still_be_the_plan():
    # a valid config for another layout: ZeRO 2 and no Ulysses, so DeepSpeed's world is all 8 ranks
    other = dict(BASE, zero_optimization={"stage": 2})
    del other["sequence_parallel_size"]
    problems = _verdict(other, SETUP, 8)
    assert "plan: DeepSpeed trains 32 sequences per step, the plan 16" in problems
    assert "plan: ZeRO stage 2, the plan's 3" in problems
    assert "plan: sequence_parallel_size 1, the plan's sp 2" in problems


@needs_clients
def test_an_unknown_key_in_a_deepspeed_block_is_refused_by_its_model():
    problems = _verdict(dict(BASE, zero_optimization={"stage": 3, "mst_plan_note": "x"}), SETUP, 8)
    assert len(problems) == 1 and problems[0].startswith("deepspeed: ")
    assert "mst_plan_note" in problems[0]
