"""Chunked MLP and LM-head loss against the plain computation, on raw tensors.

Tolerance: fp32 with rtol 1e-5, atol 1e-6. Chunking only reorders sums (of at
most 26 tokens per weight-gradient entry, of V = 128 terms per softmax), whose
fp32 rounding error is a few 1e-7 relative; 1e-5 leaves room for that and
catches any real difference (a dropped token or a wrong scale is >= 1e-2).
"""

import copy

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from mst_hf.loss import causal_lm_loss  # noqa: E402
from mst_hf.mlp import ChunkedMlpForward  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6
B, S, D, I, V = 2, 13, 16, 40, 128  # B * S = 26 tokens: uneven chunks for 3, 5, 7
HAS_HOOK_API = hasattr(torch.Tensor, "register_post_accumulate_grad_hook")


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)


class GatedMlp(torch.nn.Module):
    """Llama's MLP: down(silu(gate(x)) * up(x)). x: [..., D] -> [..., D]."""

    def __init__(self):
        super().__init__()
        self.gate_proj = torch.nn.Linear(D, I, bias=False)
        self.up_proj = torch.nn.Linear(D, I, bias=False)
        self.down_proj = torch.nn.Linear(I, D, bias=True)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def mlp_pair(impl, chunks):
    torch.manual_seed(0)
    plain = GatedMlp()
    chunked = copy.deepcopy(plain)
    ChunkedMlpForward(chunked, chunks, impl).install()
    return plain, chunked


def grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("impl", ["loop", "tiled"])
@pytest.mark.parametrize("chunks", [1, 2, 3, 5, 26, 40])
def test_chunked_mlp_matches_the_plain_mlp(impl, chunks):
    plain, chunked = mlp_pair(impl, chunks)
    x = torch.randn(B, S, D)
    dy = torch.randn(B, S, D)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    y_plain, y_chunked = plain(xs[0]), chunked(xs[1])
    assert y_chunked.shape == (B, S, D)
    close(y_chunked, y_plain)
    (y_plain * dy).sum().backward()
    (y_chunked * dy).sum().backward()
    close(xs[1].grad, xs[0].grad)
    for name, g in grads(plain).items():
        close(grads(chunked)[name], g)


@pytest.mark.parametrize("impl", ["loop", "tiled"])
def test_chunked_mlp_with_a_frozen_input_and_a_frozen_weight(impl):
    plain, chunked = mlp_pair(impl, 3)
    for m in (plain, chunked):
        m.up_proj.weight.requires_grad_(False)
    x = torch.randn(B, S, D)
    plain(x).square().sum().backward()
    chunked(x).square().sum().backward()
    assert chunked.up_proj.weight.grad is None
    for name in ("gate_proj.weight", "down_proj.weight", "down_proj.bias"):
        close(dict(chunked.named_parameters())[name].grad, dict(plain.named_parameters())[name].grad)


@pytest.mark.parametrize("impl", ["loop", "tiled"])
def test_chunked_mlp_without_autograd_and_with_fewer_tokens_than_chunks(impl):
    plain, chunked = mlp_pair(impl, 8)
    with torch.no_grad():
        x = torch.randn(B, S, D)
        close(chunked(x), plain(x))
        one = torch.randn(1, 1, D)  # a decoding step: one token, eight chunks
        close(chunked(one), plain(one))


@pytest.mark.parametrize("impl", ["loop", "tiled"])
def test_chunked_mlp_under_checkpointing(impl):
    from torch.utils.checkpoint import checkpoint

    plain, chunked = mlp_pair(impl, 5)
    x = torch.randn(B, S, D)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    plain(xs[0]).square().sum().backward()
    checkpoint(chunked, xs[1], use_reentrant=False).square().sum().backward()
    close(xs[1].grad, xs[0].grad)
    for name, g in grads(plain).items():
        close(grads(chunked)[name], g)


@pytest.mark.skipif(not HAS_HOOK_API, reason="needs Tensor.register_post_accumulate_grad_hook (torch >= 2.1)")
@pytest.mark.parametrize("impl", ["loop", "tiled"])
def test_each_mlp_weight_gradient_is_accumulated_once_per_backward(impl):
    # Optimizer-in-backward and DDP step or reduce on every accumulation: the
    # chunks' gradients must arrive summed, not one accumulation per chunk.
    _, chunked = mlp_pair(impl, 5)
    calls = {n: 0 for n, _ in chunked.named_parameters()}
    for n, p in chunked.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _p, n=n: calls.__setitem__(n, calls[n] + 1))
    chunked(torch.randn(B, S, D, requires_grad=True)).sum().backward()
    assert calls == {n: 1 for n in calls}


# ---- LM head + loss --------------------------------------------------------------


