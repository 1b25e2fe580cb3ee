"""The random differential runner: its configs are ones both sides accept, and a run compares them.

The generator must only produce configs mst-plan accepts and transformers builds (a refused
config would make a differential run report a parse error, not a modelling one); one seeded case
per model group then goes through the referee and `mst-plan compare`, which must agree.
"""

import json
import os
import random
import subprocess

import pytest

from mst_referee import differential


def test_every_generated_config_is_one_mst_plan_accepts(tmp_path, mst_plan):
    rng = random.Random(5)
    for i in range(60):
        family = differential.FAMILIES[i % len(differential.FAMILIES)]
        case = differential.random_case(rng, family)
        path = tmp_path / f"c{i}_{family}.json"
        path.write_text(json.dumps(case.config))
        run = subprocess.run([str(mst_plan), "--json", "show", str(path)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, (case.config, run.stderr)
        shown = json.loads(run.stdout)
        assert shown["num_hidden_layers"] == case.config["num_hidden_layers"]
        assert ("moe" in shown) == (family in ("mixtral", "qwen3_moe", "gpt_oss"))
        assert case.seq * case.knobs.get("micro_batch", 1) >= case.knobs.get("mlp_chunks", 1)


def test_sdpa_is_drawn_exactly_where_mst_plan_models_it(tmp_path, mst_plan):
    # The generator's own rule (sdpa_runs_flash) against mst-plan's validation of `--attention sdpa`,
    # over every family and the lengths it draws, around the windows too: they must agree both ways.
    rng = random.Random(9)
    drawn = 0
    for i in range(40):
        family = differential.FAMILIES[i % len(differential.FAMILIES)]
        case = differential.random_case(rng, family)
        path = tmp_path / f"c{i}_{family}.json"
        path.write_text(json.dumps(case.config))
        for seq in sorted({case.seq, 3, 4, 15, 16, 17}):
            run = subprocess.run([str(mst_plan), "estimate", "--model", str(path), "--seq", str(seq), "--attention", "sdpa"],
                                 capture_output=True, text=True, timeout=60)
            assert (run.returncode == 0) == differential.sdpa_runs_flash(case.config, seq), (case.config, seq, run.stderr)
            if run.returncode != 0:
                assert run.returncode == 2 and "attention" in run.stderr, run.stderr
        drawn += case.knobs.get("attention") == "sdpa"
    assert drawn > 0  # (some case of the seed draws it)


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "gpt_oss"])
def test_a_seeded_case_runs_through_the_referee_and_compares(tmp_path, family, mst_plan):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    case = differential.random_case(random.Random(7), family)
    identical, detail = differential.run_case(case, tmp_path / family, mst_plan)
    assert identical, detail


@pytest.mark.skipif(not os.environ.get("MST_CLIENTS_PATH"), reason="MST_CLIENTS_PATH is not set (scripts/test sets it)")
def test_a_seeded_zero_case_runs_through_deepspeed_and_compares(tmp_path, mst_plan):
    pytest.importorskip("torch")
    case = differential.random_zero_case(random.Random(1))
    # (seed 1: ZeRO-3 on the tiny Qwen3, two ranks, three micro-steps, MLP and fused LM-head chunks)
    assert (case.family, case.setup["zero_stage"], case.setup["dp"], case.setup["grad_accum"]) == ("qwen3", 3, 2, 3)
    identical, detail = differential.run_zero_case(case, tmp_path / "zero", mst_plan)
    assert identical, detail


def test_a_seeded_fsdp2_case_runs_through_fully_shard_and_compares(tmp_path, mst_plan):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    case = differential.random_fsdp2_case(random.Random(48), "llama")
    # (seed 48: rank 1 of 3, tied embeddings, fp32 parameters under the bf16 policy, four micro-steps synced in
    # the last only (the Hugging Face Trainer's accumulation), checkpoints offloaded, the loop MLP in 7 chunks)
    assert (case.rank, case.knobs["dp"], case.knobs["grad_accum"], case.knobs["mlp_chunks"], case.knobs["precision"],
            case.config["tie_word_embeddings"], case.knobs.get("fsdp2_no_sync"), case.knobs.get("fsdp2_groups")) == (
                1, 3, 4, 7, "bf16-master", True, True, None)
    identical, detail = differential.run_case(case, tmp_path / "fsdp2", mst_plan)
    assert identical, detail


