"""mst-plan's ring-attention rule (sp_impl ring) against PyTorch's own ring attention.

mst_referee.ring runs torch 2.15's ``_templated_ring_attention`` and its backward (what PyTorch's
context parallelism calls, as accelerate's cp_backend "torch" runs it) for one layer on one rank, on
fake tensors and a fake process group of sp ranks, and records every storage; ``mst-plan estimate
--ring-rank R --timeline`` walks the same layer on the same rank. For every rank, the events of the
simulator's ``attn.ring`` op in layer 0 must be the referee's, allocation by allocation and free by
free. (Ranks differ: rank r's steps after r merge half-size blocks, and which tensors stay
contiguous follows; the simulator walks every rank.)
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from mst_referee import ring  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _binary():
    path = Path(os.environ.get("MST_PLAN", REPO / "build" / "src" / "mst-plan"))
    return path if path.is_file() else None


def _model(path: Path, heads: int, kv_heads: int, head_dim: int) -> Path:
    path.write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": heads * head_dim, "intermediate_size": 3 * heads * head_dim, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "num_hidden_layers": 2, "vocab_size": 512, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 1 << 20, "tie_word_embeddings": False}))
    return path


def _simulated(tmp_path: Path, sp: int, rank: int, batch: int, heads: int, kv_heads: int, seq: int, head_dim: int):
    """(forward events, backward events) of layer 0's attn.ring in mst-plan's timeline of `rank`."""
    model = _model(tmp_path / "model.json", heads, kv_heads, head_dim)
    timeline = tmp_path / "timeline.json"
    run = subprocess.run([str(_binary()), "estimate", "--model", str(model), "--runtime", "kernels", "--seq", str(seq),
                          "--batch", str(batch), "--sp", str(sp), "--sp-impl", "ring", "--ring-rank", str(rank),
                          "--timeline", str(timeline)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    t = json.loads(timeline.read_text())
    assert t["rank"] == rank
    phases = {"forward": [], "backward": []}
    for kind, _tensor, nbytes, _cat, device, phase, layer, micro, op, _name in t["events"]:
        if op == "attn.ring" and layer == 0 and micro == 0 and device == "gpu" and phase in phases:
            phases[phase].append(nbytes if kind == "alloc" else -nbytes)
    return phases["forward"], phases["backward"]


# (sp, batch, heads, kv_heads, seq, head_dim): grouped and plain attention, one and several
# sequences, one key head (whose transposes are contiguous: no copies), the smallest halves.
CASES = [
    (2, 1, 8, 2, 512, 128),
    (2, 2, 4, 4, 256, 64),
    (3, 1, 4, 2, 768, 64),
    (4, 2, 8, 1, 512, 32),
    (4, 1, 2, 2, 16, 16),
    (8, 3, 4, 2, 2048, 80),
    (5, 3, 4, 1, 640, 256),
]


@pytest.mark.skipif(_binary() is None, reason="mst-plan is not built (set MST_PLAN or build/)")
@pytest.mark.parametrize("sp, batch, heads, kv_heads, seq, head_dim", CASES)
def test_the_ring_rule_equals_torchs_ring_attention_event_by_event(tmp_path, sp, batch, heads, kv_heads, seq, head_dim):
    for rank in range(sp):
        forward, backward = _simulated(tmp_path, sp, rank, batch, heads, kv_heads, seq, head_dim)
        fwd, bwd = ring.record(sp, rank, batch, heads, kv_heads, seq // sp, head_dim)
        assert forward == fwd.events, (rank, list(zip(fwd.events, fwd.names)))
        # After torch's function returns, the flash node lets go of what it saved and of the output's
        # gradient: frees of tensors that existed before the call, the simulator's last events.
        assert backward[: len(bwd.events)] == bwd.events, (rank, list(zip(bwd.events, bwd.names)))
        assert all(b < 0 for b in backward[len(bwd.events):])
