"""Runs of the referee and the cross-check, resolved before any torch is imported.

A run (a :class:`Job`) is a model (a catalog name or a ``config.json``, optionally cut to
its first decoder layers) and a setup (an mst-plan plan, an hf-mst config, or setup
knobs), turned into both what mst-plan re-simulates (the setup JSON, recorded verbatim)
and what ``mst_hf`` applies (the hf-mst/1 config). Everything here is pure Python: a
matrix is checked whole before the first run starts.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import mst_hf

from .step import TRAINERS

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS_DIR = REPO_ROOT / "models"
DEFAULT_MST_PLAN = REPO_ROOT / "build" / "src" / "mst-plan"

MEASURE_FORMAT = "mst-measure/1"
PLAN_FORMAT = "mst-plan/1"
MATRIX_FORMAT = "mst-torch-matrix/1"

# Losses of the patched and the unpatched model must agree to within two units of bf16
# rounding (2^-8 each): the matmuls run in bf16 in every precision (amp autocasts them),
# and mini-sequences change only the shapes of those GEMMs (so their accumulation order)
# while checkpointing replays the same ops. A real mistake (a dropped chunk, a wrong
# loss scale, a missing softcap) moves the loss by far more.
LOSS_RTOL = 2.0 ** -7

PRECISIONS = ("pure-bf16", "bf16-master", "amp")
OPTIMIZERS = ("adamw", "adamw-8bit", "sgd")
OPTIMIZER_IMPLS = ("foreach", "fused", "for-loop")
RUNTIMES = ("hf", "kernels")
STATE_DTYPES = ("fp32", "bf16")
ATTENTIONS = ("flash", "sdpa", "eager")
MLP_IMPLS = ("loop", "tiled")
LM_IMPLS = ("recompute", "fused")
SP_IMPLS = ("ulysses", "ring")
FSDP2_GROUPS = mst_hf.config.FSDP2_GROUPS  # whose fully_shard calls group an fsdp2 plan's parameters

# Keys of mst-plan's setup JSON (src/core/setup.cpp parse_setup), with their defaults.
SETUP_DEFAULTS: Dict[str, Any] = {
    "micro_batch": 1, "seq_len": 4096, "grad_accum": 1, "padded": False,
    "precision": "pure-bf16", "optimizer": "adamw", "optimizer_in_backward": False, "optimizer_impl": "fused",
    "runtime": "hf",
    "attention": "flash", "mlp_chunks": 1, "mlp_impl": "loop", "lm_chunks": 1, "lm_impl": "recompute",
    "offload_checkpoints": False, "dp": 1, "zero_stage": 0, "zero3_prefetch": 1, "reduce_bucket_size": 500_000_000,
    "overlap_comm": False, "param_persistence_threshold": 100_000, "prefetch_bucket_size": 50_000_000,
    "sp": 1, "sp_impl": "ulysses", "ep": 1, "moe_imbalance": 1.0, "fsdp2": False,
    "fsdp2_no_sync": False, "fsdp2_reshard_after_forward": True, "hf_trainer_bf16": False,
    "fsdp2_groups": "mst_hf",
}
SETUP_KEYS = tuple(SETUP_DEFAULTS) + ("optimizer_state_dtype", "mlp_chunk_tokens", "lm_chunk_tokens", "checkpoint")


class CrosscheckError(ValueError):
    """A user's mistake; the message names the file or option, the field and what was expected."""


def fail(where: str, field_name: str, what: str) -> None:
    raise CrosscheckError(f"{where}: {field_name}: {what}" if field_name else f"{where}: {what}")


# ---- files --------------------------------------------------------------------------------


def read_json(path: Path, what: str = "") -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        fail(str(path), "", f"cannot read {what or 'the file'}: {e.strerror or e}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        fail(str(path), "", f"not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}")


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON; a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def repo_relative(path: Path) -> str:
    """The path relative to the repository root when inside it (results travel between machines)."""
    p = Path(path).resolve()
    try:
        return p.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(p)


# ---- models -------------------------------------------------------------------------------


def catalog_names() -> List[str]:
    return sorted(p.stem for p in MODELS_DIR.glob("*.json"))


def resolve_model(ref: str) -> Tuple[str, Path]:
    """(name, config path) of a catalog name (models/NAME.json) or of a path to a config.json.

    The name is the catalog name, or the file's stem for a path.
    """
    if not isinstance(ref, str) or not ref.strip():
        fail("model", "", f"expected a catalog name or a path to a config.json, got {ref!r}")
    candidate = Path(ref)
    if candidate.is_file():
        return candidate.stem, candidate
    if "/" not in ref and not ref.endswith(".json"):
        path = MODELS_DIR / f"{ref}.json"
        if path.is_file():
            return ref, path
        fail("model", "", f"expected a catalog name ({', '.join(catalog_names())}) or a path to a "
                          f"config.json, got '{ref}'")
    fail(str(candidate), "", "no such file (expected a Hugging Face config.json)")
    raise AssertionError  # unreachable


