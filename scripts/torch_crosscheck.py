#!/usr/bin/env python3
"""Cross-check mst-plan against a real PyTorch + Hugging Face training step.

Validation rung 4 of DESIGN.md: build the model of a config.json with random weights,
apply an mst-plan setup to it through python/mst_hf (``apply`` + ``make_optimizer``),
train a few steps on random tokens and record what torch measured: the peaks of
``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` over steady-state steps
(the peak statistics are reset after a warm-up step, in which the optimizer creates
its states), the step time, tokens/s and every step's loss. The result is an
``mst-measure/1`` file with a null timeline, which ``mst-plan compare`` reads by its
summary peaks.

One run (the setup from a plan, an hf-mst config or a knobs file)::

    scripts/torch_crosscheck.py llama-3-8b --plan plan.json --out run.json
    scripts/torch_crosscheck.py llama-3-8b --hf-config mst_config.json --out run.json
    scripts/torch_crosscheck.py llama-3-8b --setup knobs.json --seq 16384 --layers 8 --out run.json

A matrix of runs in one process, one JSON per run, continuing past out-of-memory::

    scripts/torch_crosscheck.py --matrix scripts/torch_matrix.json --out-dir results/h100-sxm-80gb/torch

Everything up to building the model is pure Python (the tests run it without torch);
torch and transformers are imported only to run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import fnmatch
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "models"
DEFAULT_MST_PLAN = REPO_ROOT / "build" / "src" / "mst-plan"
sys.path.insert(0, str(REPO_ROOT / "python"))

import mst_hf  # noqa: E402  (pure Python until apply/make_optimizer are used)

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
STATE_DTYPES = ("fp32", "bf16")
ATTENTIONS = ("flash", "eager")
MLP_IMPLS = ("loop", "tiled")
LM_IMPLS = ("recompute", "fused")

# Keys of mst-plan's setup JSON (src/core/setup.cpp parse_setup), with their defaults.
SETUP_DEFAULTS: Dict[str, Any] = {
    "micro_batch": 1, "seq_len": 4096, "grad_accum": 1, "padded": False,
    "precision": "pure-bf16", "optimizer": "adamw", "optimizer_in_backward": False,
    "attention": "flash", "mlp_chunks": 1, "mlp_impl": "loop", "lm_chunks": 1, "lm_impl": "recompute",
    "offload_checkpoints": False, "dp": 1, "zero_stage": 0, "zero3_prefetch": 1, "sp": 1,
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


def load_model_config(path: Path) -> Dict[str, Any]:
    """The config.json as written, its "_mst" block included."""
    data = read_json(path, "the model config")
    if not isinstance(data, dict):
        fail(str(path), "", "expected a JSON object (a Hugging Face config.json)")
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
    s.update({k: v for k, v in knobs.items() if k in SETUP_DEFAULTS})

    def integer(key: str, low: int, high: int) -> int:
        v = s[key]
        if not _is_int(v) or not low <= v <= high:
            fail(where, key, f"expected an integer from {low} to {high}, got {json.dumps(v)}")
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
    integer("zero_stage", 0, 3)
    integer("zero3_prefetch", 0, 8)
    for key in ("padded", "optimizer_in_backward", "offload_checkpoints"):
        boolean(key)
    choice("precision", PRECISIONS)
    choice("optimizer", OPTIMIZERS)
    choice("attention", ATTENTIONS)
    choice("mlp_impl", MLP_IMPLS)
    choice("lm_impl", LM_IMPLS)
    state = knobs.get("optimizer_state_dtype")
    if state is None:
        state = "bf16" if s["precision"] == "pure-bf16" else "fp32"
    elif state not in STATE_DTYPES:
        fail(where, "optimizer_state_dtype", f"expected one of {', '.join(STATE_DTYPES)}, got {json.dumps(state)}")
    s["optimizer_state_dtype"] = state

    if s["seq_len"] % s["sp"] != 0:
        fail(where, "sp", f"expected a divisor of seq_len ({s['seq_len']}), got {s['sp']}")
    tokens = max(1, s["micro_batch"] * s["seq_len"] // s["sp"])
    for count_key, tokens_key in (("mlp_chunks", "mlp_chunk_tokens"), ("lm_chunks", "lm_chunk_tokens")):
        if count_key in knobs and tokens_key in knobs:
            fail(where, tokens_key, f"give either {count_key} or {tokens_key}, not both")
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
        fail(where, "optimizer_in_backward", "cannot step inside backward with grad_accum > 1")
    if s["optimizer_in_backward"] and s["zero_stage"] >= 2:
        fail(where, "optimizer_in_backward", "not supported with ZeRO stage 2/3")
    order = ("micro_batch", "seq_len", "grad_accum", "padded", "precision", "optimizer", "optimizer_state_dtype",
             "optimizer_in_backward", "attention", "mlp_chunks", "mlp_impl", "lm_chunks", "lm_impl", "checkpoint",
             "offload_checkpoints", "dp", "zero_stage", "zero3_prefetch", "sp")
    return {k: s[k] for k in order}


def check_runnable(setup: Mapping[str, Any], where: str = "setup") -> None:
    """The cross-check is one process on one GPU with plain PyTorch (no DP, ZeRO or Ulysses),
    training packed random tokens (no padding)."""
    for key, expected in (("dp", 1), ("sp", 1), ("zero_stage", 0)):
        if setup.get(key, expected) != expected:
            fail(where, key, f"expected {expected}: the cross-check runs plain PyTorch on one GPU, "
                             f"got {json.dumps(setup.get(key))}")
    if setup.get("padded", False):
        fail(where, "padded", "expected false: the cross-check trains packed random tokens, without padding")


def hf_mst_config(model: str, setup: Mapping[str, Any], num_layers: int,
                  prediction: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The hf-mst/1 config of a setup: what ``mst-plan emit --format hf-mst`` writes
    (src/core/emit/hf_mst.cpp), field for field, for runs without the binary."""
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
                      "in_backward": s["optimizer_in_backward"]},
        "data_parallel": s["dp"],
        "sequence_parallel": s["sp"],
        "zero_stage": s["zero_stage"],
        "predicted": {"peak_allocated_bytes": int(p.get("peak_allocated_bytes", 0)),
                      "peak_reserved_bytes": int(p.get("peak_reserved_bytes", 0)),
                      "tokens_per_second": p.get("tokens_per_second", 0)},
    }


