"""The Axolotl check (mst_clients.axolotl_check) on hand-written plans and fragments: what Axolotl
0.21.0 refuses, and what it accepts but reads differently from the plan, must both be reported.

Runs in Axolotl's Python 3.12 environment (ctest python_axolotl, scripts/python-env.sh); elsewhere
it skips, unless MST_REQUIRE_AXOLOTL=1 says that environment was meant to be there.
"""

import copy
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")  # before Axolotl is imported: no telemetry from tests
if os.environ.get("MST_REQUIRE_AXOLOTL") == "1":
    import axolotl  # noqa: F401
else:
    pytest.importorskip("axolotl")

from mst_clients import axolotl_check, matrix  # noqa: E402

# The emitter's golden output (tests/test_emit.cpp holds the emitter to it byte for byte): Llama-3-8B
# on 8 GPUs, dp 4 x Ulysses sp 2 under ZeRO-2, 4 micro-steps, tiled MLP, Cut Cross Entropy's loss.
GOLDEN = Path(__file__).resolve().parents[2] / "tests" / "golden"
PLAN = json.loads((GOLDEN / "plan_llama3_8b.json").read_text())
DS_CONFIG = json.loads((GOLDEN / "axolotl" / "ds_config.json").read_text())
FRAGMENT = (GOLDEN / "axolotl" / "axolotl.yaml").read_text()


def verdict(tmp_path: Path, fragment: str = FRAGMENT, plan=PLAN, ds=DS_CONFIG):
    folder = tmp_path / "emitted"
    folder.mkdir(parents=True)
    (folder / "axolotl.yaml").write_text(fragment)
    files = {"axolotl.yaml": folder / "axolotl.yaml"}
    if ds is not None:
        (folder / "ds_config.json").write_text(json.dumps(ds))
        files["ds_config.json"] = folder / "ds_config.json"
    em = matrix.Emitted(matrix.Entry(plan["model"], plan["gpus"], plan["setup"]["seq_len"]), "axolotl", plan, files)
    return axolotl_check.check(em, tmp_path / "user")


def test_the_emitted_fragment_loads_and_means_the_plan(tmp_path):
    assert verdict(tmp_path) == []


def test_a_fragment_axolotl_refuses_is_reported_with_its_message(tmp_path):
    # CutCrossEntropyArgs.check_dtype_is_half: the chunked loss needs bf16 or fp16 training.
    problems = verdict(tmp_path, FRAGMENT.replace("bf16: true", "bf16: false"))
    assert len(problems) == 1 and "Cut Cross Entropy requires fp16/bf16 training" in problems[0]


def test_trl_stream_offloading_is_not_the_plans_checkpoint_offload(tmp_path):
    plan = copy.deepcopy(PLAN)
    plan["setup"]["offload_checkpoints"] = True
    # Axolotl accepts `true` (TRL's offloader of every saved tensor), which is not what the plan offloads.
    problems = verdict(tmp_path, FRAGMENT + "activation_offloading: true\n", plan)
    assert problems == ["activation_offloading: Axolotl has True, the plan 'hidden_states'"]
    assert verdict(tmp_path / "b", FRAGMENT + "activation_offloading: hidden_states\n", plan) == []


def test_ulysses_without_deepspeed_is_the_ringmaster_plugins_layout(tmp_path):
    # Without deepspeed:, context_parallel_size is accelerate's cp axis (ringmaster's Ulysses/ring
    # choice) with the other ranks FSDP-sharded: not the plan's DeepSpeed Ulysses + replicas.
    fragment = FRAGMENT.replace("deepspeed: ds_config.json\n", "")
    problems = verdict(tmp_path, fragment, ds=None)
    assert problems == ["parallelism: Axolotl has {'cp_size': 2, 'dp_shard_size': 4}, the plan "
                        "{'sp_size': 2, 'sp_backend': 'deepspeed', 'dp_replicate_size': 4}"]


def test_batch_arithmetic_is_over_data_parallel_replicas_only(tmp_path):
    # normalize_config: batch_size = micro_batch_size x gradient_accumulation_steps x world / cp,
    # 1 x 4 x 8 / 2 = 16 sequences per step; a plan of 8 replicas would need 32.
    plan = copy.deepcopy(PLAN)
    plan["setup"]["dp"] = 8
    problems = verdict(tmp_path, plan=plan)
    assert "batch_size: Axolotl has 16, the plan 32" in problems