def gemma3_text_config(data: Mapping[str, Any], where: str) -> Dict[str, Any]:
    """Gemma-3 4B-27B's image-text config (model_type "gemma3"): its text decoder's config, as
    mst-plan plans it (Gemma3ForCausalLM; the vision tower is not part of the run). The "_mst"
    block stays."""
    text = data.get("text_config")
    if not isinstance(text, dict):
        fail(where, "text_config", "expected the text decoder's config (an object) in a gemma3 config")
    if text.get("model_type", "gemma3_text") != "gemma3_text":
        fail(where, "text_config.model_type", f'expected "gemma3_text" in a gemma3 config, got {text["model_type"]!r}')
    out = dict(copy.deepcopy(text), model_type="gemma3_text")
    # Gemma3TextConfig's defaults for the keys read here (transformers fills the rest itself).
    for key, value in (("vocab_size", 262208), ("hidden_size", 2304), ("num_hidden_layers", 26)):
        out.setdefault(key, value)
    if "_mst" in data:
        out["_mst"] = copy.deepcopy(data["_mst"])
    return out


def load_model_config(path: Path) -> Dict[str, Any]:
    """The config.json as written, its "_mst" block included."""
    data = read_json(path, "the model config")
    if not isinstance(data, dict):
        fail(str(path), "", "expected a JSON object (a Hugging Face config.json)")
    if data.get("model_type") == "gemma3":
        data = gemma3_text_config(data, str(path))
    for key in ("model_type", "num_hidden_layers", "vocab_size", "hidden_size"):
        if key not in data:
            fail(str(path), key, "missing (required in a Hugging Face config.json)")
    layers = data["num_hidden_layers"]
    if not _is_int(layers) or layers < 1:
        fail(str(path), "num_hidden_layers", f"expected a positive integer, got {layers!r}")
    return data


def hf_config_dict(raw: Mapping[str, Any], layers: Optional[int] = None) -> Dict[str, Any]:
    """What transformers gets: the config.json without mst-plan's "_mst" block, with
    ``num_hidden_layers`` set to ``layers`` when given (a shallower model of the same shape)."""
    out = {k: copy.deepcopy(v) for k, v in raw.items() if k != "_mst"}
    if layers is not None:
        full = raw["num_hidden_layers"]
        if not _is_int(layers) or not 1 <= layers <= full:
            fail("layers", "", f"expected 1 to {full} (the model's num_hidden_layers), got {layers!r}")
        out["num_hidden_layers"] = layers
        # Per-layer lists (newer configs) describe the first `layers` layers.
        for key in ("layer_types",):
            if isinstance(out.get(key), list):
                out[key] = out[key][:layers]
    return out


def reduced_model_config(raw: Mapping[str, Any], name: str, source: str, layers: int) -> Dict[str, Any]:
    """A config.json for mst-plan of the model cut to ``layers`` decoder layers.

    mst-plan re-simulates a measurement from its model_path, so a run with fewer layers
    records this file, not the full model's. The published parameter count no longer applies.
    """
    out = hf_config_dict(raw, layers)
    meta = dict(raw.get("_mst") or {})
    full = raw["num_hidden_layers"]
    display = meta.get("display_name", name)
    out["_mst"] = {
        "name": reduced_name(name, layers),
        "display_name": f"{display} ({layers} of {full} layers)",
        "source": f"{meta.get('source', source)}, num_hidden_layers {full} -> {layers} "
                  f"(scripts/torch_crosscheck.py --layers {layers})",
    }
    return out


def reduced_name(name: str, layers: int) -> str:
    return f"{name}-{layers}layers"