def setup_from_hf_mst(cfg: "mst_hf.MstConfig") -> Dict[str, Any]:
    """mst-plan's setup JSON for an hf-mst config (the fields hf-mst lacks take their defaults)."""
    setup = dict(SETUP_DEFAULTS)
    setup.update({
        "micro_batch": cfg.micro_batch, "seq_len": cfg.seq_len, "grad_accum": cfg.grad_accum,
        "precision": cfg.precision, "optimizer": cfg.optimizer.name,
        "optimizer_state_dtype": cfg.optimizer.state_dtype, "optimizer_in_backward": cfg.optimizer.in_backward,
        "attention": cfg.attention, "mlp_chunks": cfg.mlp.chunks, "mlp_impl": cfg.mlp.impl,
        "lm_chunks": cfg.lm_head.chunks, "lm_impl": cfg.lm_head.impl,
        "checkpoint": list(cfg.checkpoint_layers), "offload_checkpoints": cfg.offload_checkpoints,
        "dp": cfg.data_parallel, "zero_stage": cfg.zero_stage, "sp": cfg.sequence_parallel,
    })
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
    prediction: Optional[Dict[str, Any]] = None
    notes: List[str] = field(default_factory=list)
    derived_config: Optional[Dict[str, Any]] = None  # the cut config.json to write at model_path


def make_job(model_ref: Optional[str], *, plan: Optional[Mapping[str, Any]] = None, plan_where: str = "plan",
             knobs: Optional[Mapping[str, Any]] = None, seq: Optional[int] = None,
             hf_config_file: Optional[Path] = None, layers: Optional[int] = None,
             derived_dir: Optional[Path] = None, name: Optional[str] = None, convert: str = "auto",
             mst_plan: Path = DEFAULT_MST_PLAN, seed: int = 0, steps: int = 3, warmup: int = 1, lr: float = 1e-5,
             loss_check: bool = False) -> Job:
    """Resolve a model and exactly one of a plan, setup knobs or an hf-mst config into a Job."""
    sources = [x is not None for x in (plan, knobs, hf_config_file)]
    if sum(sources) != 1:
        fail("command line", "", "expected exactly one of --plan, --setup or --hf-config")
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
    check_runnable(setup, plan_where)
    normalized = normalize_setup({k: v for k, v in setup.items() if k in SETUP_KEYS}, n_layers, plan_where)

    if hf_cfg is not None and not cut:
        mst_config, source = hf_cfg.to_dict(), "hf-config"
        if hf_cfg.predicted.peak_allocated_bytes:
            prediction = dataclasses.asdict(hf_cfg.predicted)
    elif plan is not None and convert != "python" and (convert == "binary" or Path(mst_plan).is_file()):
        if not Path(mst_plan).is_file():
            fail(str(mst_plan), "", "no mst-plan binary there (build it, pass --mst-plan, or use --convert python)")
        emitted_plan = dict(plan, setup=setup, model=model_for_plan)
        if cut:
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
               steps=steps, warmup=warmup, lr=lr, loss_check=loss_check, prediction=prediction, notes=notes,
               derived_config=derived)


