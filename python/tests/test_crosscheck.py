"""scripts/torch_crosscheck.py: the PyTorch cross-check of mst-plan's predictions.

The pure-Python parts always run: the command line, the catalog look-up and the
"_mst" stripping, the setup -> hf-mst conversion (a mirror of the C++ emitter,
checked against the built binary when there is one), the mst-measure/1 writer and
the committed matrix. The runs themselves need torch and transformers and use a
tiny Llama on the CPU (no CUDA memory statistics there: the peaks are null).
"""

import copy
import json
import math
import subprocess
from pathlib import Path

import pytest

import mst_hf

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "torch_crosscheck.py"
MATRIX = REPO / "scripts" / "torch_matrix.json"


from mst_referee import cli, jobs, records, train


def llama_plan(**setup):
    """A plan for Llama-3-8B as `recommend --out` writes it (setup keys sorted, as nlohmann does)."""
    base = {"attention": "flash", "checkpoint": list(range(32)), "dp": 1, "grad_accum": 1, "lm_chunks": 16,
            "lm_impl": "recompute", "micro_batch": 1, "mlp_chunks": 4, "mlp_impl": "loop",
            "offload_checkpoints": False, "optimizer": "adamw", "optimizer_in_backward": False,
            "optimizer_state_dtype": "bf16", "padded": False, "precision": "pure-bf16", "seq_len": 16384,
            "sp": 1, "sp_impl": "ulysses", "ep": 1, "moe_imbalance": 1.0, "zero3_prefetch": 1, "zero_stage": 0}
    base.update(setup)
    return {"format": "mst-plan/1", "gpu": "h100-sxm-80gb", "gpus": 1, "model": "llama-3-8b",
            "prediction": {"peak_allocated_bytes": 65712301056, "peak_reserved_bytes": 68308000768,
                           "tokens_per_second": 5000.0, "step_seconds": 3.2},
            "setup": base}


# ---- command line ------------------------------------------------------------------------


def test_single_run_options_and_defaults():
    a = cli.parse_args(["llama-3-8b", "--plan", "p.json", "--out", "r.json"])
    assert (a.model, a.plan, a.out) == ("llama-3-8b", Path("p.json"), Path("r.json"))
    assert (a.steps, a.warmup, a.seed, a.lr, a.loss_check) == (3, 1, 0, 1e-5, False)
    assert a.mst_plan == REPO / "build" / "src" / "mst-plan"
    assert a.convert == "auto" and a.layers is None and a.device is None


def test_the_model_may_come_from_the_plan():
    a = cli.parse_args(["--plan", "p.json", "--out", "r.json", "--layers", "8", "--steps", "2", "--loss-check",
                       "--mst-plan", "/opt/mst-plan", "--seed", "7"])
    assert a.model is None and a.layers == 8 and a.steps == 2 and a.loss_check and a.seed == 7
    assert a.mst_plan == Path("/opt/mst-plan")


def test_matrix_options():
    a = cli.parse_args(["--matrix", "m.json", "--out-dir", "results/h100-sxm-80gb/torch", "--only", "llama*",
                       "--only", "qwen*", "--max-seconds", "420", "--skip-existing"])
    assert a.matrix == Path("m.json") and a.out_dir == Path("results/h100-sxm-80gb/torch")
    assert a.only == ["llama*", "qwen*"] and a.max_seconds == 420 and a.skip_existing
    assert cli.parse_args(["--matrix", "m.json", "--list"]).list


