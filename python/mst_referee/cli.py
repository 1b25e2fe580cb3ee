"""The command line of the referee and the cross-check (scripts/torch_crosscheck.py)."""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Optional, Sequence

import mst_hf

from .jobs import DEFAULT_MST_PLAN, MEASURE_FORMAT, CrosscheckError, load_matrix, make_job, read_json, write_json
from .records import describe, measurement, record_path, validate_measurement
from .step import TRAINERS
from .train import import_torch, release_memory, run_job


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
    p.add_argument("--rank", type=int, default=0, help="the data-parallel rank recorded (FSDP2 plans; default 0)")
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate (default 1e-5)")
    p.add_argument("--trainer", choices=TRAINERS, default="loop",
                   help="how the forward is called: a loop of one's own (default), or the Hugging Face Trainer "
                        "with bf16=True (accelerate's bf16 autocast and fp32 outputs)")
    p.add_argument("--loss-check", action="store_true",
                   help="also train the unpatched model (same seed) and compare the losses")
    p.add_argument("--mst-plan", type=Path, default=DEFAULT_MST_PLAN,
                   help="mst-plan binary that converts a plan (default build/src/mst-plan)")
    p.add_argument("--convert", choices=("auto", "binary", "python"), default="auto",
                   help="plan -> hf-mst conversion: the binary when it exists (auto), or the Python mirror")
    p.add_argument("--device", default=None,
                   help="cuda (default when available), cpu, or fake: the referee (full size on fake tensors, "
                        "every storage allocation and free recorded)")
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
    if requested == "fake":
        from .fake import fake_available
        ok, why = fake_available()
        if not ok:
            raise CrosscheckError(f"--device fake: {why}")
    elif requested != "cpu" and not requested.startswith("cuda"):
        raise CrosscheckError(f"--device: expected cuda, cpu or fake, got '{requested}'")
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
                   warmup=args.warmup, lr=args.lr, loss_check=args.loss_check, trainer=args.trainer, rank=args.rank)
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