@pytest.mark.skipif(not os.environ.get("MST_CLIENTS_PATH"), reason="MST_CLIENTS_PATH is not set (scripts/test sets it)")
@pytest.mark.parametrize("seed, tied, precision, rank, dp", [(8, True, None, 3, 5), (13, False, None, 3, 5),
                                                             (31, True, "bf16-master", 1, 4), (11, False, "bf16-master", 2, 3)])
def test_seeded_cases_in_accelerates_fsdp2_groups_run_through_its_own_sharding_and_compare(tmp_path, seed, tied, precision,
                                                                                             rank, dp, mst_plan):
    # (accelerate 1.15's fsdp2_prepare_model shards the model, as the Trainer with bf16=False (bf16 parameters) or
    # bf16=True (fp32 ones under its MixedPrecisionPolicy(bf16, bf16, output bf16)): seed 8 tied (one tail group of
    # the final norm and the embedding), two micro-steps synced in the last only, the tiled MLP in 7 chunks; 13
    # untied (the embedding's own group, a tail of the final norm and LM head), the loop MLP in 3 chunks; 31 tied,
    # four unsynced micro-steps, checkpoints offloaded; 11 untied, two micro-steps each reduce-scattered (the bf16
    # output cast and added into the fp32 sharded gradients), layers kept gathered)
    pytest.importorskip("torch")
    case = differential.random_fsdp2_case(random.Random(seed), "llama")
    assert case.knobs.get("fsdp2_groups") == "accelerate" and case.config["tie_word_embeddings"] is tied
    assert (case.knobs.get("precision"), case.rank, case.knobs["dp"]) == (precision, rank, dp)
    identical, detail = differential.run_case(case, tmp_path / f"fsdp2_accelerate_{seed}", mst_plan)
    assert identical, detail


def test_fsdp2_cases_draw_only_what_mst_plan_models_with_it():
    rng = random.Random(3)
    for i in range(80):
        case = differential.random_fsdp2_case(rng, differential.FSDP2_FAMILIES[i % len(differential.FSDP2_FAMILIES)])
        k = case.knobs
        assert k["fsdp2"] and k["zero_stage"] == 3 and 2 <= k["dp"] <= 5 and 0 <= case.rank < k["dp"]
        assert k.get("precision", "pure-bf16") in ("pure-bf16", "bf16-master") and "optimizer_in_backward" not in k
        assert not (k.get("optimizer") == "sgd" and k.get("optimizer_impl", "fused") == "fused")
        if k.get("fsdp2_no_sync"):  # (two to four micro-steps)
            assert k["grad_accum"] in (2, 3, 4)
        if "fsdp2_groups" in k:  # (accelerate's)
            assert k["fsdp2_groups"] == "accelerate"


def test_the_hf_trainers_forward_is_drawn_only_where_mst_plan_models_it():
    # (not for Qwen3-MoE and gpt-oss, whose experts' combine CUDA's autocast sums in fp32: refused)
    rng = random.Random(4)
    drawn = set()
    for i in range(90):
        family = differential.FAMILIES[i % len(differential.FAMILIES)]
        if differential.random_case(rng, family).knobs.get("hf_trainer_bf16"):
            drawn.add(family)
    assert drawn and not drawn & {"qwen3_moe", "gpt_oss"}
    # (nor for FSDP2: accelerate prepares an FSDP2 model without its native amp)
    assert not any(differential.random_fsdp2_case(rng, "llama").knobs.get("hf_trainer_bf16") for _ in range(20))
