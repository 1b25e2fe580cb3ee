"""The hf-mst/1 configuration that ``mst-plan emit --format hf-mst`` writes.

Pure Python on purpose: a launcher can read and check a config before it
imports torch. Every problem is reported as one :class:`ConfigError` (a
``ValueError``) naming the source, the field and what was expected, e.g.
``mst_config.json: mlp.chunks: expected a positive integer, got 0``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Tuple, Union

FORMAT = "hf-mst/1"

PRECISIONS = ("pure-bf16", "bf16-master", "amp")
ATTENTIONS = ("flash", "sdpa", "eager")
FSDP2_GROUPS = ("mst_hf", "accelerate", "axolotl")  # whose fully_shard calls group an fsdp2 plan's parameters
MLP_IMPLS = ("loop", "tiled")
LM_HEAD_IMPLS = ("recompute", "fused")
OPTIMIZERS = ("adamw", "adamw-8bit", "sgd")
OPTIMIZER_IMPLS = ("foreach", "fused", "for-loop")
STATE_DTYPES = ("fp32", "bf16")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the source and field."""


@dataclass(frozen=True)
class MlpConfig:
    """MLP mini-sequences: ``chunks`` parts of the tokens, ``impl`` loop or tiled."""

    chunks: int
    impl: str


@dataclass(frozen=True)
class LmHeadConfig:
    """LM head + loss mini-sequences: ``impl`` recompute or fused."""

    chunks: int
    impl: str


@dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer kind, dtype of its states, whether it steps inside backward, and which of
    torch's implementations steps it (``foreach``: torch's default on GPUs, one temporary per
    state list; ``fused``: one kernel, no temporaries; ``for-loop``: one parameter at a time)."""

    name: str
    state_dtype: str
    in_backward: bool
    impl: str = "fused"


@dataclass(frozen=True)
class Predicted:
    """What mst-plan predicted for this setup, to compare a measured run against."""

    peak_allocated_bytes: int
    peak_reserved_bytes: int
    tokens_per_second: float


@dataclass(frozen=True)
class MstConfig:
    """One training setup, as planned by mst-plan (schema ``hf-mst/1``)."""

    model: str
    seq_len: int
    micro_batch: int
    grad_accum: int
    precision: str
    attention: str
    mlp: MlpConfig
    lm_head: LmHeadConfig
    checkpoint_layers: Tuple[int, ...]
    offload_checkpoints: bool
    optimizer: OptimizerConfig
    data_parallel: int
    sequence_parallel: int
    zero_stage: int
    predicted: Predicted
    format: str = FORMAT
    # ZeRO-3 as torch's FSDP2 (fully_shard) rather than DeepSpeed's engine: its parameters are plain
    # ones while a layer runs, so the patches take their one-GPU forms (optional key, false by default).
    fsdp2: bool = False
    # FSDP2 accumulating unsynced, as the Hugging Face Trainer and accelerate's accumulate() do:
    # set_requires_gradient_sync(False) before every micro-step but the last (the loop's choice, which
    # the plan predicts; optional key, false by default).
    fsdp2_no_sync: bool = False
    # fully_shard's reshard_after_forward for the decoder layers (mst_hf.shard); false keeps each whole from its
    # forward to its backward (optional key, true by default).
    fsdp2_reshard_after_forward: bool = True
    # Whose fully_shard calls group the parameters: "mst_hf" (mst_hf.shard: every decoder layer, then the
    # model, which holds the embedding, the final norm and the LM head) or "accelerate" (the Hugging Face
    # Trainer's accelerate 1.15 shards the unsharded model itself, fsdp2_prepare_model: the decoder layers,
    # the embedding, a tail of the final norm and the LM head kept whole from its forward to its backward,
    # then the model; pure-bf16 as the Trainer's bf16=False trains it, bf16-master as its bf16=True does: fp32
    # parameters under accelerate's MixedPrecisionPolicy(bf16, bf16, output bf16)). Optional key, "mst_hf" by default.
    fsdp2_groups: str = "mst_hf"

    @property
    def deepspeed_zero3(self) -> bool:
        """DeepSpeed's stage-3 engine runs the step: its parameters are gathered only inside their
        modules' forward, which the tiled MLP and the chunked loss must respect."""
        return self.zero_stage == 3 and not self.fsdp2

    @property
    def tokens_per_rank(self) -> int:
        """Tokens one rank's MLP and LM head see per micro-step: B * S / SP."""
        return self.micro_batch * self.seq_len // self.sequence_parallel

    def to_dict(self) -> Dict[str, Any]:
        """The JSON object this config was read from (same keys, same order)."""
        return {
            "format": self.format,
            "model": self.model,
            "seq_len": self.seq_len,
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "precision": self.precision,
            "attention": self.attention,
            "mlp": dataclasses.asdict(self.mlp),
            "lm_head": dataclasses.asdict(self.lm_head),
            "checkpoint_layers": list(self.checkpoint_layers),
            "offload_checkpoints": self.offload_checkpoints,
            "optimizer": dataclasses.asdict(self.optimizer),
            "data_parallel": self.data_parallel,
            "sequence_parallel": self.sequence_parallel,
            "zero_stage": self.zero_stage,
            "predicted": dataclasses.asdict(self.predicted),
            **({"fsdp2": True} if self.fsdp2 else {}),
            **({"fsdp2_no_sync": True} if self.fsdp2_no_sync else {}),
            **({} if self.fsdp2_reshard_after_forward else {"fsdp2_reshard_after_forward": False}),
            **({"fsdp2_groups": self.fsdp2_groups} if self.fsdp2_groups != "mst_hf" else {}),
        }

    def to_json(self) -> str:
        """The config as indented JSON text; ``load_config`` reads it back."""
        return json.dumps(self.to_dict(), indent=2) + "\n"