def test_the_deprecated_flash_attention_flag_still_means_flash_attention_2(tmp_path):
    # normalize_attn_implementation maps the legacy flag: older fragments stay correct.
    fragment = FRAGMENT.replace("attn_implementation: flash_attention_2", "flash_attention: true")
    assert verdict(tmp_path, fragment) == []


def test_eager_attention_is_refused_under_context_parallelism_and_read_as_eager_without(tmp_path):
    eager = FRAGMENT.replace("attn_implementation: flash_attention_2", "attn_implementation: eager")
    problems = verdict(tmp_path, eager)  # why the emitter refuses eager with sp > 1
    assert len(problems) == 1 and "`attn_implementation: eager` is not supported" in problems[0]
    plan = copy.deepcopy(PLAN)
    plan["setup"].update(sp=1, dp=8)
    data_parallel = eager.replace("context_parallel_size: 2\n", "")
    assert verdict(tmp_path / "b", data_parallel, plan) == [
        "attn_implementation: Axolotl has 'eager', the plan 'flash_attention_2'"]


LIGER_PLAN = copy.deepcopy(PLAN)
LIGER_PLAN["setup"]["lm_impl"] = "fused"
LIGER_FRAGMENT = FRAGMENT.replace("axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin",
                                  "axolotl.integrations.liger.LigerPlugin").replace(
    "cut_cross_entropy: true", "liger_fused_linear_cross_entropy: true")


def test_each_config_is_read_as_a_fresh_process_reads_it(tmp_path):
    # Axolotl's PluginManager is one per process: after Cut Cross Entropy's config its schema (whose
    # cut_cross_entropy defaults to true) would join the Liger config's, and after a Liger config a
    # fragment without `plugins:` would still get Liger's key. Each config starts afresh.
    assert verdict(tmp_path / "cce") == []
    assert verdict(tmp_path / "liger", LIGER_FRAGMENT, LIGER_PLAN) == []
    no_plugin = LIGER_FRAGMENT.replace("plugins:\n  - axolotl.integrations.liger.LigerPlugin\n", "")
    problems = verdict(tmp_path / "none", no_plugin, LIGER_PLAN)
    assert "liger_fused_linear_cross_entropy: Axolotl has False, the plan True" in problems
    assert "plugins: Axolotl has [], the plan ['axolotl.integrations.liger.LigerPlugin']" in problems


def test_several_packed_sequences_per_micro_batch_are_real_rows(tmp_path):
    # Without multipack_real_batches the multipack sampler makes one row of 2 x 65536 tokens, which
    # DeepSpeed Ulysses (built for micro_batch_size rows) refuses.
    plan = copy.deepcopy(PLAN)
    plan["setup"]["micro_batch"] = 2
    fragment = FRAGMENT.replace("micro_batch_size: 1", "micro_batch_size: 2")
    assert verdict(tmp_path / "a", fragment, plan) == ["multipack_real_batches: Axolotl has False, the plan True"]
    assert verdict(tmp_path / "b", fragment + "multipack_real_batches: true\n", plan) == []


def test_tiled_mlp_on_a_mixture_of_experts_model_is_reported(tmp_path):
    # patch_tiled_mlp replaces the dense {Prefix}MLP class; Mixtral's experts are not one.
    plan = copy.deepcopy(PLAN)
    plan["model"] = "mixtral-8x7b"
    plan["setup"].update(sp=1, dp=8)
    fragment = FRAGMENT.replace("context_parallel_size: 2\n", "")
    assert verdict(tmp_path, fragment, plan) == [
        "tiled_mlp: Axolotl tiles the dense MLP class, which a Mixture-of-Experts model's experts are not"]


