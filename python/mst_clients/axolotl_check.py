"""python -m mst_clients.axolotl_check --mst-plan BIN --out-dir DIR: every axolotl.yaml through Axolotl's loader.

The plans are the matrix's (``matrix.default_matrix()``, made by ``recommend --for axolotl``). Each
emitted fragment is merged, as the user is told to, into a minimal base config: the plan model's
own config.json as ``base_model`` (a local folder: nothing is downloaded), one local dataset, an
output folder. The merged file then goes through the steps of Axolotl 0.21.0's
``axolotl.cli.config.load_cfg`` that read and check a config, in its order: ``prepare_plugins``,
``validate_config`` (with the capabilities ``gpu_capabilities()`` reports on the plan's GPU, and
``WORLD_SIZE`` its GPU count, as ``torchrun`` sets it), ``normalize_config``,
``normalize_cfg_datasets``, ``plugin_set_cfg``. Left out are the debug log, the experiment trackers'
variables and ``prepare_optim_env``, which sets the process's NCCL, DeepSpeed and accelerate
parallelism variables and starts DeepSpeed's process group on the devices. Then the config Axolotl
made must mean what the plan means (``meaning``), including the parallel layout Axolotl gives
accelerate (``_get_parallel_config_kwargs``, what prepare_optim_env's variables carry). The ``ds_config.json``
beside a fragment is checked by ``python -m mst_clients`` (DeepSpeed's engine); here it must be
the file Axolotl loads.

Runs in its own interpreter: Axolotl 0.21.0 needs Python 3.12 and pins its own torch and
transformers (python/requirements/clients-axolotl.txt, installed by scripts/python-env.sh).
Exits 1 when any file is refused or a plan could not be made, 2 on a usage error.
"""

import contextlib
import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from . import matrix

# Before Axolotl is imported (its telemetry starts then): nothing leaves a check, nothing is fetched.
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

VERSION = "0.21.0"
MODELS_DIR = Path(__file__).resolve().parents[2] / "models"

# What axolotl.cli.config.gpu_capabilities() reads off each catalog GPU (compute capability;
# bf16 and tf32 from Ampere on, fp8 from Hopper on, as compute_supports_fp8 decides).
COMPUTE_CAPABILITY = {"a100": (8, 0), "h100": (9, 0), "h200": (9, 0), "b200": (10, 0), "l40s": (8, 9),
                      "rtx-4090": (8, 9)}


def capabilities(gpu: str, gpus: int, torch_version: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(capabilities, env_capabilities) as gpu_capabilities() returns them on the plan's GPU."""
    cc = next((v for k, v in COMPUTE_CAPABILITY.items() if gpu.startswith(k)), None)
    if cc is None:
        raise ValueError(f"gpu: expected one of {', '.join(COMPUTE_CAPABILITY)}, got '{gpu}'")
    return ({"bf16": True, "fp8": cc >= (9, 0), "tf32": True, "n_gpu": gpus, "compute_capability": f"sm_{cc[0]}{cc[1]}"},
            {"torch_version": torch_version.split("+", maxsplit=1)[0]})


def catalog_config(model: str) -> Dict[str, Any]:
    """The catalog model's config.json (models/NAME.json), its "_mst" block included."""
    return json.loads((MODELS_DIR / f"{model}.json").read_text())


def base_config(plan: Mapping[str, Any], work: Path) -> Dict[str, Any]:
    """A minimal config of the user's own (model, data, output) for the fragment to merge into."""
    model_dir = work / "base_model"
    model_dir.mkdir(parents=True, exist_ok=True)
    raw = catalog_config(plan["model"])
    (model_dir / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if k != "_mst"}, indent=1))
    data = work / "data.jsonl"
    data.write_text('{"text": "a line of training text"}\n')
    return {"base_model": str(model_dir), "datasets": [{"path": str(data), "type": "completion"}],
            "output_dir": str(work / "out"), "learning_rate": 1e-5, "num_epochs": 1}


