"""Random differential runs: tiny random configs and setups, the referee against ``mst-plan compare``.

The fixed cases of ``python/tests/test_hf_runtime.py`` pin what a rule was written for; corner
cases (a chunk of one token, top-1 routing, a single KV head, windows wider than the sequence,
...) come from sizes nobody thought of. Each case here is a random tiny config of one family and
a random setup of the knobs the hf runtime models, run through the real transformers step on fake
tensors and re-simulated; a case whose timelines differ is kept (config, knobs, record) for the
developer. Nothing is compared against a number written here: both sides are computed.

    scripts/referee_differential.py --families mixtral,qwen3_moe --cases 40 --seed 3 --out-dir /tmp/diff

With ``--zero``, each case is DeepSpeed's ZeRO 1, 2 or 3 engine instead: one of the repository's tiny
models of every family on 2 to 5 ranks (one rank recorded), with random buckets, persistence
thresholds, overlap_comm, accumulation and the mini-sequence and checkpoint knobs; the DeepSpeed
config is the one ``mst-plan emit --format deepspeed`` writes for the plan, and the step is
DeepSpeed's own (:mod:`mst_referee.deepspeed_zero`, DeepSpeed from ``MST_CLIENTS_PATH``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .jobs import DEFAULT_MST_PLAN, REPO_ROOT

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen3_moe", "gpt_oss")


@dataclass
class Case:
    family: str
    config: Dict[str, Any]
    knobs: Dict[str, Any]
    seq: int
    rank: int = 0  # the data-parallel rank recorded (FSDP2's)


def random_config(rng: random.Random, family: str) -> Dict[str, Any]:
    """A tiny config of `family` that transformers builds and mst-plan accepts."""
    heads = rng.choice([2, 4])
    kv = rng.choice([k for k in (1, 2, 4) if heads % k == 0])
    layers = rng.randint(1, 3)
    cfg: Dict[str, Any] = {
        "model_type": family, "hidden_size": rng.choice([32, 64]), "intermediate_size": rng.choice([16, 40]),
        "num_attention_heads": heads, "num_key_value_heads": kv, "num_hidden_layers": layers,
        "vocab_size": rng.choice([96, 128]), "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "torch_dtype": "bfloat16",
    }
    if family not in ("gemma2", "gemma3_text"):
        cfg["hidden_act"] = "silu"
        cfg["tie_word_embeddings"] = rng.random() < 0.5
    if family in ("llama", "mistral", "qwen3", "gemma2", "gemma3_text", "qwen3_moe", "gpt_oss"):
        cfg["head_dim"] = rng.choice([8, 16])
    if family == "llama":
        cfg["attention_bias"] = rng.random() < 0.3
    if family in ("mistral", "mixtral") and rng.random() < 0.4:
        cfg["sliding_window"] = rng.choice([4, 16])
    if family in ("qwen2", "qwen3"):
        if rng.random() < 0.4:
            cfg.update(use_sliding_window=True, sliding_window=rng.choice([4, 16]), max_window_layers=rng.randint(0, layers))
        else:
            cfg.update(use_sliding_window=False, sliding_window=None)
    if family == "gemma2":
        cfg.update(sliding_window=rng.choice([4, 16]), query_pre_attn_scalar=16)
        cfg["attn_logit_softcapping"] = rng.choice([None, 50.0])
        cfg["final_logit_softcapping"] = rng.choice([None, 30.0])
    if family == "gemma3_text":
        cfg.update(sliding_window=rng.choice([4, 16]), sliding_window_pattern=rng.choice([2, 3]), query_pre_attn_scalar=16)
    if family == "phi3":
        cfg.update(pad_token_id=None, partial_rotary_factor=rng.choice([0.5, 1.0]))
        if rng.random() < 0.3:
            cfg["sliding_window"] = rng.choice([4, 16])
    if family == "gpt_oss":  # sliding and full layers alternate (its default), yarn scaling (its default)
        cfg.update(sliding_window=rng.choice([4, 16]), attention_bias=True, swiglu_limit=7.0,
                   layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)])
    if family in ("mixtral", "qwen3_moe", "gpt_oss"):
        experts = rng.choice([1, 2, 3, 4, 8])
        cfg.update(num_experts_per_tok=rng.randint(1, experts), output_router_logits=False)
        if family in ("mixtral", "gpt_oss"):
            cfg["num_local_experts"] = experts
        else:
            cfg.update(num_experts=experts, moe_intermediate_size=rng.choice([8, 24]), norm_topk_prob=rng.random() < 0.5,
                       use_sliding_window=False)
    return cfg


def sdpa_runs_flash(cfg: Dict[str, Any], seq: int) -> bool:
    """Whether SDPA runs PyTorch's flash kernel for `cfg` at `seq` tokens (what mst-plan models as
    `attention sdpa`): no attention sinks (gpt-oss), no layer whose sliding window the sequence
    reaches (transformers then passes a mask), no logit soft-capping, a head size that is a multiple
    of 8 up to 256."""
    if cfg["model_type"] == "gpt_oss":
        return False
    window = cfg.get("sliding_window")
    sliding = window is not None  # (Qwen: only the layers from max_window_layers on, and only when it is used)
    if cfg["model_type"] in ("qwen2", "qwen3"):
        sliding = sliding and bool(cfg.get("use_sliding_window")) and cfg["max_window_layers"] < cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return (not (sliding and seq >= window) and cfg.get("attn_logit_softcapping") is None and head_dim % 8 == 0
            and head_dim <= 256)


def random_knobs(rng: random.Random, layers: int, tokens: int, eager_only: bool = False,
                 sdpa: bool = False) -> Dict[str, Any]:
    """A setup of the knobs the hf runtime models (one GPU); eager_only: attention sinks (gpt-oss);
    sdpa: SDPA would run its flash kernel (sdpa_runs_flash), so `attention sdpa` may be drawn."""
    knobs: Dict[str, Any] = {}
    if rng.random() < 0.6:
        knobs["checkpoint"] = rng.choice(["all", "0", str(layers - 1)])
        if rng.random() < 0.3:
            knobs["offload_checkpoints"] = True
    if rng.random() < 0.6:
        knobs.update(mlp_chunks=rng.choice([c for c in (2, 3, 5, 7) if c <= tokens] or [1]),
                     mlp_impl=rng.choice(["loop", "tiled"]))
    if rng.random() < 0.4:
        knobs.update(lm_chunks=rng.choice([c for c in (2, 3) if c <= tokens] or [1]), lm_impl=rng.choice(["recompute", "fused"]))
    if rng.random() < 0.3:
        knobs["grad_accum"] = 2
    r = rng.random()
    if r < 0.3 or eager_only:
        knobs["attention"] = "eager"
    elif r < 0.55 and sdpa:
        knobs["attention"] = "sdpa"
    if rng.random() < 0.3:
        knobs["precision"] = "bf16-master"
    r = rng.random()
    if r < 0.2:
        knobs["optimizer"] = "sgd"
    elif r < 0.5:
        knobs["optimizer_impl"] = rng.choice(["foreach", "for-loop"])
    if rng.random() < 0.2 and knobs.get("grad_accum", 1) == 1:
        knobs["optimizer_in_backward"] = True
    return knobs


def random_case(rng: random.Random, family: str, trainer: bool = True) -> Case:
    """A random case of `family`: its config, knobs and length; with `trainer`, sometimes the forward as the
    Hugging Face Trainer with bf16=True calls it (hf_trainer_bf16, drawn last; not for the Mixture-of-Experts
    families mst-plan refuses it for)."""
    cfg = random_config(rng, family)
    batch = 2 if rng.random() < 0.3 else 1
    seq = rng.choice([5, 9, 16, 23])
    knobs = random_knobs(rng, cfg["num_hidden_layers"], batch * seq, eager_only=family == "gpt_oss",
                         sdpa=sdpa_runs_flash(cfg, seq))
    if batch > 1:
        knobs["micro_batch"] = batch
    # (not for the families whose experts' combine CUDA's autocast sums in fp32: mst-plan refuses them)
    if trainer and rng.random() < 0.3 and family not in ("qwen3_moe", "gpt_oss"):
        knobs["hf_trainer_bf16"] = True
    return Case(family, cfg, knobs, seq)


# The families FSDP2's cases draw from (mst-plan models it for dense models).
FSDP2_FAMILIES = tuple(f for f in FAMILIES if f not in ("mixtral", "qwen3_moe", "gpt_oss"))


def random_fsdp2_case(rng: random.Random, family: str) -> Case:
    """A random case of `family` sharded by FSDP2 over 2 to 5 ranks (a random one recorded), with the knobs
    mst-plan models with it (bf16 parameters, or fp32 ones under its bf16 policy; the optimizer stepped
    after backward)."""
    case = random_case(rng, family, trainer=False)
    for key in ("precision", "optimizer_in_backward"):
        case.knobs.pop(key, None)
    case.knobs.update(dp=rng.randint(2, 5), zero_stage=3, fsdp2=True)
    case.rank = rng.randrange(case.knobs["dp"])
    if rng.random() < 0.5:
        case.knobs["precision"] = "bf16-master"  # (fp32 parameters under its bf16 mixed-precision policy)
    if case.knobs.get("optimizer") == "sgd" and case.knobs.get("optimizer_impl", "fused") == "fused":
        case.knobs["optimizer_impl"] = "foreach"  # (torch's DTensor has no fused SGD: mst-plan refuses it)
    # Accumulating as the Hugging Face Trainer does (set_requires_gradient_sync(False) but in the last
    # micro-step; three: the middle one adds into the whole gradients)
    if case.knobs.get("grad_accum", 1) > 1 and rng.random() < 0.5:
        case.knobs.update(fsdp2_no_sync=True, grad_accum=rng.choice([2, 3, 4]))  # (4: one middle one not recorded)
    if rng.random() < 0.25:  # (fully_shard(layer, reshard_after_forward=False): gathered from forward to backward)
        case.knobs["fsdp2_reshard_after_forward"] = False
    # Sharded by accelerate's own fsdp2_prepare_model, as the Trainer does (bf16 parameters: bf16=False; fp32 ones
    # under its bf16 policy: bf16=True)
    if rng.random() < 0.4:
        case.knobs["fsdp2_groups"] = "accelerate"
    return case


def random_axolotl_case(rng: random.Random, family: str) -> Case:
    """A random FSDP2 case (:func:`random_fsdp2_case`) sharded as Axolotl shards it (its own fsdp2_prepare_model,
    bf16 weights under its bf16: true): run in Axolotl's environment, whose torch (2.14) and transformers it
    requires."""
    case = random_fsdp2_case(rng, family)
    case.knobs.pop("precision", None)  # (pure-bf16: Axolotl keeps the bf16 weights it loads)
    # (not eager: the referee records one 2-byte scalar fewer for the eager mask of transformers 5.20.1, Axolotl's,
    # which makes its zero with torch.tensor, than for 5.24's torch.zeros, which mst-plan models)
    if case.knobs.get("attention") == "eager":
        case.knobs["attention"] = "sdpa" if sdpa_runs_flash(case.config, case.seq) else "flash"
    case.knobs["fsdp2_groups"] = "axolotl"
    return case


# The tiny models the ZeRO cases draw from: one per family (a case reads its layer count from the file).
ZERO_MODELS = ("models/tiny-llama.json", "tests/data/tiny_qwen2_untied.json", "tests/data/tiny_qwen3.json",
               "tests/data/tiny_phi3_longrope.json", "tests/data/tiny_gemma2.json", "tests/data/tiny_gemma3.json",
               "tests/data/tiny_mixtral.json", "tests/data/tiny_qwen3_moe.json", "tests/data/tiny_gpt_oss.json")


@dataclass
class ZeroCase:
    model: str  # relative to the repository's root
    setup: Dict[str, Any]  # a plan's setup (every key, as recommend --out writes it)
    rank: int

    @property
    def family(self) -> str:
        return json.loads((REPO_ROOT / self.model).read_text())["model_type"]


# The keys of every ZeRO case's setup at the one value the generator gives them (a case's line leaves them out).
_ZERO_FIXED = {"ep": 1, "moe_imbalance": 1.0, "optimizer": "adamw", "optimizer_impl": "fused", "optimizer_in_backward": False,
               "padded": False, "runtime": "hf", "sp": 1, "sp_impl": "ulysses", "zero3_prefetch": 1}


def random_zero_case(rng: random.Random) -> ZeroCase:
    """A plan for DeepSpeed's engine that mst-plan may accept (emit and compare say whether it does)."""
    model = rng.choice(ZERO_MODELS)
    cfg = json.loads((REPO_ROOT / model).read_text())
    layers = cfg["num_hidden_layers"]
    stage = rng.choice([1, 2, 3])
    dp = rng.randint(2, 5)
    seq = rng.choice([64, 128, 256])
    pure = stage < 3 and rng.random() < 0.25  # (DeepSpeed's bf16 master flags)
    checkpoint = sorted(rng.sample(range(layers), rng.randint(0, layers)))
    setup: Dict[str, Any] = dict(
        _ZERO_FIXED, attention="flash", checkpoint=checkpoint, dp=dp, grad_accum=rng.choice([1, 1, 2, 3]),
        lm_chunks=rng.choice([1, 2, 3]), lm_impl=rng.choice(["recompute", "fused"]), micro_batch=rng.choice([1, 1, 2]),
        mlp_chunks=rng.choice([1, 2, 3]), mlp_impl=rng.choice(["loop", "tiled"]),
        offload_checkpoints=bool(checkpoint) and rng.random() < 0.3, optimizer_state_dtype="bf16" if pure else "fp32",
        overlap_comm=False, precision="pure-bf16" if pure else "bf16-master",
        reduce_bucket_size=rng.choice([500_000_000, 4096, 1000]), seq_len=seq, zero_stage=stage)
    if stage < 3:
        setup["overlap_comm"] = rng.random() < 0.3
    else:
        setup["param_persistence_threshold"] = rng.choice([0, 100, 100_000])
    r = rng.random()
    if r < 0.3 or cfg["model_type"] == "gpt_oss":
        setup["attention"] = "eager"
    elif r < 0.6 and sdpa_runs_flash(cfg, seq):
        setup["attention"] = "sdpa"
    return ZeroCase(model, setup, rng.randrange(dp))