def reference_loss(hidden, weight, labels, softcap=None, num_items_in_batch=None):
    """Hugging Face ForCausalLMLoss on the full logits. hidden: [B, S, d], labels: [B, S]."""
    logits = (hidden @ weight.t()).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
    if num_items_in_batch is None:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100,
                            reduction="sum")
    return total / num_items_in_batch


def head_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, D, generator=g)
    weight = torch.randn(V, D, generator=g) * 0.5
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, 3:6] = -100  # ignored targets inside a sequence
    labels[1, 0] = -100  # never a target: position 0 is only an input
    return hidden, weight, labels


def loss_and_grads(fn, hidden, weight, labels, scale=1.0, **kwargs):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss = fn(h, w, labels, **kwargs)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("impl", ["recompute", "fused"])
@pytest.mark.parametrize("chunks", [1, 2, 3, 7, 26])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_chunked_loss_matches_the_full_logits_loss(impl, chunks, softcap):
    hidden, weight, labels = head_inputs()
    expected = loss_and_grads(reference_loss, hidden, weight, labels, softcap=softcap)
    actual = loss_and_grads(causal_lm_loss, hidden, weight, labels, chunks=chunks, impl=impl, softcap=softcap)
    assert actual[0].dtype == torch.float32
    for a, e in zip(actual, expected):
        close(a, e)


def test_the_softcap_changes_the_result():
    # The tests above would not notice a missing softcap if it did nothing at this scale.
    hidden, weight, labels = head_inputs()
    assert not torch.allclose(reference_loss(hidden, weight, labels, softcap=2.0),
                              reference_loss(hidden, weight, labels), rtol=1e-2)


@pytest.mark.parametrize("impl", ["recompute", "fused"])
def test_every_token_counts_when_the_chunks_do_not_divide_the_tokens(impl):
    # 26 tokens in 7 chunks of 4,4,4,4,4,3,3. Only the last token (of sequence 1,
    # in the last chunk) is changed: the loss must see it.
    hidden, weight, labels = head_inputs()
    labels[1, -1] = 5
    base = causal_lm_loss(hidden, weight, labels, chunks=7, impl=impl)
    labels[1, -1] = 6
    moved = causal_lm_loss(hidden, weight, labels, chunks=7, impl=impl)
    assert not torch.equal(base, moved)
    close(moved, reference_loss(hidden, weight, labels))


@pytest.mark.parametrize("impl", ["recompute", "fused"])
def test_a_scaled_loss_scales_the_gradients(impl):
    hidden, weight, labels = head_inputs()
    expected = loss_and_grads(reference_loss, hidden, weight, labels, scale=0.25)
    actual = loss_and_grads(causal_lm_loss, hidden, weight, labels, scale=0.25, chunks=3, impl=impl)
    for a, e in zip(actual, expected):
        close(a, e)


@pytest.mark.parametrize("impl", ["recompute", "fused"])
def test_num_items_in_batch_replaces_the_count(impl):
    hidden, weight, labels = head_inputs()
    expected = loss_and_grads(reference_loss, hidden, weight, labels, num_items_in_batch=40)
    actual = loss_and_grads(causal_lm_loss, hidden, weight, labels, chunks=3, impl=impl,
                            num_items_in_batch=torch.tensor(40))
    for a, e in zip(actual, expected):
        close(a, e)


@pytest.mark.parametrize("impl", ["recompute", "fused"])
def test_preshifted_labels_give_the_same_loss(impl):
    hidden, weight, labels = head_inputs()
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
    close(causal_lm_loss(hidden, weight, shift_labels=shifted, chunks=5, impl=impl),
          reference_loss(hidden, weight, labels))


def test_the_loss_without_autograd_matches():
    hidden, weight, labels = head_inputs()
    with torch.no_grad():
        close(causal_lm_loss(hidden, weight, labels, chunks=7, softcap=2.0),
              reference_loss(hidden, weight, labels, softcap=2.0))


@pytest.mark.parametrize("impl", ["recompute", "fused"])
def test_only_the_weight_may_need_a_gradient(impl):
    hidden, weight, labels = head_inputs()
    w0, w1 = (weight.clone().requires_grad_(True) for _ in range(2))
    reference_loss(hidden, w0, labels).backward()
    causal_lm_loss(hidden, w1, labels, chunks=3, impl=impl).backward()
    close(w1.grad, w0.grad)


@pytest.mark.parametrize("impl", ["recompute", "fused"])
def test_no_valid_target_gives_nan_like_hugging_face(impl):
    hidden, weight, labels = head_inputs()
    labels.fill_(-100)
    assert torch.isnan(reference_loss(hidden, weight, labels))
    assert torch.isnan(causal_lm_loss(hidden, weight, labels, chunks=3, impl=impl))