def merged(fragment: Path, plan: Mapping[str, Any], work: Path) -> Path:
    """base + fragment (its keys win), written as the user's axolotl.yaml next to the fragment."""
    import yaml
    frag = yaml.safe_load(fragment.read_text())
    cfg = base_config(plan, work)
    cfg.update(frag)
    if isinstance(cfg.get("deepspeed"), str):  # relative to where axolotl is launched: the fragment's folder
        cfg["deepspeed"] = str(fragment.parent / cfg["deepspeed"])
    out = work / "axolotl.yaml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


@contextlib.contextmanager
def fresh_process(plan: Mapping[str, Any]):
    """What a new ``axolotl train`` process starts from: no plugin registered yet (Axolotl's
    PluginManager is one instance per process, and a registered plugin's keys join the schema of
    every later config), the environment as it was (plugins' register() sets variables), and
    ``WORLD_SIZE`` the plan's GPU count, as torchrun sets it on rank 0."""
    from axolotl.integrations.base import PluginManager

    saved = dict(os.environ)
    PluginManager._instance = None
    os.environ.update(WORLD_SIZE=str(plan["gpus"]), LOCAL_RANK="0")
    try:
        yield
    finally:
        PluginManager._instance = None
        os.environ.clear()
        os.environ.update(saved)


def load(path: Path, plan: Mapping[str, Any]):
    """Axolotl's load_cfg steps on the merged file, on the plan's GPU count; returns the config."""
    import torch
    import yaml
    from axolotl.cli import config as cli
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault(yaml.safe_load(path.read_text()))
    cfg.axolotl_config_path = str(path)
    cli.prepare_plugins(cfg)
    caps, env_caps = capabilities(plan["gpu"], plan["gpus"], torch.__version__)
    cfg = cli.validate_config(cfg, capabilities=caps, env_capabilities=env_caps)
    cli.normalize_config(cfg)
    cli.normalize_cfg_datasets(cfg)
    cli.plugin_set_cfg(cfg)
    return cfg


def is_moe(model: str) -> bool:
    """Whether the catalog model's MLPs are Mixture-of-Experts blocks (its config.json's expert count)."""
    return matrix.moe_config(catalog_config(model))