@pytest.mark.parametrize("argv", [
    ["llama-3-8b", "--out", "r.json"],                                      # no setup at all
    ["llama-3-8b", "--plan", "p.json"],                                     # no --out
    ["llama-3-8b", "--setup", "k.json", "--out", "r.json"],                 # knobs without --seq
    ["llama-3-8b", "--plan", "p.json", "--hf-config", "c.json", "--out", "r.json"],
    ["--matrix", "m.json"],                                                 # no --out-dir
    ["llama-3-8b", "--matrix", "m.json", "--out-dir", "d"],                 # the matrix names its models
    ["--matrix", "m.json", "--out-dir", "d", "--layers", "4"],
    ["llama-3-8b", "--plan", "p.json", "--out", "r.json", "--steps", "0"],
    ["llama-3-8b", "--plan", "p.json", "--out", "r.json", "--layers", "0"],
    ["llama-3-8b", "--plan", "p.json", "--out", "r.json", "--only", "x"],    # matrix-only option
])
def test_bad_command_lines_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_a_user_error_is_one_line_and_exit_code_2(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(llama_plan(sp=2)))
    assert cli.main(["--plan", str(plan), "--out", str(tmp_path / "r.json"), "--convert", "python"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "sp: expected 1" in err


# ---- models ------------------------------------------------------------------------------


def test_a_catalog_name_is_models_name_json():
    assert jobs.resolve_model("llama-3-8b") == ("llama-3-8b", REPO / "models" / "llama-3-8b.json")


def test_a_path_names_the_model_by_its_stem(tmp_path):
    path = tmp_path / "my-model.json"
    path.write_text("{}")
    assert jobs.resolve_model(str(path)) == ("my-model", path)


def test_an_unknown_model_lists_the_catalog():
    with pytest.raises(jobs.CrosscheckError, match="expected a catalog name .*llama-3-8b.*got 'llama-9'"):
        jobs.resolve_model("llama-9")
    with pytest.raises(jobs.CrosscheckError, match="no such file"):
        jobs.resolve_model("nowhere/config.json")


def test_mst_block_is_removed_and_nothing_else():
    raw = jobs.load_model_config(REPO / "models" / "gemma-2-9b.json")
    before = copy.deepcopy(raw)
    hf = jobs.hf_config_dict(raw)
    assert "_mst" not in hf and "_mst" in raw
    assert hf == {k: v for k, v in before.items() if k != "_mst"}
    assert raw == before  # the caller's dict is untouched
    assert hf["final_logit_softcapping"] == 30.0 and hf["num_hidden_layers"] == 42


def test_layers_cut_the_model_and_its_per_layer_lists():
    raw = {"model_type": "qwen2", "num_hidden_layers": 4, "vocab_size": 8, "hidden_size": 4,
           "layer_types": ["full_attention"] * 4, "_mst": {"name": "x"}}
    hf = jobs.hf_config_dict(raw, 2)
    assert hf["num_hidden_layers"] == 2 and hf["layer_types"] == ["full_attention"] * 2 and "_mst" not in hf
    with pytest.raises(jobs.CrosscheckError, match="expected 1 to 4"):
        jobs.hf_config_dict(raw, 5)


def test_a_cut_model_is_a_config_mst_plan_reads():
    raw = jobs.load_model_config(REPO / "models" / "llama-3-8b.json")
    cut = jobs.reduced_model_config(raw, "llama-3-8b", "models/llama-3-8b.json", 8)
    assert cut["num_hidden_layers"] == 8
    assert cut["_mst"]["name"] == "llama-3-8b-8layers"
    assert cut["_mst"]["display_name"] == "Llama-3-8B (8 of 32 layers)"
    assert "published_parameters" not in cut["_mst"]  # 8 layers do not have the published count
    assert {k: v for k, v in cut.items() if k not in ("_mst", "num_hidden_layers")} == \
        {k: v for k, v in raw.items() if k not in ("_mst", "num_hidden_layers")}


# ---- setups and the hf-mst conversion ----------------------------------------------------


@pytest.mark.parametrize("spec, layers, expected", [
    ("none", 4, []),
    ("all", 4, [0, 1, 2, 3]),
    ("every:4", 10, [0, 4, 8]),
    ("first:2", 5, [0, 1]),
    ("last:2", 5, [3, 4]),
    ("spread:3", 32, [0, 10, 21]),  # i * 32 // 3 for i < 3
    ("0,2,5-7", 8, [0, 2, 5, 6, 7]),
    ([3, 1, 3], 4, [1, 3]),
])
def test_checkpoint_placements_read_as_mst_plan_reads_them(spec, layers, expected):
    assert jobs.checkpoint_layers_from_spec(spec, layers) == expected


@pytest.mark.parametrize("spec, message", [
    ("most", "expected none, all"), ("every:0", "K out of range"), ("first:9", "K out of range"),
    ("2-9", "outside 0..7"), ([8], "expected layer indices in 0..7"), (3, "expected a string"),
])
def test_bad_checkpoint_placements(spec, message):
    with pytest.raises(jobs.CrosscheckError, match=message):
        jobs.checkpoint_layers_from_spec(spec, 8)


def test_the_bucket_is_deepspeeds_only_as_mst_plan_validates_it():
    """reduce_bucket_size: any positive count under DeepSpeed's ZeRO engine (runtime hf), DeepSpeed's
    default elsewhere (src/core/setup.cpp validate, the same words); ZeRO-3's own options likewise."""
    s = jobs.normalize_setup({"dp": 8, "zero_stage": 2, "precision": "bf16-master", "reduce_bucket_size": 4096}, 32)
    assert s["reduce_bucket_size"] == 4096
    with pytest.raises(jobs.CrosscheckError, match="reduce_bucket_size: expected DeepSpeed's default 500000000 unless "
                                                   "DeepSpeed's ZeRO engine runs the step"):
        jobs.normalize_setup({"reduce_bucket_size": 4096}, 32)
    s = jobs.normalize_setup({"dp": 8, "zero_stage": 3, "precision": "bf16-master", "reduce_bucket_size": 4096,
                              "param_persistence_threshold": 0, "prefetch_bucket_size": 1000}, 32)
    assert (s["reduce_bucket_size"], s["param_persistence_threshold"], s["prefetch_bucket_size"]) == (4096, 0, 1000)
    assert "param_persistence_threshold" not in jobs.normalize_setup({"dp": 8, "zero_stage": 2}, 32)  # (as to_json writes it)
    with pytest.raises(jobs.CrosscheckError, match="param_persistence_threshold: expected DeepSpeed's default 100000 "
                                                   "unless DeepSpeed's ZeRO-3 engine runs the step .*, got 0"):
        jobs.normalize_setup({"dp": 8, "zero_stage": 2, "param_persistence_threshold": 0}, 32)
    with pytest.raises(jobs.CrosscheckError, match="reduce_bucket_size: expected an integer"):
        jobs.normalize_setup({"dp": 8, "zero_stage": 2, "reduce_bucket_size": 0}, 32)
    # overlap_comm likewise: true only where that engine runs, a boolean (1 is not one)
    assert jobs.normalize_setup({"dp": 8, "zero_stage": 1, "precision": "bf16-master", "overlap_comm": True}, 32)["overlap_comm"]
    assert jobs.normalize_setup({"overlap_comm": None}, 32)["overlap_comm"] is False
    with pytest.raises(jobs.CrosscheckError, match="overlap_comm: expected false unless DeepSpeed's ZeRO 1/2 engine runs the step"):
        jobs.normalize_setup({"dp": 8, "zero_stage": 3, "overlap_comm": True}, 32)
    with pytest.raises(jobs.CrosscheckError, match="overlap_comm: expected true or false, got 1"):
        jobs.normalize_setup({"dp": 8, "zero_stage": 2, "overlap_comm": 1}, 32)


def test_integral_numbers_and_nulls_read_as_mst_plan_reads_them(tmp_path, mst_plan):
    """5e8 and 8.0 are integers, null is the default: the mirror and the binary read one setup alike."""
    knobs = {"dp": 8.0, "zero_stage": 2, "precision": "bf16-master", "reduce_bucket_size": 5e8, "sp": None,
             "seq_len": 4096.0, "grad_accum": None, "overlap_comm": True}
    path = tmp_path / "setup.json"
    path.write_text(json.dumps(knobs))
    out = subprocess.run([str(mst_plan), "--json", "estimate", "--model", "llama-3-8b", "--gpu", "h100-sxm-80gb",
                          "--setup", str(path)], capture_output=True, text=True, check=True)
    binary = json.loads(out.stdout)["setup"]
    mirror = jobs.normalize_setup(knobs, 32)
    assert {k: mirror[k] for k in binary} == binary
    assert mirror["reduce_bucket_size"] == 500_000_000 and isinstance(mirror["dp"], int)
    with pytest.raises(jobs.CrosscheckError, match=r"dp: expected an integer in \[1, 1048576\], got 8.5"):
        jobs.normalize_setup({"dp": 8.5}, 32)


def test_knobs_take_mst_plans_defaults():
    s = jobs.normalize_setup({"seq_len": 8192}, 32)
    assert s == {"micro_batch": 1, "seq_len": 8192, "grad_accum": 1, "padded": False, "precision": "pure-bf16",
                 "optimizer": "adamw", "optimizer_state_dtype": "bf16", "optimizer_in_backward": False,
                 "optimizer_impl": "fused", "runtime": "hf", "attention": "flash", "mlp_chunks": 1, "mlp_impl": "loop", "lm_chunks": 1, "lm_impl": "recompute",
                 "checkpoint": [], "offload_checkpoints": False, "dp": 1, "zero_stage": 0, "zero3_prefetch": 1,
                 "reduce_bucket_size": 500_000_000, "overlap_comm": False, "sp": 1, "sp_impl": "ulysses", "ep": 1,
                 "moe_imbalance": 1.0}
    assert jobs.normalize_setup({"sp": 2, "sp_impl": "ring", "seq_len": 64}, 32)["sp_impl"] == "ring"
    assert jobs.normalize_setup({"precision": "bf16-master"}, 32)["optimizer_state_dtype"] == "fp32"
    assert jobs.normalize_setup({"precision": "amp"}, 32)["optimizer_state_dtype"] == "fp32"


def test_expert_parallelism_is_checked_and_refused_by_the_one_process_cross_check():
    s = jobs.normalize_setup({"ep": 2, "dp": 2, "moe_imbalance": 1.5}, 32)
    assert (s["ep"], s["moe_imbalance"]) == (2, 1.5)
    for bad in ({"ep": 0}, {"ep": 2, "dp": 2, "moe_imbalance": 3}, {"moe_imbalance": True}, {"moe_imbalance": "1"},
                {"ep": 2}, {"sp_impl": "rings"}, {"sp_impl": 1}):
        with pytest.raises(jobs.CrosscheckError):
            jobs.normalize_setup(bad, 32)
    with pytest.raises(jobs.CrosscheckError, match="ep: expected 1"):
        jobs.check_runnable(s)


def test_chunk_tokens_become_chunk_counts():
    # 2 x 10000 tokens in chunks of at most 3000 tokens: ceil(20000 / 3000) = 7 chunks.
    s = jobs.normalize_setup({"seq_len": 10000, "micro_batch": 2, "mlp_chunk_tokens": 3000, "lm_chunk_tokens": 20000},
                           4)
    assert (s["mlp_chunks"], s["lm_chunks"]) == (7, 1)
    assert "mlp_chunk_tokens" not in s


@pytest.mark.parametrize("knobs, field, message", [
    ({"mlp_chunk": 4}, "mlp_chunk", "unknown key"),
    ({"seq_len": 8, "lm_chunks": 9}, "lm_chunks", "at most the tokens per rank (8)"),
    ({"mlp_chunks": 2, "mlp_chunk_tokens": 4}, "mlp_chunk_tokens", "not both"),
    ({"offload_checkpoints": True}, "offload_checkpoints", "checkpointed layers"),
    ({"optimizer_in_backward": True, "grad_accum": 2}, "optimizer_in_backward", "grad_accum"),
    ({"precision": "fp16"}, "precision", "pure-bf16, bf16-master, amp"),
    ({"seq_len": 0}, "seq_len", "in [1, "),
    ({"micro_batch": True}, "micro_batch", "got true"),
    ({"seq_len": 100, "sp": 3}, "sp", "divisor of seq_len"),
])
def test_bad_knobs_name_the_field(knobs, field, message):
    with pytest.raises(jobs.CrosscheckError) as e:
        jobs.normalize_setup(knobs, 4, "m.json: run")
    assert str(e.value).startswith(f"m.json: run: {field}: ") and message in str(e.value)


@pytest.mark.parametrize("key, value, message", [
    ("sp", 2, "one GPU"), ("zero_stage", 1, "one GPU"), ("padded", True, "without padding")])
def test_the_crosscheck_is_one_gpu_without_padding(key, value, message):
    with pytest.raises(jobs.CrosscheckError, match=f"{key}: expected .*{message}"):
        jobs.check_runnable({key: value})
    jobs.check_runnable({})


def test_data_parallelism_is_one_rank_of_ddp_on_the_referee_only():
    jobs.check_runnable({"dp": 8})  # one rank of DistributedDataParallel (mst_referee/ddp.py)
    # What would step on gradients DDP has not reduced is refused, as the hf runtime refuses it.
    with pytest.raises(jobs.CrosscheckError, match="precision: expected pure-bf16 or amp with dp > 1"):
        jobs.check_runnable({"dp": 2, "precision": "bf16-master"})
    with pytest.raises(jobs.CrosscheckError, match="optimizer_in_backward: expected false with dp > 1"):
        jobs.check_runnable({"dp": 2, "optimizer_in_backward": True})
    job = jobs.make_job("llama-3-8b", plan=llama_plan(dp=2), convert="python")
    jobs.check_device(job, "fake")
    for device in ("cpu", "cuda"):
        with pytest.raises(jobs.CrosscheckError, match=f"dp: expected 1 on --device {device}"):
            jobs.check_device(job, device)


def test_a_setup_becomes_the_hf_mst_config_emit_writes():
    setup = jobs.normalize_setup({"seq_len": 16384, "checkpoint": "first:3", "mlp_chunks": 4, "lm_chunks": 16,
                                "lm_impl": "fused", "precision": "bf16-master", "offload_checkpoints": True,
                                "optimizer_impl": "for-loop"}, 32)
    cfg = jobs.hf_mst_config("llama-3-8b", setup, 32, {"peak_allocated_bytes": 5, "peak_reserved_bytes": 6,
                                                    "tokens_per_second": 7.5})
    assert cfg == {
        "format": "hf-mst/1", "model": "llama-3-8b", "seq_len": 16384, "micro_batch": 1, "grad_accum": 1,
        "precision": "bf16-master", "attention": "flash", "mlp": {"chunks": 4, "impl": "loop"},
        "lm_head": {"chunks": 16, "impl": "fused"}, "checkpoint_layers": [0, 1, 2], "offload_checkpoints": True,
        "optimizer": {"name": "adamw", "state_dtype": "fp32", "in_backward": False, "impl": "for-loop"},
        "data_parallel": 1, "sequence_parallel": 1, "zero_stage": 0,
        "predicted": {"peak_allocated_bytes": 5, "peak_reserved_bytes": 6, "tokens_per_second": 7.5}}
    assert mst_hf.load_config(cfg).to_dict() == cfg  # mst_hf reads it as written


def test_hf_mst_back_to_a_setup():
    setup = jobs.normalize_setup({"seq_len": 4096, "checkpoint": [1, 3], "mlp_chunks": 2, "mlp_impl": "tiled",
                                "optimizer": "sgd", "precision": "amp", "grad_accum": 4}, 4)
    back = jobs.setup_from_hf_mst(mst_hf.load_config(jobs.hf_mst_config("m", setup, 4)))
    assert back == setup
    sharded = jobs.normalize_setup({"seq_len": 4096, "dp": 4, "zero_stage": 3, "fsdp2": True, "precision": "bf16-master"}, 4)
    assert sharded["fsdp2"] and "param_persistence_threshold" not in sharded
    assert jobs.setup_from_hf_mst(mst_hf.load_config(jobs.hf_mst_config("m", sharded, 4))) == sharded


def test_a_plan_cut_to_fewer_layers_keeps_the_first_layers_checkpoints():
    setup, notes = jobs.setup_for_layers(llama_plan(checkpoint=[0, 5, 9, 31])["setup"], 32, 8)
    assert setup["checkpoint"] == [0, 5] and notes == ["checkpoint: 4 of 32 layers planned, 2 of the first 8 kept"]
    same, notes = jobs.setup_for_layers({"checkpoint": "all"}, 32, 8)
    assert same["checkpoint"] == list(range(8)) and notes  # "all" stays all
    untouched, notes = jobs.setup_for_layers(llama_plan()["setup"], 32, 32)
    assert untouched == llama_plan()["setup"] and notes == []


def test_a_plan_job_records_the_setup_verbatim_and_the_prediction():
    plan = llama_plan()
    job = jobs.make_job(None, plan=plan, convert="python")
    assert job.setup == plan["setup"] and job.prediction == plan["prediction"]
    assert (job.model, job.model_path, job.layers, job.full_layers) == ("llama-3-8b", "models/llama-3-8b.json", 32, 32)
    assert job.mst_config["predicted"]["peak_allocated_bytes"] == 65712301056
    assert job.hf_config_source == "python" and job.notes == []
    assert "_mst" not in job.hf_config and job.hf_config["num_hidden_layers"] == 32


def test_a_cut_job_records_the_cut_model(tmp_path):
    job = jobs.make_job("llama-3-8b", knobs={"checkpoint": "all", "mlp_chunks": 4}, seq=8192, layers=8,
                      derived_dir=tmp_path / "results")
    assert job.layers == 8 and job.full_layers == 32
    assert job.setup["checkpoint"] == list(range(8)) and job.setup["seq_len"] == 8192
    assert job.hf_config["num_hidden_layers"] == 8 and "_mst" not in job.hf_config
    assert Path(job.model_path) == tmp_path / "results" / "configs" / "llama-3-8b-8layers.json"
    assert job.derived_config["num_hidden_layers"] == 8
    assert job.mst_config["checkpoint_layers"] == list(range(8)) and job.prediction is None
    assert any("8 of 32" in n for n in job.notes)


def test_a_plan_for_another_sequence_length_is_refused():
    with pytest.raises(jobs.CrosscheckError, match="the plan is for seq_len 16384, the run asks for 4096"):
        jobs.make_job(None, plan=llama_plan(), seq=4096, convert="python")


def test_an_hf_mst_config_runs_as_it_is(tmp_path):
    cfg = jobs.hf_mst_config("llama-3-8b", jobs.normalize_setup({"seq_len": 2048, "lm_chunks": 4}, 32), 32)
    path = tmp_path / "mst_config.json"
    path.write_text(json.dumps(cfg))
    job = jobs.make_job(None, hf_config_file=path)
    assert job.mst_config == cfg and job.hf_config_source == "hf-config" and job.model == "llama-3-8b"
    assert job.setup["lm_chunks"] == 4 and job.setup["seq_len"] == 2048


def simulated_prediction(plan, tmp_path, mst_plan):
    """The plan with the prediction mst-plan makes for its setup: emit refuses a plan whose recorded
    numbers are not the simulator's and the time model's (an edited or relabelled plan)."""
    knobs = tmp_path / "prediction_setup.json"
    knobs.write_text(json.dumps(plan["setup"]))
    out = subprocess.run([str(mst_plan), "--json", "estimate", "--model", plan["model"], "--gpu", plan["gpu"],
                          "--setup", str(knobs)], capture_output=True, text=True, check=True)
    estimate = json.loads(out.stdout)
    prediction = dict(plan["prediction"], peak_allocated_bytes=estimate["peak"]["allocated_bytes"],
                      peak_reserved_bytes=estimate["peak"]["reserved_bytes"],
                      step_seconds=estimate["time"]["step_seconds"],
                      tokens_per_second=estimate["time"]["tokens_per_second"])
    return dict(plan, prediction=prediction)


def test_plans_convert_through_the_binary_as_through_python(tmp_path, mst_plan):
    for plan in (llama_plan(), llama_plan(checkpoint=[0, 3], lm_impl="fused", precision="bf16-master",
                                          optimizer_state_dtype="fp32", offload_checkpoints=True)):
        plan = simulated_prediction(plan, tmp_path, mst_plan)
        for layers in (None, 8):
            with_binary = jobs.make_job(None, plan=plan, layers=layers, convert="binary", mst_plan=mst_plan,
                                      derived_dir=tmp_path)
            in_python = jobs.make_job(None, plan=plan, layers=layers, convert="python", derived_dir=tmp_path)
            assert with_binary.hf_config_source == "mst-plan emit"
            if layers is None:
                assert with_binary.mst_config == in_python.mst_config
                continue
            # A cut model's run carries no plan prediction (it was the full model's): the binary derives the
            # cut model's own, which the mirror, without a simulator, cannot (zeros); the rest is the same.
            binary_predicted = with_binary.mst_config.pop("predicted")
            assert in_python.mst_config.pop("predicted") == {"peak_allocated_bytes": 0, "peak_reserved_bytes": 0,
                                                             "tokens_per_second": 0}
            assert binary_predicted["peak_allocated_bytes"] > 0 and binary_predicted["tokens_per_second"] > 0
            assert with_binary.mst_config == in_python.mst_config


# ---- the result --------------------------------------------------------------------------


def fake_summary(device="NVIDIA H100 80GB HBM3"):
    gpu = device != "cpu"
    return {"peak_allocated_bytes": 64 << 30 if gpu else None, "peak_reserved_bytes": 66 << 30 if gpu else None,
            "step_seconds": 3.5, "tokens_per_second": 4681.1, "losses": [12.5, 12.4, 12.4, 12.3], "layers": 32,
            "device": device, "torch": "2.11.0", "transformers": "4.57.0", "attn_implementation": "sdpa"}


def test_the_measurement_has_the_format_mst_plan_reads(tmp_path):
    job = jobs.make_job(None, plan=llama_plan(), convert="python")
    record = records.measurement(job, fake_summary())
    records.validate_measurement(record)
    out = tmp_path / "deep" / "run.json"
    jobs.write_json(out, record)
    back = json.loads(out.read_text())
    assert back == record and out.read_text().endswith("\n")
    assert {k: back[k] for k in ("format", "backend", "model", "model_path", "seed", "workspace_bytes", "timeline")} \
        == {"format": "mst-measure/1", "backend": "torch", "model": "llama-3-8b",
            "model_path": "models/llama-3-8b.json", "seed": 0, "workspace_bytes": 0, "timeline": None}
    assert back["setup"] == llama_plan()["setup"]  # the plan's setup, verbatim
    assert back["summary"]["peak_allocated_bytes"] == 64 << 30 and back["prediction"]["peak_reserved_bytes"]
    assert not list(tmp_path.rglob("*.tmp"))


def test_an_out_of_memory_run_is_a_record_without_summary():
    job = jobs.make_job(None, plan=llama_plan(), convert="python")
    record = records.measurement(job, None, {"kind": "oom", "message": "CUDA out of memory", "during": "warm-up step 0"})
    records.validate_measurement(record)
    assert record["error"] == "oom" and record["summary"] is None and record["error_detail"]["during"]


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(timeline={"events": []}), "timeline: expected the recorded events from the referee, null from torch"),
    (lambda r: r.update(format="mst-timeline/1"), "format"),
    (lambda r: r["summary"].update(peak_allocated_bytes=None), "expected bytes on a GPU"),
    (lambda r: r["summary"].update(device="cpu"), "null on the CPU"),
    (lambda r: r["summary"].update(losses=[1.0, float("nan")]), "finite"),
    (lambda r: r["summary"].pop("attn_implementation"), "summary.attn_implementation"),
    (lambda r: r["summary"].update(losses_unpatched=[1.0]), "one loss per step"),
    (lambda r: r.update(seed=-1), "seed"),
    (lambda r: r.update(error="oom", error_detail={}), "summary: expected null"),
])
def test_the_writer_refuses_a_broken_record(change, message):
    record = records.measurement(jobs.make_job(None, plan=llama_plan(), convert="python"), fake_summary())
    change(record)
    with pytest.raises(ValueError, match=message):
        records.validate_measurement(record)