def run_zero_case(case: ZeroCase, where: Path, mst_plan: Path = DEFAULT_MST_PLAN) -> Tuple[Optional[bool], str]:
    """DeepSpeed's step of the case and its re-simulation: (identical, the compare output's tail or the
    error); identical None when mst-plan refuses the plan (emit says why)."""
    where.mkdir(parents=True, exist_ok=True)
    plan = where / "plan.json"
    plan.write_text(json.dumps({"format": "mst-plan/1", "gpu": "h100-sxm-80gb", "gpus": case.setup["dp"], "model": case.model,
                                "setup": case.setup}, indent=1))
    emit = subprocess.run([str(mst_plan), "emit", "--plan", str(plan), "--format", "deepspeed"], capture_output=True,
                          text=True, timeout=120, cwd=REPO_ROOT)
    if emit.returncode != 0:
        return None, emit.stderr.strip()
    ds = where / "ds_config.json"
    ds.write_text(emit.stdout)
    record = where / "run.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.environ.get("MST_CLIENTS_PATH", ""), str(REPO_ROOT / "python")) if p),
               PYTHONHASHSEED="0")
    ref = subprocess.run([sys.executable, "-m", "mst_referee.deepspeed_zero", str(plan), str(ds), "--rank", str(case.rank),
                          "--out", str(record)], capture_output=True, text=True, timeout=900, cwd=REPO_ROOT, env=env)
    return _compared(ref, record, mst_plan)


