"""A matrix of plans made by the mst-plan binary, and their emitted files.

Each entry is one ``mst-plan recommend`` command with ``--for FORMAT`` (so the search keeps only
setups that format's trainer can train as planned) and ``--out plan.json``, followed by ``mst-plan
emit`` of that plan. One and eight GPUs, 8k to 128k tokens, dense and Mixture-of-Experts models,
both precisions DeepSpeed keeps masters in, ZeRO 0-3 and Ulysses degrees pinned and searched.
"""

import argparse
import importlib
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union


@dataclass(frozen=True)
class Entry:
    model: str
    gpus: int
    seq: int
    precision: str = "bf16-master"
    pins: Tuple[str, ...] = ()
    runtime: str = ""  # "" : hf on one GPU, kernels on several; "hf" on several: DeepSpeed's ZeRO 1/2 or torchtitan's FSDP2 as they run
    gpu: str = "h100-sxm-80gb"
    options: Tuple[str, ...] = ()  # further recommend options, e.g. ("--optimizer", "sgd")
    formats: Tuple[str, ...] = ("deepspeed", "axolotl")  # the formats that can train the plan

    @property
    def name(self) -> str:
        pins = "".join("-" + p.replace("=", "") for p in self.pins)
        options = "".join(f"-{flag.lstrip('-')}{value}" for flag, value in zip(self.options[::2], self.options[1::2]))
        runtime = f"-{self.runtime}" if self.runtime and self.runtime != self.default_runtime else ""
        return f"{self.model}-{self.gpus}x-{self.seq // 1024}k-{self.precision}{pins}{options}{runtime}"

    @property
    def default_runtime(self) -> str:
        return "kernels" if self.gpus > 1 else "hf"

    def recommend_args(self, fmt: str) -> List[str]:
        args = ["recommend", "--model", self.model, "--gpu", self.gpu, "--gpus", str(self.gpus),
                "--seq", str(self.seq), "--precision", self.precision, "--for", fmt,
                "--runtime", self.runtime or self.default_runtime]
        for p in self.pins:
            args += ["--pin", p]
        return args + list(self.options)


def default_matrix() -> List[Entry]:
    """51 plans, each one mst-plan can make: every file emitted for them must be accepted."""
    out: List[Entry] = []
    # One GPU: the models whose fp32 masters and states fit one (DeepSpeed keeps fp32 masters for
    # bf16-master; pure bf16 needs ZeRO 1, which the kernels runtime plans).
    for model, seq in (("llama-3.2-1b", 8192), ("llama-3.2-1b", 32768), ("llama-3.2-3b", 8192), ("qwen3-1.7b", 16384),
                       ("gemma-2-2b", 8192), ("qwen3-0.6b", 65536)):
        out.append(Entry(model, 1, seq))
    out += [Entry("llama-3-8b", 1, 16384, "pure-bf16", runtime="kernels"),
            Entry("qwen3-4b", 1, 32768, "pure-bf16", runtime="kernels")]
    # Eight GPUs: every dense family at 64k, then ZeRO stages, Ulysses degrees, lengths, node sizes.
    for model in ("llama-3-8b", "llama-3.2-1b", "mistral-7b-v0.1", "qwen2-7b", "gemma-2-9b", "qwen3-8b", "phi-3-mini-4k"):
        out.append(Entry(model, 8, 65536))
    out += [
        Entry("llama-3-8b", 8, 131072), Entry("llama-3-8b", 8, 8192),
        # torch's SGD under ZeRO; amp (DeepSpeed's torch_autocast; Axolotl has no amp); eager
        # attention on 8 GPUs (Ulysses refuses eager: data parallelism only)
        Entry("llama-3-8b", 8, 32768, options=("--optimizer", "sgd")),
        Entry("llama-3.2-3b", 8, 32768, "amp", formats=("deepspeed",)),
        Entry("llama-3.2-1b", 8, 8192, options=("--attention", "eager")),
        Entry("llama-3-8b", 8, 65536, "pure-bf16"), Entry("llama-3.2-1b", 8, 65536, "pure-bf16"),
        Entry("llama-3-8b", 8, 32768, pins=("zero=2",)), Entry("llama-3-8b", 8, 32768, pins=("zero=3",)),
        Entry("llama-3-8b", 8, 32768, pins=("zero=1",)), Entry("llama-3.2-1b", 8, 65536, pins=("zero=0", "sp=8")),
        Entry("llama-3-8b", 8, 65536, pins=("sp=2",)), Entry("llama-3-8b", 8, 65536, pins=("sp=4",)),
        Entry("llama-3-8b", 8, 262144, pins=("sp=8",)), Entry("qwen2-7b", 8, 32768, pins=("sp=4",)),
        Entry("llama-3-8b", 8, 16384, pins=("micro_batch=2",)),
        Entry("llama-3-8b", 8, 16384, options=("--tokens-per-step", str(64 * 16384))),  # accumulation
        Entry("llama-3-8b", 2, 16384), Entry("llama-3-8b", 4, 65536, "pure-bf16"),
        Entry("llama-3.1-70b", 16, 16384, "pure-bf16"), Entry("mixtral-8x7b", 8, 8192, "pure-bf16"),
        Entry("qwen3-30b-a3b", 8, 32768), Entry("llama-3-8b", 8, 65536, pins=("offload=yes",)),
        Entry("llama-3-8b", 16, 131072),
        Entry("llama-3-8b", 8, 65536, pins=("lm_impl=recompute",)),  # Axolotl: Cut Cross Entropy's plugin
        # The hf runtime: DeepSpeed's ZeRO 1/2 engine as it runs the Hugging Face model (one GPU too)
        Entry("llama-3-8b", 8, 8192, runtime="hf"), Entry("llama-3-8b", 8, 32768, "pure-bf16", runtime="hf"),
        Entry("qwen3-8b", 8, 16384, runtime="hf"), Entry("llama-3.2-1b", 1, 8192, "pure-bf16", runtime="hf"),
        Entry("qwen3-30b-a3b", 8, 32768, runtime="hf"),  # DeepSpeed's ZeRO-3 with its sparse blocks as leaf modules
        Entry("llama-3-8b", 8, 16384, runtime="hf", options=("--tokens-per-step", str(32 * 16384))),
        # the Trainer's "auto" bucket (hidden_size^2), overlap_comm pinned off (searched, it is on where it fits)
        Entry("llama-3-8b", 8, 16384, runtime="hf", pins=("overlap_comm=no",), options=("--reduce-bucket-size", "16777216")),
        # Axolotl's own FSDP2 (fsdp_config): pure bf16, resharded after forward or kept gathered; tied embeddings
        Entry("llama-3-8b", 8, 65536, "pure-bf16", runtime="hf", options=("--fsdp2-groups", "axolotl"), formats=("axolotl",)),
        Entry("qwen3-8b", 8, 32768, "pure-bf16", runtime="hf",
              options=("--fsdp2-groups", "axolotl", "--fsdp2-reshard-after-forward", "false"), formats=("axolotl",)),
        Entry("llama-3.2-1b", 4, 65536, "pure-bf16", runtime="hf", options=("--fsdp2-groups", "axolotl"), formats=("axolotl",)),
        Entry("llama-3.2-1b", 4, 16384, "pure-bf16", runtime="hf", pins=("micro_batch=1",),
              options=("--fsdp2-groups", "axolotl", "--tokens-per-step", str(16 * 16384)), formats=("axolotl",)),  # accumulation
    ]
    return out


