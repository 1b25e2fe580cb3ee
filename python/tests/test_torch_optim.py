"""make_optimizer: the optimizer, state dtypes and optimizer-in-backward of a config."""

import copy
import importlib.util

import pytest

torch = pytest.importorskip("torch")

import mst_hf  # noqa: E402
from mst_hf.loss import causal_lm_loss  # noqa: E402
from mst_hf.mlp import ChunkedMlpForward  # noqa: E402

HAS_HOOK_API = hasattr(torch.Tensor, "register_post_accumulate_grad_hook")
needs_hook_api = pytest.mark.skipif(not HAS_HOOK_API, reason="needs torch >= 2.1 (post-accumulate-grad hooks)")
D, V, TOKENS = 16, 32, 12
STATE_OF = {"pure-bf16": "bf16", "bf16-master": "fp32", "amp": "fp32"}
DTYPE_OF = {"pure-bf16": torch.bfloat16, "bf16-master": torch.bfloat16, "amp": torch.float32}


class GatedMlp(torch.nn.Module):
    """x: [..., D] -> [..., D], Llama's MLP shape."""

    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(D, 2 * D, bias=False)
        self.up = torch.nn.Linear(D, 2 * D, bias=False)
        self.down = torch.nn.Linear(2 * D, D)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


class TinyLm(torch.nn.Module):
    """Embedding -> tiled MLP (3 chunks) -> norm -> tied LM head with a chunked loss.

    Every MLP weight is used by three recomputed chunks and the tied embedding by
    the lookup and the LM head: optimizer-in-backward must still step each once.
    """

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(V, D)
        self.mlp = GatedMlp()
        self.norm = torch.nn.LayerNorm(D)
        ChunkedMlpForward(self.mlp, 3, "tiled").install()

    def loss(self, ids):  # ids: [1, T] -> 0-dim loss
        h = self.embed(ids)  # [1, T, D]
        h = self.norm(h + self.mlp(h))
        return causal_lm_loss(h, self.embed.weight, ids, chunks=5, impl="recompute")


def config(precision="amp", name="adamw", in_backward=False, state_dtype=None, grad_accum=1, impl="foreach"):
    return mst_hf.load_config({
        "format": "hf-mst/1", "model": "tiny", "seq_len": TOKENS, "micro_batch": 1, "grad_accum": grad_accum,
        "precision": precision, "attention": "flash",
        "mlp": {"chunks": 1, "impl": "loop"}, "lm_head": {"chunks": 1, "impl": "recompute"},
        "checkpoint_layers": [], "offload_checkpoints": False,
        "optimizer": {"name": name, "state_dtype": state_dtype or STATE_OF[precision], "in_backward": in_backward,
                      "impl": impl},
        "data_parallel": 1, "sequence_parallel": 1, "zero_stage": 0,
        "predicted": {"peak_allocated_bytes": 0, "peak_reserved_bytes": 0, "tokens_per_second": 0},
    })


def tiny(precision="amp"):
    torch.manual_seed(0)
    return TinyLm().to(DTYPE_OF[precision])


def ids():
    return torch.randint(0, V, (1, TOKENS), generator=torch.Generator().manual_seed(3))


def train_step(model, optimizer):
    model.loss(ids()).backward()
    optimizer.step()
    optimizer.zero_grad()


def test_adamw_is_torch_adamw_with_states_in_the_parameter_dtype():
    model = tiny("pure-bf16")
    opt = mst_hf.make_optimizer(model, config("pure-bf16"), lr=1e-2)
    assert isinstance(opt, torch.optim.AdamW)
    train_step(model, opt)
    states = [s for s in opt.state.values()]
    assert states and all(s["exp_avg"].dtype == torch.bfloat16 for s in states)


@pytest.mark.parametrize("name, impl, flags", [
    ("adamw", "foreach", {"foreach": True, "fused": None}),
    ("adamw", "fused", {"foreach": None, "fused": True}),
    ("adamw", "for-loop", {"foreach": False, "fused": None}),
    ("sgd", "foreach", {"foreach": True, "fused": None}),
    ("sgd", "for-loop", {"foreach": False, "fused": None}),
])
def test_the_implementation_is_the_one_the_config_names(name, impl, flags):
    # torch picks its implementation from these two flags (torch/optim/adamw.py, sgd.py); the
    # plan's memory differs by it (foreach holds a copy of a whole state list at once).
    opt = mst_hf.make_optimizer(tiny(), config(name=name, impl=impl), lr=1e-2)
    assert {k: opt.defaults[k] for k in flags} == flags


def test_sgd_has_momentum():
    model = tiny()
    opt = mst_hf.make_optimizer(model, config(name="sgd"), lr=1e-2, momentum=0.8)
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["momentum"] == 0.8
    train_step(model, opt)
    assert all(s["momentum_buffer"].dtype == torch.float32 for s in opt.state.values())