# ---- the matrix file ----------------------------------------------------------------------

MATRIX_ENTRY_KEYS = ("name", "model", "seq", "layers", "setup", "plan", "steps", "warmup", "seed", "lr",
                     "loss_check", "why")
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
                             steps=steps, warmup=warmup, lr=float(lr), loss_check=loss_check))
    return jobs


# ---- the result ---------------------------------------------------------------------------

SUMMARY_REQUIRED = {
    "peak_allocated_bytes": (int, type(None)), "peak_reserved_bytes": (int, type(None)),
    "step_seconds": (float, int), "tokens_per_second": (float, int), "losses": (list,), "layers": (int,),
    "device": (str,), "torch": (str,), "transformers": (str,), "attn_implementation": (str,),
}


def measurement(job: Job, summary: Optional[Dict[str, Any]], error: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The mst-measure/1 record of a run: what mst-plan reads, with a null timeline."""
    out: Dict[str, Any] = {
        "format": MEASURE_FORMAT,
        "backend": "torch",
        "model": job.model,
        "model_path": job.model_path,
        "seed": job.seed,
        "workspace_bytes": 0,
        "setup": job.setup,
        "timeline": None,
        "summary": summary,
        "run": job.name,
        "hf_mst": job.mst_config,
        "hf_config_source": job.hf_config_source,
        "notes": list(job.notes),
    }
    if job.prediction:
        out["prediction"] = job.prediction
    if error is not None:
        out["error"] = error.pop("kind")
        out["error_detail"] = error
    return out


def validate_measurement(obj: Any) -> None:
    """Raise ValueError unless ``obj`` is an mst-measure/1 record as this script writes it."""
    def bad(what: str) -> None:
        raise ValueError(f"measurement: {what}")

    if not isinstance(obj, dict):
        bad("expected a JSON object")
    if obj.get("format") != MEASURE_FORMAT:
        bad(f'format: expected "{MEASURE_FORMAT}"')
    if obj.get("backend") != "torch":
        bad('backend: expected "torch"')
    for key in ("model", "model_path"):
        if not isinstance(obj.get(key), str) or not obj[key]:
            bad(f"{key}: expected a non-empty string")
    for key in ("seed", "workspace_bytes"):
        if not _is_int(obj.get(key)) or obj[key] < 0:
            bad(f"{key}: expected a non-negative integer")
    if not isinstance(obj.get("setup"), dict) or "seq_len" not in obj["setup"]:
        bad("setup: expected the setup object")
    if "timeline" not in obj or obj["timeline"] is not None:
        bad("timeline: expected null (torch records peaks only)")
    summary = obj.get("summary")
    if "error" in obj:
        if summary is not None:
            bad("summary: expected null in a run that failed")
        if not isinstance(obj["error"], str) or not isinstance(obj.get("error_detail"), dict):
            bad("error: expected a kind and an error_detail object")
        return
    if not isinstance(summary, dict):
        bad("summary: expected an object")
    for key, types in SUMMARY_REQUIRED.items():
        if key not in summary or isinstance(summary[key], bool) or not isinstance(summary[key], types):
            bad(f"summary.{key}: expected {' or '.join(t.__name__ for t in types)}")
    on_cpu = summary["device"] == "cpu"
    for key in ("peak_allocated_bytes", "peak_reserved_bytes"):
        v = summary[key]
        if (v is None) != on_cpu or (v is not None and v < 0):
            bad(f"summary.{key}: expected bytes on a GPU, null on the CPU")
    if not summary["losses"] or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in summary["losses"]):
        bad("summary.losses: expected a non-empty list of finite numbers")
    if "losses_unpatched" in summary:
        unpatched = summary["losses_unpatched"]
        if unpatched is not None and (not isinstance(unpatched, list) or len(unpatched) != len(summary["losses"])):
            bad("summary.losses_unpatched: expected one loss per step, or null")
        for key in ("loss_max_rel_diff", "loss_rtol", "loss_check_passed"):
            if key not in summary:
                bad(f"summary.{key}: expected with losses_unpatched")


def loss_agreement(patched: Sequence[float], unpatched: Sequence[float]) -> float:
    """The largest |a - b| / |b| over the steps."""
    return max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(patched, unpatched))


# ---- torch --------------------------------------------------------------------------------


def import_torch() -> Tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as e:
        raise SystemExit(f"torch_crosscheck: running needs torch and transformers: {e}") from None
    return torch, transformers


def pick_attn_implementation(planned: str, device_type: str) -> Tuple[str, Optional[str]]:
    """transformers' attn_implementation for the plan's attention, and a note when it is a fallback.

    "flash" is FlashAttention-2 where the flash_attn package works (CUDA), else PyTorch's SDPA
    (whose flash / memory-efficient kernels also keep O(S) memory); "eager" is eager.
    """
    if planned == "eager":
        return "eager", None
    torch, transformers = import_torch()
    if device_type == "cuda":
        try:
            from transformers.utils import is_flash_attn_2_available
            if is_flash_attn_2_available():
                return "flash_attention_2", None
        except ImportError:
            pass
    if hasattr(torch.nn.functional, "scaled_dot_product_attention"):
        return "sdpa", "attention: flash_attn is not installed here, so FlashAttention-2 runs as PyTorch SDPA"
    return "eager", "attention: this torch has neither flash_attn nor SDPA; eager attention holds S x S scores"


def _version_tuple(text: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:2])


def build_model(job: Job, attn: str, device: str) -> Any:
    """The causal LM of job.hf_config with random weights (seeded), in the precision's dtype, on device."""
    torch, transformers = import_torch()
    dtype = torch.float32 if job.mst_config["precision"] == "amp" else torch.bfloat16
    cfg = dict(job.hf_config)
    cfg.pop("torch_dtype", None)  # the dtype is the plan's precision, passed below (and renamed in 4.56)
    cfg.pop("dtype", None)
    model_type = cfg.pop("model_type")
    for_model = getattr(transformers.AutoConfig, "for_model", None)
    if for_model is not None:
        config = for_model(model_type, **cfg)
    else:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        config = CONFIG_MAPPING[model_type](**cfg)
    # transformers 4.56 renamed from_config's torch_dtype to dtype.
    dtype_kw = "dtype" if _version_tuple(transformers.__version__) >= (4, 56) else "torch_dtype"
    torch.manual_seed(job.seed)
    # Build on the device (torch >= 2.0): 8B random weights initialised on the host take minutes.
    where = torch.device(device) if device != "cpu" and hasattr(torch.device, "__enter__") else contextlib.nullcontext()
    with where:
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn, **{dtype_kw: dtype})
    model = model.to(device=device)
    if any(p.dtype != dtype for p in model.parameters() if p.is_floating_point()):
        model = model.to(dtype)
    if hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
    return model.train()


