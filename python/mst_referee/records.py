"""The mst-measure/1 records a run writes, and what the console says about them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

from .jobs import MEASURE_FORMAT, Job, _is_int

SUMMARY_REQUIRED = {
    "peak_allocated_bytes": (int, type(None)), "peak_reserved_bytes": (int, type(None)),
    "step_seconds": (float, int), "tokens_per_second": (float, int), "losses": (list,), "layers": (int,),
    "device": (str,), "torch": (str,), "transformers": (str,), "attn_implementation": (str,),
}


def measurement(job: Job, summary: Optional[Dict[str, Any]], error: Optional[Dict[str, Any]] = None,
                timeline: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The mst-measure/1 record of a run: what mst-plan reads. A trainer's run on a device
    (backend "torch") has a null timeline and its peaks in the summary; the referee's
    (backend "referee") has the full timeline of the step it recorded."""
    out: Dict[str, Any] = {
        "format": MEASURE_FORMAT,
        "backend": "torch" if timeline is None else "referee",
        "model": job.model,
        "model_path": job.model_path,
        "seed": job.seed,
        "workspace_bytes": 0,  # the referee sees no cuBLAS workspace; a trainer's peaks include it
        "setup": job.setup,
        "timeline": timeline,
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
    backend = obj.get("backend")
    if backend not in ("torch", "referee"):
        bad('backend: expected "torch" or "referee"')
    for key in ("model", "model_path"):
        if not isinstance(obj.get(key), str) or not obj[key]:
            bad(f"{key}: expected a non-empty string")
    for key in ("seed", "workspace_bytes"):
        if not _is_int(obj.get(key)) or obj[key] < 0:
            bad(f"{key}: expected a non-negative integer")
    if not isinstance(obj.get("setup"), dict) or "seq_len" not in obj["setup"]:
        bad("setup: expected the setup object")
    if "timeline" not in obj or (obj["timeline"] is not None) != (backend == "referee"):
        bad("timeline: expected the recorded events from the referee, null from torch (peaks only)")
    summary = obj.get("summary")
    if "error" in obj:
        if summary is not None:
            bad("summary: expected null in a run that failed")
        if not isinstance(obj["error"], str) or not isinstance(obj.get("error_detail"), dict):
            bad("error: expected a kind and an error_detail object")
        return
    if not isinstance(summary, dict):
        bad("summary: expected an object")
    if backend == "referee":
        _validate_referee(obj, bad)
        return
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


REFEREE_SUMMARY = ("peak_bytes", "phase_peak_bytes", "category_max_bytes", "host_peak_bytes", "persistent_bytes",
                   "corrected_sums", "seconds", "torch", "transformers", "attn_implementation", "layers")


def _validate_referee(obj: Dict[str, Any], bad: Any) -> None:
    t = obj["timeline"]
    if not isinstance(t, dict) or t.get("format") != "mst-timeline/1" or not isinstance(t.get("events"), list):
        bad("timeline: expected an mst-timeline/1 object with events")
    live: Dict[int, int] = {}
    for i, e in enumerate(t["events"]):
        if not isinstance(e, list) or len(e) != 10 or e[0] not in ("alloc", "free") or not _is_int(e[2]) or e[2] < 0:
            bad(f"timeline.events[{i}]: expected [kind, tensor, bytes, category, device, phase, layer, micro_step, "
                f"op, name]")
        if e[0] == "alloc":
            if e[1] in live:
                bad(f"timeline.events[{i}]: tensor {e[1]} allocated twice")
            live[e[1]] = e[2]
        elif live.pop(e[1], None) != e[2]:
            bad(f"timeline.events[{i}]: free of tensor {e[1]} that is not live with {e[2]} bytes")
    missing = [k for k in REFEREE_SUMMARY if k not in obj["summary"]]
    if missing:
        bad(f"summary.{missing[0]}: expected in a referee record")


def loss_agreement(patched: Sequence[float], unpatched: Sequence[float]) -> float:
    """The largest |a - b| / |b| over the steps."""
    return max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(patched, unpatched))



def write_record(out: Path, record: Mapping[str, Any], result: Mapping[str, Any]) -> int:
    """A referee's record written to ``out`` and one JSON line said about it (its events and seconds, from the run's
    ``result``): 0, or 2 with one error line when it cannot be written (a command's exit status)."""
    import json

    from .jobs import write_json

    try:
        write_json(out, record)
    except OSError as e:
        print(f"error: {out}: cannot write the measurement: {e.strerror or e}")
        return 2
    print(json.dumps({"out": str(out), "events": len(result["events"]), "seconds": round(result["seconds"], 1)}))
    return 0


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
    if record["backend"] == "referee":
        return (f"{name}: referee peak {s['peak_bytes'] / gib:.3f} GiB ({s['events']} events, "
                f"{s['corrected_sums']} in-place gradient sums, {s['seconds']:.1f} s)")
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


