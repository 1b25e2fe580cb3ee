"""hf-mst/1 config loading and chunk sizes: pure Python, no torch."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mst_hf import ConfigError, MstConfig, chunk_sizes, chunk_spans, load_config

GOOD = {
    "format": "hf-mst/1",
    "model": "llama-3-8b",
    "seq_len": 32768,
    "micro_batch": 1,
    "grad_accum": 1,
    "precision": "pure-bf16",
    "attention": "flash",
    "mlp": {"chunks": 8, "impl": "loop"},
    "lm_head": {"chunks": 16, "impl": "recompute"},
    "checkpoint_layers": [0, 1, 2, 3],
    "offload_checkpoints": False,
    "optimizer": {"name": "adamw", "state_dtype": "bf16", "in_backward": True, "impl": "foreach"},
    "data_parallel": 1,
    "sequence_parallel": 1,
    "zero_stage": 0,
    "predicted": {"peak_allocated_bytes": 51539607552, "peak_reserved_bytes": 53687091200,
                  "tokens_per_second": 3512.5},
}

REMOVE = object()


def with_field(path, value):
    """GOOD with the dotted ``path`` set to ``value`` (or removed when value is REMOVE)."""
    data = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    if value is REMOVE:
        del node[last]
    else:
        node[last] = value
    return data


def test_a_good_config_loads_every_field():
    c = load_config(GOOD)
    assert isinstance(c, MstConfig)
    assert (c.model, c.seq_len, c.micro_batch, c.grad_accum) == ("llama-3-8b", 32768, 1, 1)
    assert (c.precision, c.attention) == ("pure-bf16", "flash")
    assert (c.mlp.chunks, c.mlp.impl) == (8, "loop")
    assert (c.lm_head.chunks, c.lm_head.impl) == (16, "recompute")
    assert c.checkpoint_layers == (0, 1, 2, 3)
    assert c.offload_checkpoints is False
    assert (c.optimizer.name, c.optimizer.state_dtype, c.optimizer.in_backward) == ("adamw", "bf16", True)
    assert (c.data_parallel, c.sequence_parallel, c.zero_stage) == (1, 1, 0)
    assert c.predicted.peak_allocated_bytes == 51539607552
    assert c.predicted.tokens_per_second == 3512.5
    assert c.tokens_per_rank == 32768


def test_the_optimizer_implementation_is_read_and_defaults_to_fused_for_older_files():
    assert load_config(GOOD).optimizer.impl == "foreach"
    older = copy.deepcopy(GOOD)
    del older["optimizer"]["impl"]  # written before the field existed: planned with a fused step
    assert load_config(older).optimizer.impl == "fused"
    bad = copy.deepcopy(GOOD)
    bad["optimizer"]["impl"] = "multi-tensor"
    with pytest.raises(ConfigError, match='config: optimizer.impl: expected one of "foreach", "fused", "for-loop"'):
        load_config(bad)


def test_plain_ddp_refuses_what_would_step_on_unreduced_gradients():
    # DDP (data_parallel > 1, ZeRO 0) reduces a gradient after its AccumulateGrad hooks, where the
    # fp32 master weights take it and a step in backward uses it.
    ddp = dict(copy.deepcopy(GOOD), data_parallel=4, optimizer=dict(GOOD["optimizer"], in_backward=False))
    assert load_config(ddp).data_parallel == 4
    with pytest.raises(ConfigError, match='config: precision: expected pure-bf16 or amp with data_parallel > 1'):
        load_config(dict(ddp, precision="bf16-master"))
    with pytest.raises(ConfigError, match="config: optimizer.in_backward: expected false with data_parallel > 1"):
        load_config(dict(ddp, optimizer=dict(GOOD["optimizer"], in_backward=True)))
    # Under ZeRO the optimizer is DeepSpeed's: not refused here.
    assert load_config(dict(ddp, precision="bf16-master", zero_stage=2)).precision == "bf16-master"


def test_fsdp2_is_read_where_zero_3_shards_and_drops_deepspeeds_zero_3_paths():
    sharded = dict(copy.deepcopy(GOOD), data_parallel=4, zero_stage=3, optimizer=dict(GOOD["optimizer"], in_backward=False))
    assert load_config(sharded).deepspeed_zero3 and not load_config(sharded).fsdp2  # (files without the key)
    c = load_config(dict(sharded, fsdp2=True))
    assert c.fsdp2 and not c.deepspeed_zero3
    assert c.to_dict()["fsdp2"] is True and "fsdp2" not in load_config(sharded).to_dict()
    with pytest.raises(ConfigError, match="config: fsdp2: expected false unless zero_stage is 3 over data_parallel > 1"):
        load_config(dict(sharded, fsdp2=True, zero_stage=2))
    for other in ({"precision": "amp"}, {"sequence_parallel": 2}):
        with pytest.raises(ConfigError, match="config: fsdp2: expected false unless zero_stage is 3"):
            load_config(dict(sharded, fsdp2=True, **other))
    with pytest.raises(ConfigError, match="config: fsdp2: expected true or false"):
        load_config(dict(sharded, fsdp2="yes"))
    with pytest.raises(ConfigError, match="config: optimizer.impl: expected foreach or for-loop for sgd with fsdp2"):
        load_config(dict(sharded, fsdp2=True, optimizer=dict(sharded["optimizer"], name="sgd", impl="fused")))


def test_fsdp2_no_sync_is_read_with_fsdp2_only():
    sharded = dict(copy.deepcopy(GOOD), data_parallel=4, zero_stage=3, fsdp2=True, grad_accum=4,
                   optimizer=dict(GOOD["optimizer"], in_backward=False))
    c = load_config(dict(sharded, fsdp2_no_sync=True))
    assert c.fsdp2_no_sync and c.to_dict()["fsdp2_no_sync"] is True
    assert not load_config(sharded).fsdp2_no_sync and "fsdp2_no_sync" not in load_config(sharded).to_dict()
    with pytest.raises(ConfigError, match="config: fsdp2_no_sync: expected false without fsdp2"):
        load_config(dict(sharded, fsdp2=False, fsdp2_no_sync=True))
    assert load_config(dict(sharded, fsdp2_no_sync=True, precision="bf16-master")).fsdp2_no_sync
    with pytest.raises(ConfigError, match="config: fsdp2_no_sync: expected true or false"):
        load_config(dict(sharded, fsdp2_no_sync=1))


def test_fsdp2_reshard_after_forward_is_read_with_fsdp2_only():
    sharded = dict(copy.deepcopy(GOOD), data_parallel=4, zero_stage=3, fsdp2=True,
                   optimizer=dict(GOOD["optimizer"], in_backward=False))
    assert load_config(sharded).fsdp2_reshard_after_forward and "fsdp2_reshard_after_forward" not in load_config(sharded).to_dict()
    c = load_config(dict(sharded, fsdp2_reshard_after_forward=False))
    assert not c.fsdp2_reshard_after_forward and c.to_dict()["fsdp2_reshard_after_forward"] is False
    with pytest.raises(ConfigError, match="config: fsdp2_reshard_after_forward: expected true without fsdp2"):
        load_config(dict(sharded, fsdp2=False, fsdp2_reshard_after_forward=False))


def test_fsdp2_groups_are_read_with_fsdp2_only():
    sharded = dict(copy.deepcopy(GOOD), data_parallel=4, zero_stage=3, fsdp2=True,
                   optimizer=dict(GOOD["optimizer"], in_backward=False))
    assert load_config(sharded).fsdp2_groups == "mst_hf" and "fsdp2_groups" not in load_config(sharded).to_dict()
    c = load_config(dict(sharded, fsdp2_groups="accelerate"))
    assert c.fsdp2_groups == "accelerate" and c.to_dict()["fsdp2_groups"] == "accelerate"
    with pytest.raises(ConfigError, match="config: fsdp2_groups: expected mst_hf without fsdp2"):
        load_config(dict(sharded, fsdp2=False, fsdp2_groups="accelerate"))
    # (fp32 parameters: the Trainer's bf16=True, under accelerate's own policy)
    assert load_config(dict(sharded, precision="bf16-master", fsdp2_groups="accelerate")).fsdp2_groups == "accelerate"
    with pytest.raises(ConfigError, match='config: fsdp2_groups: expected one of "mst_hf", "accelerate", "axolotl"'):
        load_config(dict(sharded, fsdp2_groups="torchtitan"))
    # Axolotl's: bf16 weights only (it trains the bf16 weights it loads)
    assert load_config(dict(sharded, precision="pure-bf16", fsdp2_groups="axolotl")).fsdp2_groups == "axolotl"
    with pytest.raises(ConfigError, match="config: fsdp2_groups: expected pure-bf16 with axolotl .* got precision bf16-master"):
        load_config(dict(sharded, precision="bf16-master", fsdp2_groups="axolotl"))


def test_the_config_is_frozen():
    c = load_config(GOOD)
    with pytest.raises(AttributeError):
        c.seq_len = 1
    with pytest.raises(AttributeError):
        c.mlp.chunks = 2


def test_a_config_file_round_trips(tmp_path):
    path = tmp_path / "mst_config.json"
    path.write_text(json.dumps(GOOD))
    first = load_config(path)
    assert first.to_dict() == GOOD
    again = tmp_path / "again.json"
    again.write_text(first.to_json())
    assert load_config(again) == first
    assert load_config(str(again)) == first


def test_the_error_names_the_file_the_field_and_the_expectation(tmp_path):
    path = tmp_path / "mst_config.json"
    path.write_text(json.dumps(with_field("mlp.chunks", 0)))
    with pytest.raises(ValueError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: mlp.chunks: expected a positive integer, got 0"


BAD_FIELDS = [
    ("format", "hf-mst/2", 'expected "hf-mst/1"'),
    ("model", "", "expected a non-empty string"),
    ("model", 7, "expected a non-empty string"),
    ("seq_len", 0, "expected a positive integer, got 0"),
    ("seq_len", 4096.0, "expected a positive integer, got 4096.0"),
    ("seq_len", "4096", 'expected a positive integer, got "4096"'),
    ("micro_batch", -1, "expected a positive integer"),
    ("micro_batch", True, "expected a positive integer, got true"),
    ("grad_accum", 0, "expected a positive integer"),
    ("precision", "fp16", 'expected one of "pure-bf16", "bf16-master", "amp", got "fp16"'),
    ("attention", "math", 'expected one of "flash", "sdpa", "eager", got "math"'),
    ("mlp", 8, "expected a JSON object, got 8"),
    ("mlp.chunks", 0, "expected a positive integer, got 0"),
    ("mlp.chunks", 32769, "expected at most the tokens per rank"),
    ("mlp.impl", "fused", 'expected one of "loop", "tiled"'),
    ("lm_head.chunks", None, "expected a positive integer, got null"),
    ("lm_head.impl", "loop", 'expected one of "recompute", "fused"'),
    ("checkpoint_layers", "all", "expected a list of non-negative layer indices"),
    ("checkpoint_layers", [0, -1], "expected a list of non-negative layer indices"),
    ("checkpoint_layers", [0, 1.5], "expected a list of non-negative layer indices"),
    ("checkpoint_layers", [2, 2], "expected each layer at most once"),
    ("offload_checkpoints", 0, "expected true or false, got 0"),
    ("optimizer.name", "adam", 'expected one of "adamw", "adamw-8bit", "sgd"'),
    ("optimizer.state_dtype", "fp16", 'expected one of "fp32", "bf16"'),
    ("optimizer.in_backward", "yes", "expected true or false"),
    ("data_parallel", 0, "expected a positive integer"),
    ("sequence_parallel", 3, "expected a divisor of seq_len (32768), got 3"),
    ("zero_stage", 4, "expected an integer from 0 to 3, got 4"),
    ("zero_stage", -1, "expected an integer from 0 to 3"),
    ("predicted.peak_allocated_bytes", -5, "expected a non-negative integer"),
    ("predicted.peak_reserved_bytes", 1.5, "expected a non-negative integer"),
    ("predicted.tokens_per_second", -1, "expected a non-negative number"),
    ("predicted.tokens_per_second", "fast", "expected a non-negative number"),
]


@pytest.mark.parametrize("field,value,expected", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v, _ in BAD_FIELDS])
def test_each_bad_field_is_one_value_error_naming_it(field, value, expected):
    with pytest.raises(ValueError) as e:
        load_config(with_field(field, value))
    assert isinstance(e.value, ConfigError)
    assert str(e.value).startswith(f"config: {field}: ")
    assert expected in str(e.value)


def _leaf_fields(data, prefix=""):
    for key, value in data.items():
        yield prefix + key
        if isinstance(value, dict):
            yield from _leaf_fields(value, f"{prefix}{key}.")


OPTIONAL = {"optimizer.impl"}  # older files lack it (tested above)


@pytest.mark.parametrize("field", [f for f in _leaf_fields(GOOD) if f not in OPTIONAL])
def test_every_field_is_required(field):
    with pytest.raises(ValueError, match=f"^config: {field}: missing"):
        load_config(with_field(field, REMOVE))


def test_chunk_limits_use_the_tokens_per_rank():
    # 2 sequences of 4096 tokens over 4 sequence-parallel ranks: 2048 tokens per rank.
    data = dict(copy.deepcopy(GOOD), seq_len=4096, micro_batch=2, sequence_parallel=4)
    data["mlp"]["chunks"] = 2048
    data["lm_head"]["chunks"] = 2048
    assert load_config(data).tokens_per_rank == 2048
    data["lm_head"]["chunks"] = 2049
    with pytest.raises(ValueError, match=r"lm_head\.chunks: expected at most the tokens per rank .*= 2048\), got 2049"):
        load_config(data)


def test_checkpoint_layers_are_kept_sorted():
    assert load_config(with_field("checkpoint_layers", [5, 0, 3])).checkpoint_layers == (0, 3, 5)
    assert load_config(with_field("checkpoint_layers", [])).checkpoint_layers == ()


def test_unknown_top_level_keys_are_ignored_for_forward_compatibility():
    assert load_config(dict(GOOD, comment="written by mst-plan")) == load_config(GOOD)


def test_a_top_level_that_is_not_an_object_is_rejected(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([GOOD]))
    with pytest.raises(ValueError, match=r"list\.json: expected a JSON object, got \[\{"):
        load_config(path)


def test_a_source_that_is_neither_a_path_nor_a_mapping_is_a_type_error():
    with pytest.raises(TypeError, match="expected a path or a mapping, got list"):
        load_config([GOOD])  # type: ignore[arg-type]


def test_a_file_that_is_not_json_is_rejected(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"format": "hf-mst/1",')
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON: .* line 1"):
        load_config(path)


def test_a_missing_file_is_rejected_with_its_path(tmp_path):
    path = tmp_path / "nowhere.json"
    with pytest.raises(ValueError, match=r"nowhere\.json: cannot read the file"):
        load_config(path)


# ---- chunk sizes ---------------------------------------------------------------


def test_chunk_sizes_by_hand():
    assert chunk_sizes(10, 3) == [4, 3, 3]
    assert chunk_sizes(13, 2) == [7, 6]
    assert chunk_sizes(26, 7) == [4, 4, 4, 4, 4, 3, 3]
    assert chunk_sizes(32768, 8) == [4096] * 8
    assert chunk_sizes(7, 7) == [1] * 7
    assert chunk_sizes(5, 1) == [5]


@pytest.mark.parametrize("tokens", list(range(1, 41)) + [4095, 32768, 131071])
def test_chunk_sizes_cover_every_token_evenly_larger_first(tokens):
    for chunks in sorted({1, 2, 3, 5, 7, 8, 16, 64, tokens // 2, tokens - 1, tokens}):
        if not 1 <= chunks <= tokens:
            continue
        sizes = chunk_sizes(tokens, chunks)
        assert len(sizes) == chunks
        assert sum(sizes) == tokens
        assert max(sizes) - min(sizes) <= 1
        assert min(sizes) >= 1
        assert all(a >= b for a, b in zip(sizes, sizes[1:]))


def test_chunk_spans_tile_the_tokens_in_order():
    assert chunk_spans(10, 3) == [(0, 4), (4, 7), (7, 10)]
    spans = chunk_spans(131071, 64)
    assert spans[0][0] == 0 and spans[-1][1] == 131071
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


@pytest.mark.parametrize("tokens,chunks,match", [
    (3, 4, r"chunks: expected at most the tokens \(3\), got 4"),
    (8, 0, "chunks: expected a positive integer, got 0"),
    (0, 1, "tokens: expected a positive integer, got 0"),
    (8, 2.0, "chunks: expected a positive integer, got 2.0"),
    (8, True, "chunks: expected a positive integer, got True"),
])
def test_chunk_sizes_refuses_impossible_splits(tokens, chunks, match):
    with pytest.raises(ValueError, match=match):
        chunk_sizes(tokens, chunks)


def test_the_config_mst_plan_emits_loads():
    # The C++ emitter's golden output: the contract between `mst-plan emit` and this package.
    golden = Path(__file__).resolve().parents[2] / "tests" / "golden" / "hf-mst" / "mst_config.json"
    if not golden.exists():
        pytest.skip(f"no emitter golden file at {golden}")
    config = load_config(golden)
    assert config.to_dict() == json.loads(golden.read_text())


def test_the_config_layer_does_not_import_torch():
    package_root = Path(__file__).resolve().parents[1]
    code = ("import sys, mst_hf; mst_hf.load_config(%r); mst_hf.chunk_sizes(9, 2); "
            "assert 'torch' not in sys.modules, 'torch was imported'" % (GOOD,))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=package_root)