def test_the_cpu_records_no_peaks():
    record = records.measurement(jobs.make_job(None, plan=llama_plan(), convert="python"), fake_summary("cpu"))
    records.validate_measurement(record)


def test_loss_agreement_is_the_largest_relative_difference():
    assert records.loss_agreement([10.0, 5.0], [10.0, 4.0]) == pytest.approx(0.25)
    assert jobs.LOSS_RTOL == 2 ** -7  # two units of bf16 rounding


def test_the_unpatched_twin_is_written_beside_the_run():
    out = Path("results/x/llama.s4k.json")
    assert records.record_path(out, {"run": "llama.s4k"}, "llama.s4k") == out
    assert records.record_path(out, {"run": "llama.s4k.unpatched"}, "llama.s4k") == Path("results/x/llama.s4k.unpatched.json")


def test_the_unpatched_twin_trains_the_setup_without_mst_or_checkpoints():
    job = jobs.make_job(None, plan=llama_plan(), convert="python")
    twin = train.unpatched_job(job)
    assert twin.name == "llama-3-8b.unpatched"
    assert (twin.setup["mlp_chunks"], twin.setup["lm_chunks"], twin.setup["checkpoint"]) == (1, 1, [])
    assert twin.mst_config["checkpoint_layers"] == [] and twin.mst_config["lm_head"]["chunks"] == 1
    assert job.setup["mlp_chunks"] == 4  # the job itself is unchanged