def meaning(cfg, plan: Mapping[str, Any], ds_config: Optional[Mapping[str, Any]]) -> List[str]:
    """What in Axolotl's config differs from the plan (empty: it trains the plan)."""
    import torch
    from axolotl.utils.distributed import _get_parallel_config_kwargs

    s = plan["setup"]
    problems: List[str] = []

    def want(name: str, got: Any, expected: Any) -> None:
        if got != expected:
            problems.append(f"{name}: Axolotl has {got!r}, the plan {expected!r}")

    want("sequence_len", cfg.sequence_len, s["seq_len"])
    want("micro_batch_size", cfg.micro_batch_size, s["micro_batch"])
    want("gradient_accumulation_steps", cfg.gradient_accumulation_steps, s["grad_accum"])
    # Sequences per optimizer step over the data-parallel replicas (normalize_config: world / cp).
    want("batch_size", cfg.batch_size, s["micro_batch"] * s["grad_accum"] * s["dp"])
    want("sample_packing", bool(cfg.sample_packing), not s["padded"])
    want("pad_to_sequence_len", bool(cfg.pad_to_sequence_len), True)  # every row holds seq_len tokens
    # A packed micro-batch of several sequences: real rows [mb, seq_len], not one row of mb x seq_len.
    want("multipack_real_batches", bool(cfg.multipack_real_batches), not s["padded"] and s["micro_batch"] > 1)
    want("torch_dtype", cfg.torch_dtype, torch.bfloat16)  # bf16 weights in every plan Axolotl trains
    want("attn_implementation", cfg.attn_implementation,
         "flash_attention_2" if s["attention"] == "flash" else "eager")
    checkpointed = len(s["checkpoint"]) > 0
    want("gradient_checkpointing", bool(cfg.gradient_checkpointing), checkpointed)
    if checkpointed:  # reentrant under ZeRO-3 only (Axolotl's own default: non-reentrant fails there)
        want("gradient_checkpointing_kwargs.use_reentrant",
             (cfg.gradient_checkpointing_kwargs or {}).get("use_reentrant"),
             ds_config is not None and s["zero_stage"] == 3)
    want("activation_offloading", cfg.activation_offloading or False,
         "hidden_states" if s["offload_checkpoints"] else False)
    want("context_parallel_size", cfg.context_parallel_size or 1, s["sp"])
    want("tiled_mlp", bool(cfg.tiled_mlp), s["mlp_chunks"] > 1)
    if cfg.tiled_mlp and is_moe(plan["model"]):  # patch_tiled_mlp tiles the dense MLP class only
        problems.append("tiled_mlp: Axolotl tiles the dense MLP class, which a Mixture-of-Experts model's experts are not")
    if s["mlp_chunks"] > 1:
        want("tiled_mlp_num_shards", cfg.tiled_mlp_num_shards, s["mlp_chunks"])
    chunked_loss = s["lm_chunks"] > 1
    fused = s["lm_impl"] == "fused"
    want("liger_fused_linear_cross_entropy", bool(cfg.liger_fused_linear_cross_entropy), chunked_loss and fused)
    want("cut_cross_entropy", bool(cfg.cut_cross_entropy), chunked_loss and not fused)
    # The key alone does nothing: the plugin that reads it must be loaded.
    want("plugins", list(cfg.plugins or []),
         [] if not chunked_loss else ["axolotl.integrations.liger.LigerPlugin" if fused
                                      else "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"])
    want("optimizer", str(cfg.optimizer), {"adamw": "adamw_torch_fused", "adamw-8bit": "adamw_bnb_8bit",
                                           "sgd": "sgd"}[s["optimizer"]])
    # DeepSpeed: the file Axolotl loaded (normalize_config reads cfg.deepspeed) is the emitted one.
    want("deepspeed", cfg.deepspeed, ds_config)
    # FSDP2 (fsdp2_groups axolotl): any fsdp_config makes Axolotl put its own fsdp2_prepare_model in accelerate's
    # place (PatchManager); the Trainer builds accelerate's plugin from it as Axolotl's builder hands it over
    # (TrainingArguments(fsdp=True, fsdp_config=...)), which must shard as the plan does.
    fsdp2 = bool(s.get("fsdp2"))
    want("fsdp_config", bool(cfg.fsdp_config), fsdp2)
    if fsdp2 and cfg.fsdp_config:
        want("fsdp2_groups", s.get("fsdp2_groups", "mst_hf"), "axolotl")
        plugin = fsdp_plugin(cfg)
        want("fsdp plugin: fsdp_version", plugin.fsdp_version, 2)
        want("fsdp plugin: reshard_after_forward", plugin.reshard_after_forward, s.get("fsdp2_reshard_after_forward", True))
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
        want("fsdp plugin: auto_wrap_policy", plugin.auto_wrap_policy, transformer_auto_wrap_policy)
        want("fsdp plugin: activation_checkpointing", bool(plugin.activation_checkpointing), False)  # (HF's: above)
        from torch.distributed.fsdp import CPUOffloadPolicy
        want("fsdp plugin: cpu_offload", isinstance(plugin.cpu_offload, CPUOffloadPolicy), False)  # (Axolotl's test)
        # The Trainer accumulates under accelerate's no_sync (set_requires_gradient_sync(False) but in the last
        # micro-step) unless the config asks it to sync each one
        sync_each = bool(((cfg.accelerator_config or {}).get("gradient_accumulation_kwargs") or {}).get("sync_each_batch"))
        want("gradient sync in the last micro-step only (fsdp2_no_sync)", bool(s.get("fsdp2_no_sync")) and s["grad_accum"] > 1,
             s["grad_accum"] > 1 and not sync_each)
    # The mesh Axolotl hands accelerate: Ulysses over sp ranks (DeepSpeed's), replicas over the rest.
    if s["sp"] > 1:
        kwargs = _get_parallel_config_kwargs(plan["gpus"], cfg.tensor_parallel_size, cfg.context_parallel_size,
                                             cfg.dp_shard_size, cfg.dp_replicate_size,
                                             bool(cfg.fsdp or cfg.fsdp_config),
                                             getattr(cfg, "expert_parallel_size", None),
                                             is_deepspeed=bool(cfg.deepspeed))
        expected = {"sp_size": s["sp"], "sp_backend": "deepspeed"}
        if s["dp"] > 1:
            expected["dp_replicate_size"] = s["dp"]
        want("parallelism", kwargs, expected)
    return problems