# ---- setups -------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def integral(v: Any) -> Any:
    """A JSON value as parse_setup reads an integer (json_read.cpp as_integer): an integral number is
    one, written as one or not (5e8, 8.0); anything else is returned as it is, for the caller to refuse."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def checkpoint_layers_from_spec(spec: Any, num_layers: int, where: str = "setup") -> List[int]:
    """Layer indices of a checkpoint placement, as mst-plan reads it (parse_checkpoint_spec):
    "none", "all", "every:K", "first:K", "last:K", "spread:K", "0,2,5-9" or a list of indices."""
    if isinstance(spec, list):
        if not all(_is_int(i) and 0 <= i < num_layers for i in spec):
            fail(where, "checkpoint", f"expected layer indices in 0..{num_layers - 1}, got {spec!r}")
        return sorted(set(spec))
    if not isinstance(spec, str):
        fail(where, "checkpoint", "expected a string (none, all, spread:K, ...) or an array of layer indices")
    accepted = "expected none, all, every:K, first:K, last:K, spread:K or a list like 0,2,5-9"

    def number(text: str) -> int:
        if not re.fullmatch(r"-?[0-9]+", text):
            fail(where, "checkpoint", f"{accepted}; got '{spec}'")
        return int(text)

    if spec in ("none", ""):
        return []
    if spec == "all":
        return list(range(num_layers))
    if ":" in spec:
        kind, _, k_text = spec.partition(":")
        k = number(k_text)
        if kind not in ("every", "first", "last", "spread"):
            fail(where, "checkpoint", f"{accepted}; got '{spec}'")
        if k < 0 or (kind != "every" and k > num_layers) or (kind == "every" and k == 0):
            fail(where, "checkpoint", f"'{spec}': K out of range for {num_layers} layers")
        if kind == "every":
            return list(range(0, num_layers, k))
        if kind == "first":
            return list(range(k))
        if kind == "last":
            return list(range(num_layers - k, num_layers))
        return sorted({i * num_layers // k for i in range(k)})
    layers = set()
    for item in spec.split(","):
        lo_text, dash, hi_text = item.partition("-")
        lo = number(lo_text)
        hi = number(hi_text) if dash else lo
        if lo < 0 or hi >= num_layers or lo > hi:
            fail(where, "checkpoint", f"layer range '{item}' outside 0..{num_layers - 1}")
        layers.update(range(lo, hi + 1))
    return sorted(layers)


def normalize_setup(knobs: Mapping[str, Any], num_layers: int, where: str = "setup") -> Dict[str, Any]:
    """mst-plan's setup JSON (every key, as ``to_json(TrainingSetup)`` writes it) from knobs.

    Mirrors ``parse_setup`` + ``validate`` of src/core/setup.cpp: missing keys take their
    defaults, ``*_chunk_tokens`` become chunk counts, the checkpoint placement becomes
    the list of layer indices. Unknown keys are refused (a typo would otherwise be a
    silently different run).
    """
    if not isinstance(knobs, Mapping):
        fail(where, "", "expected a JSON object of setup knobs")
    unknown = sorted(set(knobs) - set(SETUP_KEYS))
    if unknown:
        fail(where, unknown[0], f"unknown key (expected one of {', '.join(SETUP_KEYS)})")
    s = dict(SETUP_DEFAULTS)
    s.update({k: v for k, v in knobs.items() if k in SETUP_DEFAULTS and v is not None})  # (null: the default, as parse_setup)

    def integer(key: str, low: int, high: int) -> int:
        v = s[key] = integral(s[key])
        if not _is_int(v) or not low <= v <= high:
            fail(where, key, f"expected an integer in [{low}, {high}], got {json.dumps(v)}")
        return v

    def choice(key: str, choices: Sequence[str]) -> str:
        v = s[key]
        if v not in choices:
            fail(where, key, f"expected one of {', '.join(choices)}, got {json.dumps(v)}")
        return v

    def boolean(key: str) -> bool:
        if not isinstance(s[key], bool):
            fail(where, key, f"expected true or false, got {json.dumps(s[key])}")
        return s[key]

    big = 1 << 40
    for key in ("micro_batch", "seq_len"):
        integer(key, 1, big)
    integer("grad_accum", 1, 1 << 20)
    integer("dp", 1, 1 << 20)
    integer("sp", 1, 1 << 20)
    integer("ep", 1, 1 << 20)
    if (s["dp"] * s["sp"]) % s["ep"]:
        fail(where, "ep", f"expected a divisor of dp x sp ({s['dp']} x {s['sp']}), got {s['ep']}")
    imbalance = s["moe_imbalance"]
    if isinstance(imbalance, bool) or not isinstance(imbalance, (int, float)) or not 1 <= imbalance <= s["ep"]:
        fail(where, "moe_imbalance", f"expected a number from 1 to ep ({s['ep']}), got {json.dumps(imbalance)}")
    s["moe_imbalance"] = float(imbalance)
    integer("zero_stage", 0, 3)
    integer("zero3_prefetch", 0, 8)
    integer("reduce_bucket_size", 1, big)
    integer("param_persistence_threshold", 0, big)
    integer("prefetch_bucket_size", 0, big)
    for key in ("padded", "optimizer_in_backward", "offload_checkpoints", "overlap_comm", "fsdp2", "fsdp2_no_sync",
                "fsdp2_reshard_after_forward", "hf_trainer_bf16"):
        boolean(key)
    choice("precision", PRECISIONS)
    choice("optimizer", OPTIMIZERS)
    choice("optimizer_impl", OPTIMIZER_IMPLS)
    choice("runtime", RUNTIMES)
    choice("attention", ATTENTIONS)
    choice("mlp_impl", MLP_IMPLS)
    choice("lm_impl", LM_IMPLS)
    choice("sp_impl", SP_IMPLS)
    choice("fsdp2_groups", FSDP2_GROUPS)
    deepspeed = s["runtime"] == "hf" and s["zero_stage"] in (1, 2)
    zero3 = s["runtime"] == "hf" and s["zero_stage"] == 3 and not s["fsdp2"]  # (DeepSpeed's ZeRO-3 engine)
    if s["fsdp2"] and not (s["runtime"] == "hf" and s["zero_stage"] == 3 and s["dp"] > 1):
        fail(where, "fsdp2", f"expected false unless runtime hf shards over dp > 1 ranks with zero_stage 3 (torch's "
                             f"fully_shard), got true with runtime {s['runtime']}, zero_stage {s['zero_stage']}, dp {s['dp']}")
    if s["fsdp2_no_sync"] and not s["fsdp2"]:
        fail(where, "fsdp2_no_sync", "expected false without fsdp2 (it is FSDP2's set_requires_gradient_sync(False) under "
                                     "accumulation), got true")
    if s["hf_trainer_bf16"] and s["runtime"] != "hf":
        fail(where, "hf_trainer_bf16", "expected false with runtime kernels (it is how the Hugging Face Trainer calls Hugging "
                                       "Face's model: runtime hf), got true")
    if s["hf_trainer_bf16"] and s["fsdp2"]:
        fail(where, "hf_trainer_bf16", "expected false with fsdp2 (accelerate prepares an FSDP2 model without its native amp: "
                                       "bf16=True adds no autocast and no fp32 outputs there), got true")
    if not s["fsdp2_reshard_after_forward"] and not s["fsdp2"]:
        fail(where, "fsdp2_reshard_after_forward", "expected true without fsdp2 (it is fully_shard's reshard_after_forward), "
                                                   "got false")
    if s["fsdp2_groups"] != "mst_hf" and not s["fsdp2"]:
        fail(where, "fsdp2_groups", "expected mst_hf without fsdp2 (it is whose fully_shard calls group it), got "
                                    f"{json.dumps(s['fsdp2_groups'])}")
    if s["fsdp2_groups"] == "axolotl" and s["precision"] != "pure-bf16":
        fail(where, "fsdp2_groups", "expected pure-bf16 with axolotl (Axolotl trains the bf16 weights it loads: no fp32 "
                                    f"master), got precision {s['precision']}")
    if s["reduce_bucket_size"] != SETUP_DEFAULTS["reduce_bucket_size"] and not (deepspeed or zero3):
        fail(where, "reduce_bucket_size", f"expected DeepSpeed's default {SETUP_DEFAULTS['reduce_bucket_size']} unless "
                                          f"DeepSpeed's ZeRO engine runs the step (runtime hf, zero_stage 1, 2 or 3), "
                                          f"got {s['reduce_bucket_size']}")
    for key in ("param_persistence_threshold", "prefetch_bucket_size"):
        if s[key] != SETUP_DEFAULTS[key] and not zero3:
            fail(where, key, f"expected DeepSpeed's default {SETUP_DEFAULTS[key]} unless DeepSpeed's ZeRO-3 engine runs the "
                             f"step (runtime hf, zero_stage 3), got {s[key]}")
    if s["overlap_comm"] and not deepspeed:
        fail(where, "overlap_comm", "expected false unless DeepSpeed's ZeRO 1/2 engine runs the step (runtime hf, zero_stage 1 or 2)")
    state = knobs.get("optimizer_state_dtype")
    if state is None:
        state = "bf16" if s["precision"] == "pure-bf16" else "fp32"
    elif state not in STATE_DTYPES:
        fail(where, "optimizer_state_dtype", f"expected one of {', '.join(STATE_DTYPES)}, got {json.dumps(state)}")
    s["optimizer_state_dtype"] = state
    # (src/core/setup.cpp validate_hf_scope: torch keeps optimizer states in the dtype of the tensors it updates)
    stepped = "bf16" if s["precision"] == "pure-bf16" else "fp32"
    if s["runtime"] == "hf" and not (deepspeed or zero3) and s["optimizer"] != "adamw-8bit" and state != stepped:
        fail(where, "optimizer_state_dtype", f"expected {stepped} with precision {s['precision']} with runtime hf (torch "
                                             f"keeps optimizer states in the dtype of the tensors it updates), got {state}")

    if s["seq_len"] % s["sp"] != 0:
        fail(where, "sp", f"expected a divisor of seq_len ({s['seq_len']}), got {s['sp']}")
    tokens = max(1, s["micro_batch"] * s["seq_len"] // s["sp"])
    for count_key, tokens_key in (("mlp_chunks", "mlp_chunk_tokens"), ("lm_chunks", "lm_chunk_tokens")):
        if count_key in knobs and tokens_key in knobs:
            fail(where, tokens_key, f"expected either {count_key} or {tokens_key}, not both")
        if tokens_key in knobs:
            t = knobs[tokens_key]
            if not _is_int(t) or t < 1:
                fail(where, tokens_key, f"expected a positive integer, got {json.dumps(t)}")
            s[count_key] = -(-tokens // t)
        n = integer(count_key, 1, big)
        if n > tokens:
            fail(where, count_key, f"expected at most the tokens per rank ({tokens}), got {n}")
    s["checkpoint"] = checkpoint_layers_from_spec(knobs.get("checkpoint", "none"), num_layers, where)
    if s["offload_checkpoints"] and not s["checkpoint"]:
        fail(where, "offload_checkpoints", "expected some checkpointed layers to offload (set checkpoint)")
    if s["optimizer_in_backward"] and s["grad_accum"] > 1:
        fail(where, "optimizer_in_backward", "expected false with grad_accum > 1")
    if s["optimizer_in_backward"] and s["zero_stage"] >= 2:
        fail(where, "optimizer_in_backward", "expected false with ZeRO stage 2 or 3")
    order = ("micro_batch", "seq_len", "grad_accum", "padded", "precision", "optimizer", "optimizer_state_dtype",
             "optimizer_in_backward", "optimizer_impl", "runtime", "attention", "mlp_chunks", "mlp_impl", "lm_chunks", "lm_impl",
             "checkpoint", "offload_checkpoints", "dp", "zero_stage", "zero3_prefetch", "reduce_bucket_size", "overlap_comm", "sp",
             "sp_impl", "ep", "moe_imbalance") + (("param_persistence_threshold", "prefetch_bucket_size") if zero3 else ()) + (
                 ("fsdp2",) if s["fsdp2"] else ()) + (("fsdp2_no_sync",) if s["fsdp2_no_sync"] else ()) + (
                 () if s["fsdp2_reshard_after_forward"] else ("fsdp2_reshard_after_forward",)) + (
                 ("fsdp2_groups",) if s["fsdp2_groups"] != "mst_hf" else ()) + (
                 ("hf_trainer_bf16",) if s["hf_trainer_bf16"] else ())
    return {k: s[k] for k in order}


def check_runnable(setup: Mapping[str, Any], where: str = "setup") -> None:
    """The cross-check is one process with plain PyTorch (no DeepSpeed or Ulysses; data parallelism is
    one rank of DistributedDataParallel or of FSDP2, which only the referee runs: check_device),
    training packed random tokens (no padding)."""
    for key, expected in (("sp", 1), ("zero_stage", 3 if setup.get("fsdp2") else 0), ("ep", 1)):
        if setup.get(key, expected) != expected:
            fail(where, key, f"expected {expected}: the cross-check runs plain PyTorch on one GPU, "
                             f"got {json.dumps(setup.get(key))}")
    if setup.get("dp", 1) > 1 and setup.get("precision") == "bf16-master" and not setup.get("fsdp2"):
        fail(where, "precision", "expected pure-bf16 or amp with dp > 1 (mst_hf's fp32 master weights would step on "
                                 "gradients DDP has not reduced), got \"bf16-master\"")
    if setup.get("dp", 1) > 1 and setup.get("optimizer_in_backward", False):
        fail(where, "optimizer_in_backward", "expected false with dp > 1 (a step in backward would use gradients DDP "
                                             "has not reduced), got true")
    if setup.get("padded", False):
        fail(where, "padded", "expected false: the cross-check trains packed random tokens, without padding")
    if setup.get("runtime", "hf") != "hf":
        fail(where, "runtime", f"expected hf: the cross-check runs Hugging Face's code, got {json.dumps(setup['runtime'])}")


def check_device(job: "Job", device: str) -> None:
    """A data-parallel job runs on the referee's fake process group only (one rank of DDP)."""
    if job.setup.get("dp", 1) > 1 and device != "fake":
        fail(job.name, "dp", f"expected 1 on --device {device} (the cross-check runs one process); "
                             "--device fake runs one rank of DistributedDataParallel or FSDP2")