# ---- the matrix --------------------------------------------------------------------------


def test_the_matrix_resolves_every_run():
    data = json.loads(MATRIX.read_text())
    runs = jobs.load_matrix(MATRIX)
    assert len(runs) == len(data["runs"]) >= 20
    names = [j.name for j in runs]
    assert len(set(names)) == len(names)
    for job, entry in zip(runs, data["runs"]):
        if "plan" in entry:  # a plan `recommend` wrote, next to the matrix
            plan = json.loads((MATRIX.parent / entry["plan"]).read_text())
            assert job.setup == plan["setup"] and job.prediction == plan["prediction"]
            assert job.mst_config["predicted"]["peak_allocated_bytes"] == plan["prediction"]["peak_allocated_bytes"]
        assert (REPO / "models" / f"{job.model}.json").is_file(), job.model
        assert job.setup["seq_len"] == entry["seq"]
        assert (job.setup["dp"], job.setup["sp"], job.setup["zero_stage"]) == (1, 1, 0)
        assert all(i < job.layers for i in job.setup["checkpoint"])
        assert mst_hf.load_config(job.mst_config).seq_len == entry["seq"]
        assert job.layers == entry.get("layers", job.full_layers)


def test_the_matrix_covers_the_issue():
    runs = jobs.load_matrix(MATRIX)
    models = {"llama-3-8b", "qwen2-7b", "mistral-7b-v0.1", "gemma-2-9b"}
    assert {j.model for j in runs} == models
    assert {j.setup["seq_len"] for j in runs} >= {4096, 16384, 32768}
    # Per model: with and without MsT, with and without checkpointing (a loss check's unpatched
    # twin runs without either).
    for model in models:
        of_model = [j for j in runs if j.model == model]
        kinds = {(j.setup["mlp_chunks"] > 1 or j.setup["lm_chunks"] > 1, bool(j.setup["checkpoint"]))
                 for j in of_model}
        kinds |= {(False, False) for j in of_model if j.loss_check}
        assert {m for m, _ in kinds} == {True, False}, model
        assert {c for _, c in kinds} == {True, False}, model
    assert any(j.loss_check for j in runs)
    assert any(j.layers == j.full_layers for j in runs if j.model == "llama-3-8b")