def weights_fingerprint(model: Any) -> float:
    """A cheap checksum of the initial weights (the first 4096 values of every parameter)."""
    torch, _ = import_torch()
    with torch.no_grad():
        return float(sum(p.detach().reshape(-1)[:4096].double().sum().item() for p in model.parameters()))


def make_batches(job: Job, vocab: int, device: str) -> List[Any]:
    """Random token ids [micro_batch, seq_len] for every micro-step of every step, seeded."""
    torch, _ = import_torch()
    g = torch.Generator().manual_seed(job.seed + 1)
    cfg = job.mst_config
    count = (job.warmup + job.steps) * cfg["grad_accum"]
    return [torch.randint(0, vocab, (cfg["micro_batch"], cfg["seq_len"]), generator=g).to(device)
            for _ in range(count)]


class _StepClock:
    """Seconds of one step: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, torch: Any, device: str) -> None:
        self.torch, self.cuda = torch, device != "cpu"

    def __enter__(self) -> "_StepClock":
        if self.cuda:
            self.start = self.torch.cuda.Event(enable_timing=True)
            self.end = self.torch.cuda.Event(enable_timing=True)
            self.torch.cuda.synchronize()
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self.end.record()
            self.torch.cuda.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000.0
        else:
            self.seconds = time.perf_counter() - self.t0


class _Progress:
    """Where a run is, so an out-of-memory error can say in which step it happened."""

    def __init__(self) -> None:
        self.stage = "building the model"


def train(job: Job, patched: bool, device: str, progress: _Progress) -> Dict[str, Any]:
    """Build, (patch,) train warmup + steps optimizer steps; return losses, times and peaks."""
    torch, transformers = import_torch()
    cuda = device != "cpu"
    cfg = mst_hf.load_config(job.mst_config)
    attn, attn_note = pick_attn_implementation(cfg.attention, "cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    at_start = torch.cuda.memory_allocated() if cuda else None
    model = build_model(job, attn, device)
    fingerprint = weights_fingerprint(model)
    if patched:
        mst_hf.apply(model, cfg)
    optimizer = mst_hf.make_optimizer(model, cfg, lr=job.lr)
    batches = make_batches(job, job.hf_config["vocab_size"], device)
    device_type = "cuda" if cuda else "cpu"
    losses: List[float] = []
    seconds: List[float] = []
    persistent = retries = None
    for step in range(job.warmup + job.steps):
        measured = step >= job.warmup
        progress.stage = f"{'measured' if measured else 'warm-up'} step {step}"
        if measured and step == job.warmup and cuda:
            # Steady state: weights, optimizer states (and fp32 masters) exist; no gradients.
            # Segments cached during the warm-up step are released so that reserved memory
            # reflects the steady-state steps only, as the simulator's allocator replay does.
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
            persistent = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            retries = torch.cuda.memory_stats().get("num_alloc_retries", 0)
        with _StepClock(torch, device) as clock:
            total = None
            for micro in range(cfg.grad_accum):
                ids = batches[step * cfg.grad_accum + micro]
                with mst_hf.autocast(cfg, device_type=device_type):
                    # Only the loss outlives the forward (as in Trainer.compute_loss): an unpatched
                    # model's logits are freed before backward.
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                (loss / cfg.grad_accum if cfg.grad_accum > 1 else loss).backward()
                total = loss.detach().float() if total is None else total + loss.detach().float()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(float(total.item()) / cfg.grad_accum)
        if measured:
            seconds.append(clock.seconds)
    progress.stage = "done"
    result: Dict[str, Any] = {
        "losses": losses, "step_seconds_each": seconds, "attn_implementation": attn,
        "attn_note": attn_note, "fingerprint": fingerprint,
        "model_attn_implementation": getattr(model.config, "_attn_implementation", attn),
        "allocated_at_start_bytes": at_start,
    }
    if cuda:
        torch.cuda.synchronize()
        stats = torch.cuda.memory_stats()
        result.update(peak_allocated_bytes=int(torch.cuda.max_memory_allocated()),
                      peak_reserved_bytes=int(torch.cuda.max_memory_reserved()),
                      persistent_allocated_bytes=persistent,
                      alloc_retries=int(stats.get("num_alloc_retries", 0)) - (retries or 0))
    else:
        result.update(peak_allocated_bytes=None, peak_reserved_bytes=None, persistent_allocated_bytes=None,
                      alloc_retries=None)
    return result


def is_oom(torch: Any, e: BaseException) -> bool:
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom_type is not None and isinstance(e, oom_type)) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def release_memory(torch: Any, device: str) -> None:
    """Free what a finished (or failed) run left: Python cycles first (optimizer hooks), then the cache."""
    gc.collect()
    if device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def guarded_train(job: Job, patched: bool, device: str) -> Tuple[Optional[Dict[str, Any]], Optional[Dict[str, Any]]]:
    """(result, None), or (None, error) after an out-of-memory error; other errors propagate.

    The model and optimizer live only in train()'s frame, so they are freed once the
    exception (whose traceback holds that frame) is dropped at the end of the except block.
    """
    torch, _ = import_torch()
    progress = _Progress()
    error = None
    try:
        return train(job, patched, device, progress), None
    except Exception as e:  # noqa: BLE001 (only OOM is handled; the rest re-raised)
        if not is_oom(torch, e):
            raise
        error = {"kind": "oom", "message": str(e).strip().splitlines()[0][:500], "during": progress.stage,
                 "patched": patched}
        if device != "cpu":
            error["peak_allocated_bytes_before_error"] = int(torch.cuda.max_memory_allocated())
            error["peak_reserved_bytes_before_error"] = int(torch.cuda.max_memory_reserved())
    finally:
        release_memory(torch, device)
    return None, error


def unpatched_job(job: Job) -> Job:
    """The loss check's twin as a job of its own: the setup that an unpatched model trains
    (no mini-sequences, no checkpointing), so its peaks are a measurement too."""
    setup = dict(job.setup, mlp_chunks=1, lm_chunks=1, checkpoint=[], offload_checkpoints=False)
    return dataclasses.replace(
        job, name=f"{job.name}.unpatched", setup=setup, loss_check=False, prediction=None,
        mst_config=hf_mst_config(job.mst_config["model"], setup, job.layers), hf_config_source="python",
        notes=list(job.notes) + [f"the unpatched twin of {job.name} (loss check): mst_hf.apply not called"])


def summarize(job: Job, result: Mapping[str, Any], device: str) -> Dict[str, Any]:
    """The summary of a finished run (the fields mst-plan reads first, then the details)."""
    torch, transformers = import_torch()
    seconds = result["step_seconds_each"]
    step_seconds = sum(seconds) / len(seconds)
    cfg = job.mst_config
    tokens = cfg["micro_batch"] * cfg["seq_len"] * cfg["grad_accum"]
    return {
        "peak_allocated_bytes": result["peak_allocated_bytes"],
        "peak_reserved_bytes": result["peak_reserved_bytes"],
        "step_seconds": step_seconds,
        "tokens_per_second": tokens / step_seconds if step_seconds > 0 else 0.0,
        "losses": result["losses"],
        "layers": job.layers,
        "device": torch.cuda.get_device_name() if device != "cpu" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attn_implementation": result["model_attn_implementation"],
        "dtype": "float32" if cfg["precision"] == "amp" else "bfloat16",
        "warmup_steps": job.warmup,
        "measured_steps": job.steps,
        "peaks_after": (f"peak statistics reset after {job.warmup} warm-up step(s) and torch.cuda.empty_cache(): "
                        f"max over the {job.steps} steady-state step(s)" if device != "cpu" else
                        "no peaks: the CPU has no caching-allocator statistics")
                       + f"; times over the {job.steps} step(s) after the warm-up; losses of every step, warm-up first",
        "step_seconds_each": seconds,
        "tokens_per_step": tokens,
        "persistent_allocated_bytes": result["persistent_allocated_bytes"],
        "allocated_at_start_bytes": result["allocated_at_start_bytes"],
        "alloc_retries": result["alloc_retries"],
        "lr": job.lr,
        "full_layers": job.full_layers,
        "pytorch_cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "python": platform.python_version(),
    }


def run_job(job: Job, device: str) -> Tuple[List[Dict[str, Any]], bool]:
    """Run one job; with loss_check also its unpatched twin. Returns (records, ok).

    records[0] is the job's measurement; with loss_check, records[1] is the twin's
    (its setup: no mini-sequences, no checkpointing). ok is False only for a loss-check
    disagreement: an out-of-memory run is a result, not a failure.
    """
    if job.derived_config is not None:
        write_json(REPO_ROOT / job.model_path if not Path(job.model_path).is_absolute() else Path(job.model_path),
                   job.derived_config)
    result, error = guarded_train(job, True, device)
    if error is not None:
        return [measurement(job, None, error)], True
    if result["attn_note"]:
        job.notes.append(result["attn_note"])
    summary = summarize(job, result, device)
    if not job.loss_check:
        return [measurement(job, summary)], True

    twin_job = unpatched_job(job)
    twin, twin_error = guarded_train(job, False, device)
    summary["loss_rtol"] = LOSS_RTOL
    if twin_error is not None:
        summary.update(losses_unpatched=None, loss_max_rel_diff=None, loss_check_passed=None,
                       loss_check_error=dict(twin_error))
        return [measurement(job, summary), measurement(twin_job, None, twin_error)], True
    diff = loss_agreement(result["losses"], twin["losses"])
    same_init = twin["fingerprint"] == result["fingerprint"]
    passed = same_init and diff <= LOSS_RTOL
    summary.update(losses_unpatched=twin["losses"], loss_max_rel_diff=diff, loss_check_passed=passed)
    if not same_init:
        summary["loss_check_error"] = {"kind": "different initial weights",
                                       "fingerprints": [result["fingerprint"], twin["fingerprint"]]}
    return [measurement(job, summary), measurement(twin_job, summarize(twin_job, twin, device))], passed


def record_path(out: Path, record: Mapping[str, Any], main_name: str) -> Path:
    """Where a record goes: ``out`` for the job's own, ``<stem>.unpatched.json`` beside it for the twin."""
    if record["run"] == main_name:
        return out
    return out.with_name(f"{out.stem}{record['run'][len(main_name):]}{out.suffix}")