def hf_mst_config(model: str, setup: Mapping[str, Any], num_layers: int,
                  prediction: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The hf-mst/1 config of a setup: what ``mst-plan emit --format hf-mst`` writes
    (src/core/emit/hf_mst.cpp), field for field, for runs without the binary. ``predicted`` is the plan's
    prediction as given (zeros without one, where the binary derives the simulator's: it has one)."""
    s = normalize_setup({k: v for k, v in setup.items() if k in SETUP_KEYS}, num_layers)
    p = prediction or {}
    return {
        "format": mst_hf.FORMAT,
        "model": model,
        "seq_len": s["seq_len"],
        "micro_batch": s["micro_batch"],
        "grad_accum": s["grad_accum"],
        "precision": s["precision"],
        "attention": s["attention"],
        "mlp": {"chunks": s["mlp_chunks"], "impl": s["mlp_impl"]},
        "lm_head": {"chunks": s["lm_chunks"], "impl": s["lm_impl"]},
        "checkpoint_layers": s["checkpoint"],
        "offload_checkpoints": s["offload_checkpoints"],
        "optimizer": {"name": s["optimizer"], "state_dtype": s["optimizer_state_dtype"],
                      "in_backward": s["optimizer_in_backward"], "impl": s["optimizer_impl"]},
        "data_parallel": s["dp"],
        "sequence_parallel": s["sp"],
        "zero_stage": s["zero_stage"],
        "predicted": {"peak_allocated_bytes": int(p.get("peak_allocated_bytes", 0)),
                      "peak_reserved_bytes": int(p.get("peak_reserved_bytes", 0)),
                      "tokens_per_second": p.get("tokens_per_second", 0)},
        **({"fsdp2": True} if s.get("fsdp2") else {}),
        **({"fsdp2_no_sync": True} if s.get("fsdp2_no_sync") else {}),
        **({} if s.get("fsdp2_reshard_after_forward", True) else {"fsdp2_reshard_after_forward": False}),
        **({"fsdp2_groups": s["fsdp2_groups"]} if s.get("fsdp2_groups", "mst_hf") != "mst_hf" else {}),
    }


def setup_from_hf_mst(cfg: "mst_hf.MstConfig") -> Dict[str, Any]:
    """mst-plan's setup JSON for an hf-mst config (the fields hf-mst lacks take their defaults)."""
    setup = dict(SETUP_DEFAULTS)
    setup.update({
        "micro_batch": cfg.micro_batch, "seq_len": cfg.seq_len, "grad_accum": cfg.grad_accum,
        "precision": cfg.precision, "optimizer": cfg.optimizer.name,
        "optimizer_state_dtype": cfg.optimizer.state_dtype, "optimizer_in_backward": cfg.optimizer.in_backward,
        "optimizer_impl": cfg.optimizer.impl, "runtime": "hf",
        "attention": cfg.attention, "mlp_chunks": cfg.mlp.chunks, "mlp_impl": cfg.mlp.impl,
        "lm_chunks": cfg.lm_head.chunks, "lm_impl": cfg.lm_head.impl,
        "checkpoint": list(cfg.checkpoint_layers), "offload_checkpoints": cfg.offload_checkpoints,
        "dp": cfg.data_parallel, "zero_stage": cfg.zero_stage, "sp": cfg.sequence_parallel, "fsdp2": cfg.fsdp2,
        "fsdp2_no_sync": cfg.fsdp2_no_sync, "fsdp2_reshard_after_forward": cfg.fsdp2_reshard_after_forward,
        "fsdp2_groups": cfg.fsdp2_groups,
    })
    if setup["zero_stage"] != 3 or cfg.fsdp2:  # (DeepSpeed ZeRO-3's options are written where it runs only, as to_json writes them)
        for key in ("param_persistence_threshold", "prefetch_bucket_size"):
            del setup[key]
    if not cfg.fsdp2:  # (and fsdp2 where it is set)
        del setup["fsdp2"]
    if not cfg.fsdp2_no_sync:
        del setup["fsdp2_no_sync"]
    if cfg.fsdp2_reshard_after_forward:
        del setup["fsdp2_reshard_after_forward"]
    if cfg.fsdp2_groups == "mst_hf":
        del setup["fsdp2_groups"]
    del setup["hf_trainer_bf16"]  # (how the Trainer calls the model is not mst_hf's: --trainer hf-trainer says it)
    return setup


def check_plan(plan: Any, where: str) -> Dict[str, Any]:
    """A plan object (mst-plan/1, as ``recommend --out`` writes) with its setup."""
    if not isinstance(plan, dict):
        fail(where, "", "expected a JSON object (an mst-plan/1 plan)")
    if plan.get("format") != PLAN_FORMAT:
        fail(where, "format", f'expected "{PLAN_FORMAT}", got {json.dumps(plan.get("format"))}')
    if not isinstance(plan.get("model"), str) or not plan["model"]:
        fail(where, "model", "expected the catalog name or config path the plan was made for")
    if not isinstance(plan.get("setup"), dict):
        fail(where, "setup", "expected the setup object")
    if "prediction" in plan and not isinstance(plan["prediction"], dict):
        fail(where, "prediction", "expected an object")
    return plan


def setup_for_layers(setup: Mapping[str, Any], full_layers: int, layers: int) -> Tuple[Dict[str, Any], List[str]]:
    """A plan's setup for a model cut to ``layers`` layers: checkpointed layers past the cut are
    dropped. Returns the setup and what changed (empty when nothing did)."""
    out = copy.deepcopy(dict(setup))
    notes: List[str] = []
    if layers == full_layers or "checkpoint" not in out:
        return out, notes
    before = checkpoint_layers_from_spec(out["checkpoint"], full_layers)
    if isinstance(out["checkpoint"], str) and out["checkpoint"] in ("all", "none", ""):
        after = checkpoint_layers_from_spec(out["checkpoint"], layers)
    else:
        after = [i for i in before if i < layers]
    out["checkpoint"] = after
    if after != before:
        notes.append(f"checkpoint: {len(before)} of {full_layers} layers planned, {len(after)} of the first "
                     f"{layers} kept")
    return out, notes


def emit_hf_mst_with_binary(binary: Path, plan: Mapping[str, Any],
                            model_config: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """``mst-plan emit --plan PLAN --format hf-mst`` for a plan object: the C++ source of truth.

    With ``model_config`` (a cut config.json) the plan is emitted for that model instead.
    """
    with tempfile.TemporaryDirectory(prefix="mst-crosscheck-") as tmp:
        plan = dict(plan)
        if model_config is not None:
            model_path = Path(tmp) / f"{model_config['_mst']['name']}.json"
            model_path.write_text(json.dumps(model_config), encoding="utf-8")
            plan["model"] = str(model_path)
        plan_path = Path(tmp) / "plan.json"
        plan_path.write_text(json.dumps(plan), encoding="utf-8")
        result = subprocess.run([str(binary), "emit", "--plan", str(plan_path), "--format", "hf-mst"],
                                capture_output=True, text=True, cwd=REPO_ROOT)
    if result.returncode != 0:
        fail(str(binary), "emit", (result.stderr.strip() or f"exit code {result.returncode}"))
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError as e:
        fail(str(binary), "emit", f"printed no JSON ({e.msg})")
    raise AssertionError  # unreachable


# ---- jobs ---------------------------------------------------------------------------------


@dataclass
class Job:
    """One fully resolved run: the model transformers builds and the setup it trains."""

    name: str                      # the run's name (matrix entry) or the model name
    model: str                     # catalog name or file stem of the full model
    model_path: str                # the config mst-plan re-simulates (a cut copy with --layers)
    hf_config: Dict[str, Any]      # what transformers gets (no "_mst")
    layers: int                    # decoder layers built
    full_layers: int               # decoder layers of the model's config
    setup: Dict[str, Any]          # mst-plan setup JSON, recorded verbatim
    mst_config: Dict[str, Any]     # hf-mst/1, what mst_hf applies
    hf_config_source: str          # "mst-plan emit", "python" or "hf-config"
    seed: int = 0
    steps: int = 3
    warmup: int = 1
    lr: float = 1e-5
    loss_check: bool = False
    trainer: str = "loop"          # how the forward is called: mst_referee.step.TRAINERS
    prediction: Optional[Dict[str, Any]] = None
    notes: List[str] = field(default_factory=list)
    derived_config: Optional[Dict[str, Any]] = None  # the cut config.json to write at model_path
    rank: int = 0                  # the data-parallel rank recorded (FSDP2: the last ranks' shards are shorter)


def make_job(model_ref: Optional[str], *, plan: Optional[Mapping[str, Any]] = None, plan_where: str = "plan",
             knobs: Optional[Mapping[str, Any]] = None, seq: Optional[int] = None,
             hf_config_file: Optional[Path] = None, layers: Optional[int] = None,
             derived_dir: Optional[Path] = None, name: Optional[str] = None, convert: str = "auto",
             mst_plan: Path = DEFAULT_MST_PLAN, seed: int = 0, steps: int = 3, warmup: int = 1, lr: float = 1e-5,
             loss_check: bool = False, trainer: str = "loop", rank: int = 0) -> Job:
    """Resolve a model and exactly one of a plan, setup knobs or an hf-mst config into a Job."""
    sources = [x is not None for x in (plan, knobs, hf_config_file)]
    if sum(sources) != 1:
        fail("command line", "", "expected exactly one of --plan, --setup or --hf-config")
    if trainer not in TRAINERS:
        fail("command line", "trainer", f"expected one of {', '.join(TRAINERS)}, got {trainer!r}")
    hf_cfg = None
    if hf_config_file is not None:
        hf_cfg = mst_hf.load_config(hf_config_file)
    if plan is not None:
        check_plan(plan, plan_where)
    if model_ref is None:
        model_ref = plan["model"] if plan is not None else (hf_cfg.model if hf_cfg is not None else None)
        if model_ref is None:
            fail("command line", "model", "expected a catalog name or a config.json path")
    model_name, model_file = resolve_model(model_ref)
    raw = load_model_config(model_file)
    full = raw["num_hidden_layers"]
    if layers is not None and (not _is_int(layers) or not 1 <= layers <= full):
        fail("layers", "", f"expected 1 to {full} (the model's num_hidden_layers), got {layers!r}")
    cut = layers is not None and layers < full
    n_layers = layers if cut else full
    notes: List[str] = []
    derived = None
    model_path = repo_relative(model_file)
    model_for_plan = model_name if model_file == MODELS_DIR / f"{model_name}.json" else str(model_file.resolve())
    if cut:
        derived = reduced_model_config(raw, model_name, model_path, n_layers)
        derived_file = Path(derived_dir or ".") / "configs" / f"{reduced_name(model_name, n_layers)}.json"
        model_path = repo_relative(derived_file)
        model_for_plan = model_path
        notes.append(f"layers: {n_layers} of {full} decoder layers built (model_path is the cut config)")

    prediction = None
    if plan is not None:
        setup, cut_notes = setup_for_layers(plan["setup"], full, n_layers)
        notes += cut_notes
        prediction = copy.deepcopy(plan.get("prediction")) if not cut else None
        if cut and plan.get("prediction"):
            notes.append("prediction: the plan's prediction is for the full model; not carried over")
        if seq is not None and seq != setup.get("seq_len"):
            fail(plan_where, "seq_len", f"the plan is for seq_len {setup.get('seq_len')}, the run asks for {seq}")
    elif knobs is not None:
        merged = dict(knobs)
        if seq is not None:
            merged["seq_len"] = seq
        setup = normalize_setup(merged, n_layers, plan_where)
    else:
        setup = setup_from_hf_mst(hf_cfg)
        if cut:
            setup, cut_notes = setup_for_layers(setup, full, n_layers)
            notes += cut_notes
        if seq is not None and seq != setup["seq_len"]:
            fail(str(hf_config_file), "seq_len", f"the config is for seq_len {setup['seq_len']}, the run asks for {seq}")
    # The Hugging Face Trainer's bf16=True: --trainer hf-trainer and the setup's hf_trainer_bf16 are one choice, which
    # the recorded setup states (mst-plan re-simulates the record's setup; a plan's prediction was for its own)
    trainer_added = trainer == "hf-trainer" and not setup.get("hf_trainer_bf16")
    if trainer_added:
        setup = dict(setup, hf_trainer_bf16=True)
        if prediction is not None or (hf_cfg is not None and hf_cfg.predicted.peak_allocated_bytes):
            prediction = None
            notes.append("prediction: the plan's prediction is for its own forward, not the Trainer's; not carried over")
    trainer = "hf-trainer" if setup.get("hf_trainer_bf16") else trainer
    if trainer == "hf-trainer" and raw.get("model_type") in ("qwen3_moe", "gpt_oss") and setup.get("precision") != "amp":
        fail(plan_where, "hf_trainer_bf16", f"expected false for a {raw['model_type']} model with bf16 parameters (under the "
                                            f"Trainer's bf16 autocast, CUDA runs the experts' combine, a sum, in fp32: a CPU "
                                            f"step cannot stand for it), got true")
    if trainer == "hf-trainer":
        notes.append("trainer: the Hugging Face Trainer with bf16=True (accelerate's bf16 autocast around the forward "
                     "and the fp32 copy of its outputs)")
    check_runnable(setup, plan_where)
    if not (_is_int(rank) and 0 <= rank < (setup.get("dp", 1) if setup.get("fsdp2") else 1)):
        fail(plan_where, "rank", f"expected 0{' .. ' + str(setup['dp'] - 1) if setup.get('fsdp2') else ''} (the recorded "
                                 f"rank: one of FSDP2's dp ranks, else the only one), got {rank}")
    normalized = normalize_setup({k: v for k, v in setup.items() if k in SETUP_KEYS}, n_layers, plan_where)

    if hf_cfg is not None and not cut:
        mst_config, source = hf_cfg.to_dict(), "hf-config"
        if hf_cfg.predicted.peak_allocated_bytes and not trainer_added:
            prediction = dataclasses.asdict(hf_cfg.predicted)
    elif plan is not None and convert != "python" and (convert == "binary" or Path(mst_plan).is_file()):
        if not Path(mst_plan).is_file():
            fail(str(mst_plan), "", "no mst-plan binary there (build it, pass --mst-plan, or use --convert python)")
        emitted_plan = dict(plan, setup=setup, model=model_for_plan)
        if prediction is None:  # (not carried over: a cut model's run, or the Trainer's forward added)
            emitted_plan.pop("prediction", None)
        mst_config, source = emit_hf_mst_with_binary(Path(mst_plan), emitted_plan, derived), "mst-plan emit"
        mst_config["model"] = model_for_plan
    else:
        mst_config = hf_mst_config(model_for_plan, normalized, n_layers, prediction)
        source = "python" if hf_cfg is None else "hf-config"
    mst_hf.load_config(mst_config)  # validates: a bad config fails here, before torch

    return Job(name=name or (reduced_name(model_name, n_layers) if cut else model_name), model=model_name,
               model_path=model_path, hf_config=hf_config_dict(raw, n_layers if cut else None), layers=n_layers,
               full_layers=full, setup=setup, mst_config=mst_config, hf_config_source=source, seed=seed,
               steps=steps, warmup=warmup, lr=lr, loss_check=loss_check, trainer=trainer, prediction=prediction, notes=notes,
               derived_config=derived, rank=rank)


# ---- the matrix file ----------------------------------------------------------------------

MATRIX_ENTRY_KEYS = ("name", "model", "seq", "layers", "setup", "plan", "steps", "warmup", "seed", "lr",
                     "loss_check", "rank", "why")
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def load_matrix(path: Path, derived_dir: Optional[Path] = None, convert: str = "python",
                mst_plan: Path = DEFAULT_MST_PLAN) -> List[Job]:
    """The runs of a matrix file, every one resolved (model found, setup valid) before any runs.

    {"format": "mst-torch-matrix/1", "defaults": {"steps", "warmup", "seed", "lr", "setup": {...}},
     "runs": [{"name", "model", "seq", "layers", "setup": {...knobs} | "plan": PATH or {...}, ...}]}
    A run's setup is the defaults' setup updated with its own; a plan is used as it is.
    """
    path = Path(path)
    data = read_json(path, "the matrix")
    where = str(path)
    if isinstance(data, list):
        data = {"format": MATRIX_FORMAT, "runs": data}
    if not isinstance(data, dict):
        fail(where, "", "expected a JSON object with a \"runs\" list")
    if data.get("format") != MATRIX_FORMAT:
        fail(where, "format", f'expected "{MATRIX_FORMAT}", got {json.dumps(data.get("format"))}')
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        fail(where, "defaults", "expected an object")
    runs = data.get("runs")
    if not isinstance(runs, list) or not runs:
        fail(where, "runs", "expected a non-empty list of runs")
    jobs: List[Job] = []
    seen = set()
    for i, entry in enumerate(runs):
        at = f"{where}: runs[{i}]"
        if not isinstance(entry, dict):
            fail(at, "", "expected an object")
        unknown = sorted(set(entry) - set(MATRIX_ENTRY_KEYS))
        if unknown:
            fail(at, unknown[0], f"unknown key (expected {', '.join(MATRIX_ENTRY_KEYS)})")
        name = entry.get("name")
        if not isinstance(name, str) or not RUN_NAME.match(name):
            fail(at, "name", f"expected a file-name-safe name (letters, digits, . _ -), got {json.dumps(name)}")
        if name in seen:
            fail(at, "name", f"'{name}' appears twice")
        seen.add(name)
        at = f"{where}: {name}"

        def value(key: str, default: Any) -> Any:
            return entry.get(key, defaults.get(key, default))

        steps, warmup, seed = value("steps", 3), value("warmup", 1), value("seed", 0)
        for key, v, low in (("steps", steps, 1), ("warmup", warmup, 0), ("seed", seed, 0)):
            if not _is_int(v) or v < low:
                fail(at, key, f"expected an integer of at least {low}, got {json.dumps(v)}")
        lr = value("lr", 1e-5)
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            fail(at, "lr", f"expected a positive number, got {json.dumps(lr)}")
        loss_check = value("loss_check", False)
        if not isinstance(loss_check, bool):
            fail(at, "loss_check", "expected true or false")
        layers = entry.get("layers")
        seq = entry.get("seq")
        if seq is not None and (not _is_int(seq) or seq < 1):
            fail(at, "seq", f"expected a positive integer, got {json.dumps(seq)}")
        if ("setup" in entry) == ("plan" in entry):
            fail(at, "", "expected exactly one of \"setup\" (knobs) or \"plan\" (a path or an mst-plan/1 object)")
        plan = knobs = None
        plan_where = at
        if "plan" in entry:
            plan = entry["plan"]
            if isinstance(plan, str):
                plan_file = (path.parent / plan) if not Path(plan).is_absolute() else Path(plan)
                if not plan_file.is_file():
                    plan_file = REPO_ROOT / plan
                plan_where = str(plan_file)
                plan = read_json(plan_file, "the plan")
        else:
            if seq is None:
                fail(at, "seq", "missing (required with \"setup\")")
            if not isinstance(entry["setup"], dict):
                fail(at, "setup", "expected an object of setup knobs")
            knobs = dict(defaults.get("setup", {}))
            knobs.update(entry["setup"])
            plan_where = f"{at}: setup"
        model_ref = entry.get("model")
        if model_ref is None and plan is None:
            fail(at, "model", "missing (required with \"setup\")")
        jobs.append(make_job(model_ref, plan=plan, plan_where=plan_where, knobs=knobs, seq=seq, layers=layers,
                             derived_dir=derived_dir, name=name, convert=convert, mst_plan=mst_plan, seed=seed,
                             steps=steps, warmup=warmup, lr=float(lr), loss_check=loss_check, rank=value("rank", 0)))
    return jobs