def test_matrix_mistakes_name_the_run(tmp_path):
    def check(runs, message):
        path = tmp_path / "m.json"
        path.write_text(json.dumps({"format": "mst-torch-matrix/1", "runs": runs}))
        with pytest.raises(jobs.CrosscheckError, match=message):
            jobs.load_matrix(path)

    ok = {"name": "a", "model": "tiny-llama", "seq": 64, "setup": {}}
    path = tmp_path / "ok.json"
    path.write_text(json.dumps({"format": "mst-torch-matrix/1", "runs": [ok]}))
    assert [j.name for j in jobs.load_matrix(path)] == ["a"]
    check([ok, ok], "runs\\[1\\]: name: 'a' appears twice")
    check([dict(ok, name="a/b")], "file-name-safe")
    check([dict(ok, sequence=64)], "runs\\[0\\]: sequence: unknown key")
    check([dict(ok, plan="p.json")], "exactly one of")
    check([{"name": "a", "model": "tiny-llama", "setup": {}}], "a: seq: missing")
    check([dict(ok, setup={"lm_chunks": 100})], "m.json: a: setup: lm_chunks: expected at most")
    check([dict(ok, model="llama-9")], "llama-9")
    check([dict(ok, layers=3)], "expected 1 to 2")
    check([dict(ok, steps=0)], "steps: expected an integer of at least 1")