def describe(record: Mapping[str, Any]) -> str:
    """One line per run for the console."""
    name = record.get("run", record["model"])
    if "error" in record:
        d = record["error_detail"]
        return f"{name}: {record['error']} during {d.get('during', '?')}: {d.get('message', '')[:120]}"
    s = record["summary"]
    gib = 1024 ** 3
    mem = ("peak allocated {:.2f} GiB, reserved {:.2f} GiB".format(s["peak_allocated_bytes"] / gib,
                                                                    s["peak_reserved_bytes"] / gib)
           if s["peak_allocated_bytes"] is not None else "no CUDA memory stats (CPU)")
    pred = record.get("prediction") or {}
    if pred.get("peak_allocated_bytes") and s["peak_allocated_bytes"] is not None:
        mem += f" (measured/predicted allocated {s['peak_allocated_bytes'] / pred['peak_allocated_bytes']:.3f})"
    line = (f"{name}: {mem}; {s['step_seconds']:.3f} s/step, {s['tokens_per_second']:.0f} tokens/s; "
            f"losses {', '.join(f'{x:.4f}' for x in s['losses'])}")
    if "loss_check_passed" in s:
        line += f"; loss check {'passed' if s['loss_check_passed'] else 'FAILED'}"
        if s.get("loss_max_rel_diff") is not None:
            line += f" (max rel diff {s['loss_max_rel_diff']:.2e} <= {s['loss_rtol']:.2e}?)"
    return line