def test_bf16_master_updates_fp32_masters_and_copies_them_back():
    # Reference written out by hand: AdamW on an fp32 copy with the bf16 gradient
    # upcast, then the result rounded to bf16.
    model = tiny("bf16-master")
    twin = copy.deepcopy(model)
    opt = mst_hf.make_optimizer(model, config("bf16-master"), lr=1e-2, weight_decay=0.1)
    assert isinstance(opt, mst_hf.MasterWeightOptimizer)
    train_step(model, opt)

    twin.loss(ids()).backward()
    for p_model, p_twin in zip(model.parameters(), twin.parameters()):
        master = p_twin.detach().float().clone()
        master.grad = p_twin.grad.float()
        ref = torch.optim.AdamW([master], lr=1e-2, weight_decay=0.1)
        ref.step()
        assert p_model.dtype == torch.bfloat16
        torch.testing.assert_close(p_model, master.to(torch.bfloat16), rtol=0, atol=0)
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())
    assert all(p.grad is None for p in model.parameters())


def test_bf16_master_clips_the_fp32_master_gradients():
    model = tiny("bf16-master")
    opt = mst_hf.make_optimizer(model, config("bf16-master"), lr=1e-2)
    model.loss(ids()).backward()
    norm = opt.clip_grad_norm_(1e-3)
    assert norm > 1e-3
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(m.grad) for m in opt.masters]))
    torch.testing.assert_close(clipped, torch.tensor(1e-3), rtol=1e-3, atol=0)


@needs_hook_api
def test_bf16_master_keeps_fp32_gradients_between_backward_and_step():
    model = tiny("bf16-master")
    opt = mst_hf.make_optimizer(model, config("bf16-master"), lr=1e-2)
    model.loss(ids()).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(m.grad is not None and m.grad.dtype == torch.float32 for m in opt.masters)


@needs_hook_api
@pytest.mark.parametrize("precision,name", [("amp", "adamw"), ("amp", "sgd"), ("pure-bf16", "adamw"),
                                            ("bf16-master", "adamw"), ("bf16-master", "sgd")])
def test_optimizer_in_backward_lands_on_the_same_parameters_as_a_normal_step(precision, name):
    normal, stepped = tiny(precision), tiny(precision)
    opt_normal = mst_hf.make_optimizer(normal, config(precision, name), lr=1e-2, weight_decay=0.1)
    opt_in_backward = mst_hf.make_optimizer(stepped, config(precision, name, in_backward=True), lr=1e-2,
                                            weight_decay=0.1)
    assert isinstance(opt_in_backward, mst_hf.InBackwardOptimizer)
    for _ in range(2):
        train_step(normal, opt_normal)
        stepped.loss(ids()).backward()
        assert all(p.grad is None for p in stepped.parameters())  # stepped and freed inside backward
        opt_in_backward.step()
        opt_in_backward.zero_grad()
    for a, b in zip(stepped.parameters(), normal.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@needs_hook_api
def test_optimizer_in_backward_exposes_every_group_and_its_state():
    model = tiny()
    opt = mst_hf.make_optimizer(model, config(in_backward=True), lr=1e-2)
    assert len(opt.param_groups) == len(list(model.parameters()))
    for group in opt.param_groups:
        group["lr"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    model.loss(ids()).backward()
    for a, b in zip(model.parameters(), before):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # lr 0 reached every per-parameter optimizer
    state = opt.state_dict()
    twin = mst_hf.make_optimizer(tiny(), config(in_backward=True), lr=1e-2)
    twin.load_state_dict(state)
    assert twin.state_dict()["per_parameter"][0]["state"][0]["step"] == 1
    opt.remove_hooks()
    model.loss(ids()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_optimizer_in_backward_refuses_gradient_accumulation():
    with pytest.raises(ValueError, match="grad_accum: .*expected 1, got 4"):
        mst_hf.make_optimizer(tiny(), config(in_backward=True, grad_accum=4), lr=1e-2)


@pytest.mark.parametrize("precision,state_dtype,match", [
    ("pure-bf16", "fp32", 'expected "bf16".*use precision "bf16-master"'),
    ("amp", "bf16", 'expected "fp32"'),
    ("bf16-master", "bf16", 'expected "fp32"'),
])
def test_a_state_dtype_torch_cannot_keep_is_refused(precision, state_dtype, match):
    with pytest.raises(ValueError, match="optimizer.state_dtype: " + match):
        mst_hf.make_optimizer(tiny(precision), config(precision, state_dtype=state_dtype), lr=1e-2)


def test_parameters_in_the_wrong_dtype_are_refused():
    with pytest.raises(ValueError, match='precision: "pure-bf16" trains bfloat16 parameters'):
        mst_hf.make_optimizer(tiny("amp"), config("pure-bf16"), lr=1e-2)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_adamw_8bit_without_bitsandbytes_says_what_to_install():
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        mst_hf.make_optimizer(tiny(), config(name="adamw-8bit"), lr=1e-2)


def test_a_model_without_trainable_parameters_is_refused():
    model = tiny().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        mst_hf.make_optimizer(model, config(), lr=1e-2)