def test_a_matrix_run_may_reference_a_plan_file(tmp_path):
    (tmp_path / "plans").mkdir()
    (tmp_path / "plans" / "p.json").write_text(json.dumps(llama_plan()))
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"format": "mst-torch-matrix/1",
                                "runs": [{"name": "p", "plan": "plans/p.json", "layers": 4}]}))
    (job,) = jobs.load_matrix(path, derived_dir=tmp_path)
    assert job.model == "llama-3-8b" and job.layers == 4 and job.setup["checkpoint"] == [0, 1, 2, 3]


def test_the_matrix_setups_are_what_mst_plan_reads(tmp_path, mst_plan):
    """The Python mirror of parse_setup and of the hf-mst emitter agrees with the binary on every run."""
    for job in jobs.load_matrix(MATRIX, derived_dir=tmp_path):
        model = job.model
        if job.derived_config is not None:
            model = str(tmp_path / f"{job.name}.config.json")
            Path(model).write_text(json.dumps(job.derived_config))
        knobs = tmp_path / f"{job.name}.setup.json"
        knobs.write_text(json.dumps(job.setup))
        out = subprocess.run([str(mst_plan), "--json", "estimate", "--model", model, "--gpu", "h100-sxm-80gb",
                              "--setup", str(knobs)], capture_output=True, text=True, check=True)
        estimate = json.loads(out.stdout)
        assert estimate["setup"] == job.setup, job.name
        plan = {"format": "mst-plan/1", "model": model, "gpu": "h100-sxm-80gb", "gpus": 1, "setup": job.setup}
        if job.prediction:
            plan["prediction"] = job.prediction
        emitted = jobs.emit_hf_mst_with_binary(mst_plan, plan)
        expected = dict(job.mst_config, model=model)
        if not job.prediction:  # (the binary derives what the mirror, without a simulator, leaves at zero)
            assert expected.pop("predicted") == {"peak_allocated_bytes": 0, "peak_reserved_bytes": 0, "tokens_per_second": 0}
            assert emitted.pop("predicted") == {"peak_allocated_bytes": estimate["peak"]["allocated_bytes"],
                                                "peak_reserved_bytes": estimate["peak"]["reserved_bytes"],
                                                "tokens_per_second": estimate["time"]["tokens_per_second"]}, job.name
        assert emitted == expected, job.name