# ---- command line -------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="torch_crosscheck.py",
        description="Measure a PyTorch + transformers training step under an mst-plan setup "
                    "(random weights, random tokens) and write an mst-measure/1 file.")
    p.add_argument("model", nargs="?", help="catalog name (models/NAME.json) or config.json path; "
                                            "default: the plan's or hf-mst config's model")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--plan", type=Path, help="mst-plan/1 plan (recommend --out PLAN.json)")
    src.add_argument("--hf-config", type=Path, help="hf-mst/1 config (emit --format hf-mst)")
    src.add_argument("--setup", type=Path, help="setup knobs JSON (the keys of mst-plan's --setup)")
    src.add_argument("--matrix", type=Path, help="matrix file: many runs in one process (needs --out-dir)")
    p.add_argument("--seq", type=int, help="sequence length (with --setup; must match a plan)")
    p.add_argument("--layers", type=int, help="build only the first N decoder layers (recorded)")
    p.add_argument("--steps", type=int, default=3, help="measured steps after the warm-up (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps before the peaks are reset (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokens (default 0)")
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate (default 1e-5)")
    p.add_argument("--loss-check", action="store_true",
                   help="also train the unpatched model (same seed) and compare the losses")
    p.add_argument("--mst-plan", type=Path, default=DEFAULT_MST_PLAN,
                   help="mst-plan binary that converts a plan (default build/src/mst-plan)")
    p.add_argument("--convert", choices=("auto", "binary", "python"), default="auto",
                   help="plan -> hf-mst conversion: the binary when it exists (auto), or the Python mirror")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--out", type=Path, help="result file (one run)")
    p.add_argument("--out-dir", type=Path, help="result folder (matrix): one NAME.json per run")
    p.add_argument("--only", action="append", default=[], metavar="PATTERN",
                   help="matrix: run only the names matching this glob (repeatable)")
    p.add_argument("--skip-existing", action="store_true",
                   help="matrix: skip runs whose result file already holds a finished run")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="matrix: start no run after this many seconds (the rest are listed as not run)")
    p.add_argument("--list", action="store_true", help="matrix: list the resolved runs and exit")
    args = p.parse_args(argv)
    if args.matrix is not None:
        if args.out_dir is None and not args.list:
            p.error("--matrix needs --out-dir")
        if args.out is not None or args.model is not None or args.layers is not None or args.seq is not None:
            p.error("--matrix takes its models, sequence lengths and layers from the file")
    else:
        if args.plan is None and args.hf_config is None and args.setup is None:
            p.error("expected --plan, --hf-config, --setup or --matrix")
        if args.out is None:
            p.error("expected --out FILE for the result")
        if args.setup is not None and args.seq is None:
            p.error("--setup needs --seq")
        if args.only or args.skip_existing or args.max_seconds is not None or args.list:
            p.error("--only, --skip-existing, --max-seconds and --list are for --matrix")
    for name in ("steps", "layers"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name} must be at least 1")
    if args.warmup < 0 or args.seed < 0:
        p.error("--warmup and --seed must be non-negative")
    return args