def titan_matrix() -> List[Entry]:
    """22 plans made by recommend --for torchtitan: torchtitan's own Llama-3 and Qwen3 code (dense and
    MoE) and its transformers backend, 1 to 16 GPUs, DDP and FSDP2 (ZeRO 0, 2, 3 pinned and
    searched), expert parallelism, every precision it keeps, accumulation, checkpointing and LM-head chunks.
    The last two are planned with torchtitan's own step over several GPUs (runtime hf: its FSDP2 fully sharding);
    the others with the runtimes' models, which the caution's measurements are of."""
    t = ("torchtitan",)
    return [
        Entry("llama-3.2-1b", 1, 8192, runtime="kernels", formats=t),
        Entry("llama-3.2-3b", 1, 16384, "pure-bf16", runtime="kernels", formats=t),
        Entry("qwen3-0.6b", 1, 32768, "amp", runtime="kernels", formats=t),
        Entry("llama-3-8b", 8, 8192, formats=t),
        Entry("llama-3-8b", 8, 32768, formats=t),
        Entry("llama-3-8b", 8, 16384, "amp", formats=t),
        Entry("llama-3-8b", 8, 16384, "pure-bf16", formats=t),
        Entry("llama-3.2-1b", 8, 8192, pins=("zero=0",), formats=t),
        Entry("llama-3-8b", 8, 8192, pins=("zero=3",), formats=t),
        Entry("llama-3-8b", 8, 8192, options=("--tokens-per-step", str(64 * 8192)), formats=t),
        Entry("qwen3-8b", 8, 16384, formats=t),
        Entry("qwen3-8b", 8, 65536, formats=t),  # beyond Qwen3's 40960-position RoPE table
        Entry("qwen3-30b-a3b", 8, 8192, formats=t),
        Entry("mistral-7b-v0.1", 8, 8192, formats=t),
        Entry("qwen2-7b", 8, 8192, formats=t),  # (Gemma and Phi-3 the backend cannot build: the emitter refuses them)
        # (fp32 parameters: the backend builds its MoE in fp32); recommend's own plan has expert parallelism
        # (torchtitan's all-to-all dispatcher, ep 8), the pinned one none
        Entry("mixtral-8x7b", 16, 4096, formats=t), Entry("mixtral-8x7b", 16, 4096, pins=("ep=1",), formats=t),
        Entry("qwen3-30b-a3b", 8, 8192, pins=("ep=8",), formats=t),  # torchtitan's own Qwen3-MoE, expert-parallel
        Entry("qwen3-30b-a3b", 8, 32768, "pure-bf16", pins=("ep=8",), formats=t),  # (ZeRO 2: experts kept gathered)
        Entry("llama-3.1-70b", 16, 8192, "pure-bf16", formats=t),
        Entry("llama-3-8b", 8, 8192, "pure-bf16", runtime="hf", formats=t),
        Entry("llama-3.2-1b", 2, 32768, runtime="hf", formats=t),
    ]