def test_mismatched_labels_are_refused():
    hidden, weight, labels = head_inputs()
    with pytest.raises(ValueError, match="labels hold 24 tokens, hidden states 26"):
        causal_lm_loss(hidden, weight, labels[:, :12], chunks=2)
    with pytest.raises(ValueError, match="lm_head.impl"):
        causal_lm_loss(hidden, weight, labels, chunks=2, impl="liger")


@pytest.mark.skipif(not hasattr(torch, "bfloat16"), reason="no bfloat16")
@pytest.mark.parametrize("impl", ["recompute", "fused"])
def test_bf16_inputs_stay_close_to_the_fp32_loss(impl):
    # bf16: logits rounded to bf16 before the fp32 upcast as in Hugging Face, and
    # gradients accumulated in bf16 over the chunks: agree to bf16 precision.
    hidden, weight, labels = head_inputs()
    loss, dh, dw = loss_and_grads(causal_lm_loss, hidden.bfloat16(), weight.bfloat16(), labels, chunks=7, impl=impl)
    ref_loss, ref_dh, ref_dw = loss_and_grads(reference_loss, hidden.bfloat16(), weight.bfloat16(), labels)
    assert dh.dtype == torch.bfloat16 and dw.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(dh.float(), ref_dh.float(), rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(dw.float(), ref_dw.float(), rtol=2e-2, atol=2e-3)


# ---- what each implementation keeps for backward (the simulator's memory rules) ---


def saved_bytes(fn, *keep_out):
    """Bytes of the tensors autograd saves while ``fn()`` runs, parameters not counted."""
    params = {t.data_ptr() for t in keep_out}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_the_loop_mlp_saves_as_much_as_the_plain_mlp_and_the_tiled_mlp_only_its_input():
    plain, loop = mlp_pair("loop", 5)
    _, tiled = mlp_pair("tiled", 5)
    x = torch.randn(B, S, D, requires_grad=True)
    weights = [p for p in plain.parameters()] + [p for p in loop.parameters()] + [p for p in tiled.parameters()]
    plain_bytes = saved_bytes(lambda: plain(x), *weights)
    assert plain_bytes > 4 * B * S * I * 4  # the [T, I] intermediates dominate
    assert saved_bytes(lambda: loop(x), *weights) == plain_bytes
    assert saved_bytes(lambda: tiled(x), *weights) == B * S * D * 4  # x [T, d] in fp32


def test_the_recompute_loss_saves_only_hidden_and_targets_and_the_fused_loss_its_gradients():
    hidden, weight, labels = head_inputs()
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    tokens = B * S
    recompute = saved_bytes(lambda: causal_lm_loss(h, w, labels, chunks=7, impl="recompute"), w)
    assert recompute == tokens * D * 4 + tokens * 8 + 4  # hidden fp32, targets int64, the count
    fused = saved_bytes(lambda: causal_lm_loss(h, w, labels, chunks=7, impl="fused"), w)
    assert fused == tokens * D * 4 + V * D * 4  # d_hidden and d_weight
    full = saved_bytes(lambda: F.cross_entropy((h @ w.t()).reshape(-1, V), labels.reshape(-1)), w)
    assert full >= tokens * V * 4  # the unchunked loss keeps [T, V] log-probabilities


# ---- autocast (precision "amp"): bf16 matmuls on fp32 parameters ------------------


@pytest.mark.parametrize("impl", ["loop", "tiled"])
def test_chunked_mlp_under_autocast_recomputes_in_bf16(impl):
    plain, chunked = mlp_pair(impl, 3)
    seen = []  # dtype of every gate_proj output: the forward's chunks, then the tiled recompute's
    chunked.gate_proj.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    x0 = torch.randn(B, S, D)
    results = []
    for model in (plain, chunked):
        x = x0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        results.append((y.detach().float(), x.grad.clone(), model.gate_proj.weight.grad.clone()))
    assert seen == [torch.bfloat16] * (6 if impl == "tiled" else 3)
    for a, e in zip(results[1], results[0]):
        # bf16 matmuls summed in another order (and, tiled, weight gradients summed over
        # the chunks in fp32 rather than bf16): equal to bf16 precision.
        torch.testing.assert_close(a, e, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("impl", ["recompute", "fused"])
def test_chunked_loss_under_autocast_matches_the_autocast_reference(impl):
    hidden, weight, labels = head_inputs()
    out = []
    for fn, kwargs in ((reference_loss, {}), (causal_lm_loss, {"chunks": 7, "impl": impl})):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(h, w, labels, **kwargs)
        loss.backward()
        assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
        out.append((loss.detach(), h.grad, w.grad))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-4, atol=1e-4)  # same bf16 logits, fp32 loss
    torch.testing.assert_close(out[1][1], out[0][1], rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(out[1][2], out[0][2], rtol=2e-2, atol=2e-3)