def chunk_sizes(tokens: int, chunks: int) -> List[int]:
    """Split ``tokens`` into ``chunks`` parts that differ by at most one.

    The larger parts come first and the parts add up to ``tokens``, so no token
    is ever dropped (the C++ ``mst::chunk_sizes`` rule). Raises ``ValueError``
    when ``chunks`` exceeds ``tokens``: a part would be empty.
    """
    if not _is_int(tokens) or tokens < 1:
        raise ValueError(f"chunk_sizes: tokens: expected a positive integer, got {tokens!r}")
    if not _is_int(chunks) or chunks < 1:
        raise ValueError(f"chunk_sizes: chunks: expected a positive integer, got {chunks!r}")
    if chunks > tokens:
        raise ValueError(f"chunk_sizes: chunks: expected at most the tokens ({tokens}), got {chunks}")
    base, extra = divmod(tokens, chunks)
    return [base + 1 if i < extra else base for i in range(chunks)]


def chunk_spans(tokens: int, chunks: int) -> List[Tuple[int, int]]:
    """``(start, end)`` of every part that :func:`chunk_sizes` makes, in order."""
    spans = []
    start = 0
    for size in chunk_sizes(tokens, chunks):
        spans.append((start, start + size))
        start += size
    return spans


def load_config(source: Union[str, "os.PathLike[str]", Mapping[str, Any]]) -> MstConfig:
    """Read and validate an hf-mst/1 config from a JSON file path or a mapping.

    Raises :class:`ConfigError` (a ``ValueError``) on the first problem, with a
    message ``<source>: <field>: <what was expected>``.
    """
    if isinstance(source, Mapping):
        return _parse(source, "config")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"load_config: expected a path or a mapping, got {type(source).__name__}")
    where = os.fspath(source)
    try:
        with open(where, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{where}: cannot read the file: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    return _parse(data, where)


# ---- validation -------------------------------------------------------------


def _is_int(v: Any) -> bool:
    # JSON true/false arrive as bool, a subclass of int: never a count.
    return isinstance(v, int) and not isinstance(v, bool)


class _Reader:
    """Reads the fields of one JSON object, failing with the field's full path."""

    def __init__(self, obj: Any, where: str, prefix: str = "") -> None:
        self.where = where
        self.prefix = prefix
        if not isinstance(obj, Mapping):
            self.fail("", f"expected a JSON object, got {_show(obj)}")
        self.obj = obj

    def fail(self, key: str, what: str) -> None:
        field = self.prefix + key
        raise ConfigError(f"{self.where}: {field}: {what}" if field else f"{self.where}: {what}")

    def get(self, key: str) -> Any:
        if key not in self.obj:
            self.fail(key, "missing (required)")
        return self.obj[key]

    def child(self, key: str) -> "_Reader":
        value = self.get(key)
        if not isinstance(value, Mapping):
            self.fail(key, f"expected a JSON object, got {_show(value)}")
        return _Reader(value, self.where, f"{self.prefix}{key}.")

    def int_range(self, key: str, low: int, high: Union[int, None] = None) -> int:
        v = self.get(key)
        if not _is_int(v) or v < low or (high is not None and v > high):
            if high is not None:
                expected = f"an integer from {low} to {high}"
            elif low == 1:
                expected = "a positive integer"
            elif low == 0:
                expected = "a non-negative integer"
            else:
                expected = f"an integer of at least {low}"
            self.fail(key, f"expected {expected}, got {_show(v)}")
        return v

    def number(self, key: str) -> float:
        v = self.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v < 0 or v == float("inf"):
            self.fail(key, f"expected a non-negative number, got {_show(v)}")
        return v

    def boolean(self, key: str) -> bool:
        v = self.get(key)
        if not isinstance(v, bool):
            self.fail(key, f"expected true or false, got {_show(v)}")
        return v

    def choice(self, key: str, choices: Tuple[str, ...]) -> str:
        v = self.get(key)
        if not isinstance(v, str) or v not in choices:
            listed = ", ".join(f'"{c}"' for c in choices)
            self.fail(key, f"expected one of {listed}, got {_show(v)}")
        return v

    def text(self, key: str) -> str:
        v = self.get(key)
        if not isinstance(v, str) or not v.strip():
            self.fail(key, f"expected a non-empty string, got {_show(v)}")
        return v


def _show(v: Any) -> str:
    """A value as the user wrote it in JSON, cut short if long."""
    try:
        text = json.dumps(v)
    except (TypeError, ValueError):
        text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _parse(data: Any, where: str) -> MstConfig:
    r = _Reader(data, where)
    fmt = r.get("format")
    if fmt != FORMAT:
        r.fail("format", f'expected "{FORMAT}", got {_show(fmt)}')

    model = r.text("model")
    seq_len = r.int_range("seq_len", 1)
    micro_batch = r.int_range("micro_batch", 1)
    grad_accum = r.int_range("grad_accum", 1)
    precision = r.choice("precision", PRECISIONS)
    attention = r.choice("attention", ATTENTIONS)
    data_parallel = r.int_range("data_parallel", 1)
    sequence_parallel = r.int_range("sequence_parallel", 1)
    if seq_len % sequence_parallel != 0:
        r.fail("sequence_parallel", f"expected a divisor of seq_len ({seq_len}), got {sequence_parallel}")
    zero_stage = r.int_range("zero_stage", 0, 3)
    fsdp2 = r.boolean("fsdp2") if "fsdp2" in r.obj else False
    if fsdp2 and not (zero_stage == 3 and data_parallel > 1 and sequence_parallel == 1 and precision != "amp"):
        r.fail("fsdp2", f"expected false unless zero_stage is 3 over data_parallel > 1 ranks, without sequence parallelism "
                        f"or amp (as mst-plan plans FSDP2), got true with zero_stage {zero_stage}, data_parallel "
                        f"{data_parallel}, sequence_parallel {sequence_parallel} and precision {precision}")
    fsdp2_no_sync = r.boolean("fsdp2_no_sync") if "fsdp2_no_sync" in r.obj else False
    if fsdp2_no_sync and not fsdp2:
        r.fail("fsdp2_no_sync", "expected false without fsdp2 (it is FSDP2's set_requires_gradient_sync(False) under "
                                "accumulation), got true")
    reshard = r.boolean("fsdp2_reshard_after_forward") if "fsdp2_reshard_after_forward" in r.obj else True
    if not reshard and not fsdp2:
        r.fail("fsdp2_reshard_after_forward", "expected true without fsdp2 (it is fully_shard's reshard_after_forward), "
                                              "got false")
    fsdp2_groups = r.choice("fsdp2_groups", FSDP2_GROUPS) if "fsdp2_groups" in r.obj else "mst_hf"
    if fsdp2_groups != "mst_hf" and not fsdp2:
        r.fail("fsdp2_groups", f"expected mst_hf without fsdp2 (it is whose fully_shard calls group it), got {fsdp2_groups!r}")
    if fsdp2_groups == "axolotl" and precision != "pure-bf16":
        r.fail("fsdp2_groups", f"expected pure-bf16 with axolotl (Axolotl trains the bf16 weights it loads: no fp32 master), "
                               f"got precision {precision}")
    tokens = micro_batch * seq_len // sequence_parallel

    def chunks(reader: _Reader) -> int:
        n = reader.int_range("chunks", 1)
        if n > tokens:
            reader.fail("chunks", f"expected at most the tokens per rank "
                                  f"(micro_batch x seq_len / sequence_parallel = {tokens}), got {n}")
        return n

    m = r.child("mlp")
    mlp = MlpConfig(chunks=chunks(m), impl=m.choice("impl", MLP_IMPLS))
    h = r.child("lm_head")
    lm_head = LmHeadConfig(chunks=chunks(h), impl=h.choice("impl", LM_HEAD_IMPLS))

    layers = r.get("checkpoint_layers")
    if not isinstance(layers, list) or not all(_is_int(i) and i >= 0 for i in layers):
        r.fail("checkpoint_layers", f"expected a list of non-negative layer indices, got {_show(layers)}")
    if len(set(layers)) != len(layers):
        r.fail("checkpoint_layers", f"expected each layer at most once, got {_show(layers)}")
    offload = r.boolean("offload_checkpoints")

    o = r.child("optimizer")
    optimizer = OptimizerConfig(
        name=o.choice("name", OPTIMIZERS),
        state_dtype=o.choice("state_dtype", STATE_DTYPES),
        in_backward=o.boolean("in_backward"),
        # Files written before the field existed were planned for a fused step.
        impl=o.choice("impl", OPTIMIZER_IMPLS) if "impl" in o.obj else "fused",
    )
    # Plain DDP (ZeRO 0) reduces a gradient after its AccumulateGrad hooks: the fp32 master weights
    # (which move the gradient into the master's in such a hook) and the step in backward would
    # step on this rank's unreduced gradients.
    if data_parallel > 1 and zero_stage == 0 and precision == "bf16-master":
        r.fail("precision", "expected pure-bf16 or amp with data_parallel > 1 and zero_stage 0 (the fp32 master "
                            "weights would step on gradients DDP has not reduced), got \"bf16-master\"")
    if data_parallel > 1 and zero_stage == 0 and optimizer.in_backward:
        o.fail("in_backward", "expected false with data_parallel > 1 and zero_stage 0 (a step in backward would use "
                              "gradients DDP has not reduced), got true")
    # (as mst-plan's setup: ZeRO 2 and 3 own the gradients; under ZeRO-3 the tiled MLP's chunks would
    # each step the MLP on a partial gradient)
    if zero_stage >= 2 and optimizer.in_backward:
        o.fail("in_backward", "expected false with zero_stage 2 or 3 (DeepSpeed reduce-scatters the gradients per "
                              "bucket), got true")

    if fsdp2 and optimizer.name == "sgd" and optimizer.impl == "fused":
        o.fail("impl", "expected foreach or for-loop for sgd with fsdp2 (torch's sharded parameters have no fused SGD), "
                       "got \"fused\"")

    p = r.child("predicted")
    predicted = Predicted(
        peak_allocated_bytes=p.int_range("peak_allocated_bytes", 0),
        peak_reserved_bytes=p.int_range("peak_reserved_bytes", 0),
        tokens_per_second=p.number("tokens_per_second"),
    )

    return MstConfig(
        model=model,
        seq_len=seq_len,
        micro_batch=micro_batch,
        grad_accum=grad_accum,
        precision=precision,
        attention=attention,
        mlp=mlp,
        lm_head=lm_head,
        checkpoint_layers=tuple(sorted(layers)),
        offload_checkpoints=offload,
        optimizer=optimizer,
        data_parallel=data_parallel,
        sequence_parallel=sequence_parallel,
        zero_stage=zero_stage,
        predicted=predicted,
        fsdp2=fsdp2,
        fsdp2_no_sync=fsdp2_no_sync,
        fsdp2_reshard_after_forward=reshard,
        fsdp2_groups=fsdp2_groups,
    )