def run_case(case: Case, where: Path, mst_plan: Path = DEFAULT_MST_PLAN) -> Tuple[bool, str]:
    """The referee's step and its re-simulation; (identical, the compare output's tail or the error)."""
    where.mkdir(parents=True, exist_ok=True)
    # compare finds the config by the record's file name, beside the record first: one folder per case.
    config = where / f"diff_{case.family}.json"
    config.write_text(json.dumps(case.config, indent=1))
    knobs = where / "knobs.json"
    knobs.write_text(json.dumps(case.knobs))
    record = where / "run.json"
    script = REPO_ROOT / "scripts" / "torch_crosscheck.py"
    env = dict(os.environ)
    if case.knobs.get("fsdp2_groups") == "accelerate":  # (accelerate's fsdp2_prepare_model, from MST_CLIENTS_PATH)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("MST_CLIENTS_PATH", ""), env.get("PYTHONPATH", "")) if p)
    ref = subprocess.run([sys.executable, str(script), str(config), "--setup", str(knobs), "--seq", str(case.seq),
                          "--rank", str(case.rank), "--device", "fake", "--out", str(record)], capture_output=True, text=True,
                         timeout=600, env=env)
    return _compared(ref, record, mst_plan)


def _compared(ref: "subprocess.CompletedProcess[str]", record: Path, mst_plan: Path) -> Tuple[bool, str]:
    """The referee's run `ref` (which wrote `record`) against mst-plan's re-simulation: (identical, the
    compare output's tail or the referee's error). From the repository's root: a test model's path is
    relative to it."""
    if ref.returncode != 0:
        return False, "referee failed: " + (ref.stderr or ref.stdout)[-1500:]
    cmp = subprocess.run([str(mst_plan), "compare", "--run", str(record)], capture_output=True, text=True, timeout=600,
                         cwd=REPO_ROOT)
    identical = cmp.returncode == 0 and "timelines identical" in cmp.stdout
    return identical, (cmp.stdout + cmp.stderr)[-1500:]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="referee_differential.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated (default: all of {', '.join(FAMILIES)})")
    p.add_argument("--cases", type=int, default=20, help="cases per run (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the configs and setups (default 0)")
    p.add_argument("--out-dir", type=Path, required=True, help="one folder per case (kept for the ones that differ)")
    p.add_argument("--mst-plan", type=Path, default=DEFAULT_MST_PLAN, help="mst-plan binary (default build/src/mst-plan)")
    p.add_argument("--zero", action="store_true",
                   help="DeepSpeed ZeRO 1-3 cases on the tiny models (--families does not apply; needs MST_CLIENTS_PATH)")
    p.add_argument("--fsdp2", action="store_true", help="cases sharded by torch's FSDP2 (dense families)")
    p.add_argument("--axolotl", action="store_true",
                   help="cases sharded by Axolotl's FSDP2 (dense families; run with Axolotl's Python, .venv/clients-axolotl)")
    args = p.parse_args(argv)
    if args.zero:
        return _main_zero(args)
    if args.axolotl:
        try:
            import axolotl  # noqa: F401
        except ImportError:
            print(f"error: --axolotl: expected Axolotl importable (run with .venv/clients-axolotl/bin/python), got "
                  f"{sys.executable}", file=sys.stderr)
            return 2
    args.fsdp2 = args.fsdp2 and not args.axolotl
    sharded = args.fsdp2 or args.axolotl
    allowed = FSDP2_FAMILIES if sharded else FAMILIES
    families = [f for f in args.families.split(",") if f and (f in allowed or f not in FAMILIES)]
    unknown = [f for f in families if f not in allowed]
    if unknown or not families or args.cases < 1:
        print(f"error: --families: expected some of {', '.join(allowed)}{' (FSDP2: dense families)' if sharded else ''} "
              f"and --cases >= 1, got {args.families!r}, {args.cases}", file=sys.stderr)
        return 2
    if args.fsdp2 and not os.environ.get("MST_CLIENTS_PATH"):  # (accelerate's own sharding: 40 % of the cases)
        print(f"error: --fsdp2: expected MST_CLIENTS_PATH set to the environment with accelerate, got "
              f"{os.environ.get('MST_CLIENTS_PATH')!r}", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)

    draw = random_axolotl_case if args.axolotl else random_fsdp2_case if args.fsdp2 else random_case

    def one(i: int) -> Tuple[Optional[bool], str, str]:
        case = draw(rng, rng.choice(families))
        ok, detail = run_case(case, args.out_dir / f"case{i}", args.mst_plan)
        rank = f" rank {case.rank}" if sharded else ""
        return ok, detail, f"{case.family} seq {case.seq}{rank} {json.dumps(case.knobs)}"

    return _run_cases(args.cases, one)