def _device(requested: Optional[str]) -> str:
    torch, _ = import_torch()
    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise CrosscheckError(f"--device {requested}: this torch sees no CUDA device")
    return requested


def _finished(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("format") == MEASURE_FORMAT and data.get("error") in (None, "oom")


def run_matrix(args: argparse.Namespace) -> int:
    jobs = load_matrix(args.matrix, derived_dir=args.out_dir or Path("."), convert=args.convert,
                       mst_plan=args.mst_plan)
    if args.only:
        jobs = [j for j in jobs if any(fnmatch.fnmatch(j.name, pat) for pat in args.only)]
        if not jobs:
            raise CrosscheckError(f"--only: no run of {args.matrix} matches {', '.join(args.only)}")
    if args.list:
        for j in jobs:
            c = j.mst_config
            print(f"{j.name}: {j.model} ({j.layers} of {j.full_layers} layers), seq {c['seq_len']}, "
                  f"{c['precision']}, MLP x{c['mlp']['chunks']} {c['mlp']['impl']}, LM head "
                  f"x{c['lm_head']['chunks']} {c['lm_head']['impl']}, checkpoint {len(c['checkpoint_layers'])} "
                  f"layers{' to host' if c['offload_checkpoints'] else ''}, {j.warmup}+{j.steps} steps"
                  f"{', loss check' if j.loss_check else ''}")
        return 0
    device = _device(args.device)
    start = time.monotonic()
    status = 0
    not_run = []
    for j in jobs:
        out = args.out_dir / f"{j.name}.json"
        if args.skip_existing and _finished(out):
            print(f"{j.name}: skipped ({out} exists)", file=sys.stderr, flush=True)
            continue
        if args.max_seconds is not None and time.monotonic() - start > args.max_seconds:
            not_run.append(j.name)
            continue
        try:
            records, ok = run_job(j, device)
        except Exception as e:  # noqa: BLE001 (record it and go on: one bug must not cost the other runs)
            records, ok = [measurement(j, None, {"kind": "exception", "message": f"{type(e).__name__}: {e}"[:2000],
                                                 "traceback": traceback.format_exc()[-4000:]})], False
        # Outside the except block: the traceback, and with it the failed run's model, is gone.
        release_memory(import_torch()[0], device)
        for record in records:
            validate_measurement(record)
            write_json(record_path(out, record, j.name), record)
            print(describe(record), file=sys.stderr, flush=True)
        if not ok:
            status = 1
    if not_run:
        print(f"not run (--max-seconds {args.max_seconds:g} reached): {', '.join(not_run)}", file=sys.stderr)
    print(f"{len(jobs) - len(not_run)} runs in {time.monotonic() - start:.0f} s, results in {args.out_dir}",
          file=sys.stderr)
    return status


def run_single(args: argparse.Namespace) -> int:
    plan = read_json(args.plan, "the plan") if args.plan is not None else None
    knobs = read_json(args.setup, "the setup") if args.setup is not None else None
    where = str(args.plan or args.setup or args.hf_config)
    job = make_job(args.model, plan=plan, plan_where=where, knobs=knobs, seq=args.seq,
                   hf_config_file=args.hf_config, layers=args.layers, derived_dir=args.out.parent,
                   convert=args.convert, mst_plan=args.mst_plan, seed=args.seed, steps=args.steps,
                   warmup=args.warmup, lr=args.lr, loss_check=args.loss_check)
    device = _device(args.device)
    records, ok = run_job(job, device)
    for record in records:
        validate_measurement(record)
        write_json(record_path(args.out, record, job.name), record)
        print(describe(record), file=sys.stderr)
    return 0 if ok else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        return run_matrix(args) if args.matrix is not None else run_single(args)
    except (CrosscheckError, mst_hf.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