def expert_count(config: Mapping[str, Any]) -> int:
    """A model's config.json's experts per MoE layer (``num_local_experts``: Mixtral, gpt-oss; ``num_experts``:
    Qwen3-MoE, the larger where both are there; a multimodal config's in its ``text_config``); 0 where it names none."""
    config = config.get("text_config", config)
    counts = [config[key] for key in ("num_local_experts", "num_experts")
              if isinstance(config.get(key), int) and not isinstance(config.get(key), bool)]
    return max(counts, default=0)


def moe_config(config: Mapping[str, Any]) -> bool:
    """Whether a model's config.json has Mixture-of-Experts MLPs: an expert count above 1 (:func:`expert_count`)."""
    return expert_count(config) > 1


@dataclass
class Emitted:
    entry: Entry
    fmt: str
    plan: Dict
    files: Dict[str, Path] = field(default_factory=dict)
    error: str = ""  # what mst-plan said when it made no plan


def run_mst(binary: Path, args: List[str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary)] + args, capture_output=True, text=True, timeout=600)


def make(binary: Path, entry: Entry, fmt: str, out_dir: Path) -> Emitted:
    """recommend --for fmt, then emit --format fmt, into out_dir/<entry>/<fmt>/."""
    where = out_dir / entry.name / fmt
    if where.is_dir():  # an earlier run's files must not stand in for this one's
        shutil.rmtree(where)
    where.mkdir(parents=True)
    plan_path = where / "plan.json"
    r = run_mst(binary, entry.recommend_args(fmt) + ["--out", str(plan_path)])
    if r.returncode != 0:
        return Emitted(entry, fmt, {}, error=(r.stderr.strip().splitlines() or ["exit %d" % r.returncode])[-1])
    plan = json.loads(plan_path.read_text())
    r = run_mst(binary, ["emit", "--plan", str(plan_path), "--format", fmt, "--out", str(where)])
    if r.returncode != 0:
        return Emitted(entry, fmt, plan, error=(r.stderr.strip().splitlines() or ["exit %d" % r.returncode])[-1])
    files = {p.name: p for p in where.iterdir() if p.name != "plan.json"}
    return Emitted(entry, fmt, plan, files)


def check_matrix(binary: Path, entries: Sequence[Entry], fmt: str, out_dir: Path,
                 check_one: Callable[[Emitted], Tuple[str, List[str]]], files: str, client: str) -> int:
    """Makes each entry's plan and ``fmt`` files, asks ``check_one`` for (layout, problems) and prints
    one row per plan and a summary line ("N <files> from M plans through <client>: F failed");
    returns 1 when a file was refused or a plan not made, else 0."""
    rows, failures = [], 0
    for entry in entries:
        em = make(binary, entry, fmt, out_dir)
        if em.error:
            rows.append((entry.name, "NO PLAN", em.error))
            failures += 1
            continue
        layout, problems = check_one(em)
        rows.append((entry.name, "ok" if not problems else "REFUSED", layout if not problems else problems[0]))
        failures += bool(problems)
    width = max(len(r[0]) for r in rows) if rows else 10
    for name, status, detail in rows:
        print(f"{name:<{width}}  {fmt}  {status:<8}  {detail}")
    checked = sum(1 for r in rows if r[1] != "NO PLAN")
    print(f"{checked} {files} from {len(entries)} plans through {client}: {failures} failed")
    return 1 if failures else 0


def command_line(prog: str, description: str, argv: Optional[Sequence[str]],
                 clients: Sequence[str]) -> Union[argparse.Namespace, int]:
    """The check commands' arguments (--mst-plan, --out-dir, --only), or 2 after a one-line error
    when the binary is missing or a client package does not import."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--mst-plan", required=True, type=Path, help="the mst-plan binary")
    ap.add_argument("--out-dir", required=True, type=Path, help="where plans and emitted files go")
    ap.add_argument("--only", default="", help="run the entries whose name contains this")
    a = ap.parse_args(argv)
    if not a.mst_plan.is_file():
        print(f"error: --mst-plan: {a.mst_plan}: expected the mst-plan binary", file=sys.stderr)
        return 2
    try:
        for name in clients:
            importlib.import_module(name)
    except ImportError as e:
        print(f"error: {prog}: expected {' and '.join(clients)} (scripts/check-clients installs them): {e}",
              file=sys.stderr)
        return 2
    return a