def fsdp_plugin(cfg):
    """accelerate's FSDP plugin as the Hugging Face Trainer builds it from Axolotl's fsdp_config (Axolotl's
    builder passes ``fsdp=True, fsdp_config=cfg.fsdp_config``; ``_process_fsdp_args`` makes its arguments).
    In one CPU process (the arguments' device setup would otherwise start the plan's process group), whose
    accelerate state is reset after."""
    import tempfile

    from accelerate.state import AcceleratorState
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import TrainingArguments

    world = {k: os.environ.pop(k) for k in ("WORLD_SIZE", "LOCAL_RANK", "RANK") if k in os.environ}
    try:
        with tempfile.TemporaryDirectory() as out:
            args = TrainingArguments(output_dir=out, fsdp=True, fsdp_config=dict(cfg.fsdp_config), use_cpu=True,
                                     report_to=[])
        return FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    finally:
        AcceleratorState._reset_state(True)
        os.environ.update(world)


def check(em: "matrix.Emitted", work: Path) -> List[str]:
    """Axolotl's verdict on one emitted fragment: [] when it loads and means the plan."""
    chatter = io.StringIO()
    try:
        ds = em.files.get("ds_config.json")
        ds_config = json.loads(ds.read_text()) if ds else None
        path = merged(em.files["axolotl.yaml"], em.plan, work)
        with fresh_process(em.plan), contextlib.redirect_stdout(chatter):
            return meaning(load(path, em.plan), em.plan, ds_config)
    except Exception as e:  # Axolotl refused the file (its own message), or the file is not a config
        text = " ".join(str(e).split())
        return [f"{type(e).__name__}: {text[:400]}"]


def main(argv=None) -> int:
    a = matrix.command_line("check-clients (axolotl)", __doc__.splitlines()[0], argv, ("axolotl",))
    if isinstance(a, int):
        return a
    import axolotl
    if axolotl.__version__ != VERSION:
        print(f"error: axolotl: version: expected {VERSION} (python/requirements/clients-axolotl.txt), got "
              f"{axolotl.__version__}", file=sys.stderr)
        return 2
    logging.disable(logging.WARNING)  # Axolotl's notes on every config; refusals are exceptions

    def check_one(em: "matrix.Emitted") -> Tuple[str, List[str]]:
        s = em.plan["setup"]
        layout = (f"dp {s['dp']} sp {s['sp']} ZeRO {s['zero_stage']} mb {s['micro_batch']} ga {s['grad_accum']}"
                  f"{' deepspeed' if 'ds_config.json' in em.files else ''}{' fsdp2' if s.get('fsdp2') else ''}")
        return layout, check(em, em.files["axolotl.yaml"].parent / "user")

    entries = [e for e in matrix.default_matrix() if a.only in e.name and "axolotl" in e.formats]
    return matrix.check_matrix(a.mst_plan, entries, "axolotl", a.out_dir, check_one,
                               "axolotl.yaml files", f"Axolotl {VERSION}'s load_cfg steps (prepare_plugins, "
                               "validate_config, normalize_config)")


if __name__ == "__main__":
    sys.exit(main())