def test_the_committed_plans_are_plans_mst_plan_reads(mst_plan):
    plans = sorted((MATRIX.parent / "torch_plans").glob("*.json"))
    referenced = {run.get("plan") for run in json.loads(MATRIX.read_text())["runs"]}
    assert plans and {f"torch_plans/{p.name}" for p in plans} <= referenced
    for path in plans:
        out = subprocess.run([str(mst_plan), "emit", "--plan", str(path), "--format", "hf-mst"],
                             capture_output=True, text=True, check=True)
        job = jobs.make_job(None, plan=json.loads(path.read_text()), convert="python")
        assert json.loads(out.stdout) == job.mst_config, path.name


# ---- running (torch and transformers; on the CPU) ----------------------------------------


def _needs_torch():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")


def test_a_tiny_llama_trains_on_the_cpu_and_matches_the_unpatched_losses(tmp_path):
    _needs_torch()
    knobs = tmp_path / "knobs.json"
    knobs.write_text(json.dumps({"checkpoint": [1], "mlp_chunks": 3, "lm_chunks": 5, "precision": "pure-bf16"}))
    out = tmp_path / "run.json"
    assert cli.main(["tiny-llama", "--setup", str(knobs), "--seq", "48", "--steps", "2", "--device", "cpu",
                    "--loss-check", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    records.validate_measurement(record)
    s = record["summary"]
    assert s["device"] == "cpu" and s["peak_allocated_bytes"] is None and s["peak_reserved_bytes"] is None
    assert len(s["losses"]) == 3 and all(math.isfinite(x) for x in s["losses"])  # warm-up + 2
    assert abs(s["losses"][0] - math.log(256)) < 1.0  # random weights, random tokens over 256 ids
    assert s["loss_check_passed"] and s["loss_max_rel_diff"] <= jobs.LOSS_RTOL
    assert s["layers"] == 2 and s["tokens_per_step"] == 48 and s["tokens_per_second"] > 0
    assert record["setup"]["checkpoint"] == [1] and record["hf_mst"]["mlp"]["chunks"] == 3
    twin = json.loads((tmp_path / "run.unpatched.json").read_text())
    records.validate_measurement(twin)
    assert twin["summary"]["losses"] == s["losses_unpatched"]
    assert twin["setup"]["mlp_chunks"] == 1 and twin["setup"]["checkpoint"] == []


def test_the_matrix_runs_each_entry_and_goes_on_past_out_of_memory(tmp_path, monkeypatch, capsys):
    _needs_torch()
    matrix = tmp_path / "m.json"
    matrix.write_text(json.dumps({
        "format": "mst-torch-matrix/1", "defaults": {"steps": 1, "setup": {"precision": "pure-bf16"}},
        "runs": [
            {"name": "cut", "model": "tiny-llama", "seq": 32, "layers": 1, "setup": {"checkpoint": "all"}},
            {"name": "oom", "model": "tiny-llama", "seq": 32, "setup": {}},
            {"name": "amp", "model": "tiny-llama", "seq": 16, "setup": {"precision": "amp", "grad_accum": 2,
                                                                         "lm_chunks": 3, "lm_impl": "fused"}},
        ]}))
    real_train = train.train

    def fake_oom(job, patched, device, progress):
        if job.name == "oom":
            progress.stage = "warm-up step 0"
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_train(job, patched, device, progress)

    monkeypatch.setattr(train, "train", fake_oom)
    out_dir = tmp_path / "results"
    assert cli.main(["--matrix", str(matrix), "--out-dir", str(out_dir), "--device", "cpu"]) == 0
    cut = json.loads((out_dir / "cut.json").read_text())
    assert cut["summary"]["layers"] == 1 and cut["setup"]["checkpoint"] == [0]
    assert cut["model_path"].endswith("configs/tiny-llama-1layers.json")
    assert json.loads((out_dir / "configs" / "tiny-llama-1layers.json").read_text())["num_hidden_layers"] == 1
    oom = json.loads((out_dir / "oom.json").read_text())
    assert oom["error"] == "oom" and oom["summary"] is None and oom["error_detail"]["during"] == "warm-up step 0"
    amp = json.loads((out_dir / "amp.json").read_text())
    assert amp["summary"]["dtype"] == "float32" and amp["summary"]["tokens_per_step"] == 32
    for record in (cut, oom, amp):
        records.validate_measurement(record)
    assert "oom: oom during warm-up step 0" in capsys.readouterr().err