def test_zero3_checkpoints_reentrantly_as_axolotl_itself_chooses(tmp_path):
    # normalize_config, with use_reentrant unset, picks reentrant under a ZeRO-3 ds_config (and
    # non-reentrant otherwise): the emitter writes that choice out, and the check holds it to it.
    plan = copy.deepcopy(PLAN)
    plan["setup"]["zero_stage"] = 3
    zero3 = copy.deepcopy(DS_CONFIG)
    zero3["zero_optimization"]["stage"] = 3
    unset = FRAGMENT.replace("gradient_checkpointing_kwargs:\n  use_reentrant: false\n", "")
    assert verdict(tmp_path / "a", unset, plan, zero3) == []
    assert verdict(tmp_path / "b", FRAGMENT, plan, zero3) == [
        "gradient_checkpointing_kwargs.use_reentrant: Axolotl has False, the plan True"]
    assert verdict(tmp_path / "c", unset) == []  # ZeRO-2: non-reentrant


def test_a_fragment_that_is_not_a_config_is_one_refusal(tmp_path):
    problems = verdict(tmp_path, "- not\n- a mapping\n")
    assert len(problems) == 1 and problems[0].startswith(("ValueError", "TypeError", "AttributeError"))


def test_the_capabilities_are_the_plan_gpus():
    caps, env = axolotl_check.capabilities("a100-80gb", 4, "2.14.1+cu130")
    assert caps == {"bf16": True, "fp8": False, "tf32": True, "n_gpu": 4, "compute_capability": "sm_80"}
    assert env == {"torch_version": "2.14.1"}
    assert axolotl_check.capabilities("h100-sxm-80gb", 8, "2.14.1")[0]["fp8"]
    with pytest.raises(ValueError, match="gpu: expected one of"):
        axolotl_check.capabilities("mi300x", 8, "2.14.1")


def _fsdp2_plan(tmp_path: Path, binary: Path):
    """recommend --for axolotl --fsdp2-groups axolotl's plan (Llama-3.2-1B on 4 GPUs, 2 micro-steps) and its
    emitted fragment, made by `binary`, the mst-plan under test."""
    import subprocess

    path = tmp_path / "plan.json"
    subprocess.run([binary, "recommend", "--model", "llama-3.2-1b", "--gpu", "h100-sxm-80gb", "--gpus", "4", "--seq",
                    "16384", "--tokens-per-step", "131072", "--pin", "micro_batch=1", "--for", "axolotl",
                    "--fsdp2-groups", "axolotl", "--precision", "pure-bf16", "--out", str(path)],
                   check=True, capture_output=True, cwd=GOLDEN.parents[1])
    fragment = subprocess.run([binary, "emit", "--plan", str(path), "--format", "axolotl"], check=True,
                              capture_output=True, text=True, cwd=GOLDEN.parents[1]).stdout
    return json.loads(path.read_text()), fragment


def test_axolotls_fsdp2_fragment_shards_and_syncs_as_planned(tmp_path, mst_plan):
    plan, fragment = _fsdp2_plan(tmp_path, mst_plan)
    s = plan["setup"]
    assert (s["fsdp2"], s["fsdp2_groups"], s["grad_accum"], s["fsdp2_no_sync"]) == (True, "axolotl", 2, True)
    assert "fsdp_config:\n  fsdp_version: 2\n" in fragment and "deepspeed" not in fragment.split("fsdp_config:")[1]
    assert verdict(tmp_path / "a", fragment, plan, ds=None) == []
    # The Trainer syncs in the last micro-step only: a plan synced every micro-step is not what it runs, unless
    # the config asks for sync_each_batch
    synced = copy.deepcopy(plan)
    synced["setup"]["fsdp2_no_sync"] = False
    sync_each = fragment + "accelerator_config:\n  gradient_accumulation_kwargs:\n    sync_each_batch: true\n"
    assert verdict(tmp_path / "b", fragment, synced, ds=None) == [
        "gradient sync in the last micro-step only (fsdp2_no_sync): Axolotl has False, the plan True"]
    assert verdict(tmp_path / "c", sync_each, synced, ds=None) == []
    # The plugin the Trainer builds from the block: its reshard_after_forward is the root's too
    kept = fragment.replace("reshard_after_forward: true", "reshard_after_forward: false")
    assert verdict(tmp_path / "d", kept, plan, ds=None) == [
        "fsdp plugin: reshard_after_forward: Axolotl has False, the plan True"]
    # Without the block Axolotl trains without FSDP (an empty fsdp_config is falsy too)
    assert "fsdp_config: Axolotl has False, the plan True" in verdict(
        tmp_path / "e", fragment.split("fsdp_config:")[0] + "fsdp_config: {}\n", plan, ds=None)