def _main_zero(args: argparse.Namespace) -> int:
    if args.cases < 1 or not os.environ.get("MST_CLIENTS_PATH"):
        print(f"error: --zero: expected --cases >= 1 and MST_CLIENTS_PATH set to DeepSpeed's environment, got "
              f"{args.cases}, {os.environ.get('MST_CLIENTS_PATH')!r}", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)

    def one(i: int) -> Tuple[Optional[bool], str, str]:
        case = random_zero_case(rng)
        ok, detail = run_zero_case(case, args.out_dir / f"case{i}", args.mst_plan)
        drawn = {k: v for k, v in case.setup.items() if k not in _ZERO_FIXED}
        return ok, detail, (f"{case.family} ZeRO-{case.setup['zero_stage']} dp {case.setup['dp']} rank {case.rank} "
                            f"{json.dumps(drawn)}")

    return _run_cases(args.cases, one)


def _run_cases(cases: int, one: Callable[[int], Tuple[Optional[bool], str, str]]) -> int:
    """Case i = 0 .. cases - 1 by one(i): (identical, or None when mst-plan refused it; the detail; what
    it was), a line each, the detail under every case that was not identical; 1 when any differed."""
    failed: List[int] = []
    refused = 0
    for i in range(cases):
        ok, detail, what = one(i)
        print(f"{i} {'refused' if ok is None else 'identical' if ok else 'DIFFERS'} {what}", flush=True)
        if ok is None:
            refused += 1
        elif not ok:
            failed.append(i)
        if ok is not True:
            print("   " + detail.strip().replace("\n", "\n   "), flush=True)
    ran = cases - refused
    print(f"{ran - len(failed)} of {ran} identical" + (f" ({refused} refused by mst-plan)" if refused else "")
          + (f"; differ: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
