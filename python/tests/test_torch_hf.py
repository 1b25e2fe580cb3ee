"""A patched Hugging Face model trains exactly like the unpatched one.

Tiny random Llama, Gemma-2, Phi-3, Mixtral, Qwen3-MoE and gpt-oss models (hidden 64, 2 layers,
vocab 128) in fp32,
so precision "amp" (fp32 parameters; no autocast is entered here). Tolerance
fp32 rtol 1e-5, atol 1e-6: chunking and recomputation only reorder fp32 sums
over at most 26 tokens or 128 classes (errors of a few 1e-7 relative), while a
real mistake (a dropped token, a wrong scale or softcap) moves results by 1e-2.
"""

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mst_hf  # noqa: E402
from mst_hf.checkpoint import CheckpointedForward  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6
B, S, VOCAB = 2, 13, 128  # 26 tokens: chunks of 3, 5 and 7 leave an uneven last chunk


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)


def tiny_llama():
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).float().train()


def tiny_gemma2():
    # A small softcap so that tanh is far from linear at these logit sizes (Gemma-2 uses 30).
    config = transformers.Gemma2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=64,
        final_logit_softcapping=0.5, attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.Gemma2ForCausalLM(config).float().train()


def tiny_phi3():
    # Fused qkv_proj and gate_up_proj; 3/4 of each head rotated (the rest concatenated back).
    config = transformers.Phi3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, partial_rotary_factor=0.75,
        pad_token_id=None, attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.Phi3ForCausalLM(config).float().train()


def tiny_mixtral():
    # Mixture-of-Experts: 4 experts, top-2 renormalised, fp32 routing weights. MsT splits the
    # tokens before the router; every token is routed on its own, so the chunks change nothing.
    config = transformers.MixtralConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, num_local_experts=4,
        num_experts_per_tok=2, attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config).float().train()


def tiny_qwen3_moe():
    # Qwen3-MoE: 8 experts, top-3 without renormalisation, q/k norms.
    config = transformers.Qwen3MoeConfig(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=VOCAB,
        max_position_embeddings=64, num_experts=8, num_experts_per_tok=3, norm_topk_prob=False,
        attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM(config).float().train()


def tiny_gpt_oss():
    # gpt-oss: 8 biased experts, top-3 (softmax over the top-3 logits), the clamped activation, its
    # block returning (output, router scores); attention sinks, a sliding and a full layer.
    config = transformers.GptOssConfig(
        hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=64,
        num_local_experts=8, num_experts_per_tok=3, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(config).float().train()
    with torch.no_grad():  # its init leaves the biases zero: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.02)
    return model


MODELS = {"llama": tiny_llama, "gemma2": tiny_gemma2, "phi3": tiny_phi3, "mixtral": tiny_mixtral,
          "qwen3_moe": tiny_qwen3_moe, "gpt_oss": tiny_gpt_oss}


def mst_config(mlp=(1, "loop"), lm_head=(1, "recompute"), checkpoint=(), offload=False, **overrides):
    data = {
        "format": "hf-mst/1", "model": "tiny", "seq_len": S, "micro_batch": B, "grad_accum": 1,
        "precision": "amp", "attention": "eager",
        "mlp": {"chunks": mlp[0], "impl": mlp[1]},
        "lm_head": {"chunks": lm_head[0], "impl": lm_head[1]},
        "checkpoint_layers": list(checkpoint), "offload_checkpoints": offload,
        "optimizer": {"name": "adamw", "state_dtype": "fp32", "in_backward": False},
        "data_parallel": 1, "sequence_parallel": 1, "zero_stage": 0,
        "predicted": {"peak_allocated_bytes": 0, "peak_reserved_bytes": 0, "tokens_per_second": 0},
    }
    data.update(overrides)
    return mst_hf.load_config(data)


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, S), generator=g)
    labels = ids.clone()
    labels[0, 4:7] = -100  # e.g. a masked prompt
    labels[1, -2:] = -100  # padding at the end
    return ids, labels


def loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_training(family, config, base=None):
    base = MODELS[family]() if base is None else base
    patched = mst_hf.apply(copy.deepcopy(base), config)
    ids, labels = batch()
    ref_loss, ref_grads = loss_and_grads(base, ids, labels)
    loss, grads = loss_and_grads(patched, ids, labels)
    close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        close(grads[name], g)


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("impl", ["loop", "tiled"])
@pytest.mark.parametrize("chunks", [2, 3, 5])
def test_mlp_mini_sequences_train_like_the_original(family, impl, chunks):
    assert_same_training(family, mst_config(mlp=(chunks, impl)))


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("impl", ["recompute", "fused"])
@pytest.mark.parametrize("chunks", [2, 3, 7])
def test_lm_head_mini_sequences_train_like_the_original(family, impl, chunks):
    assert_same_training(family, mst_config(lm_head=(chunks, impl)))


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("mlp,lm_head", [((3, "loop"), (7, "recompute")), ((5, "tiled"), (3, "fused")),
                                         ((2, "tiled"), (2, "recompute"))])
@pytest.mark.parametrize("checkpoint,offload", [((), False), ((0, 1), False), ((1,), False), ((0, 1), True)])
def test_everything_together_with_and_without_checkpointing(family, mlp, lm_head, checkpoint, offload):
    assert_same_training(family, mst_config(mlp=mlp, lm_head=lm_head, checkpoint=checkpoint, offload=offload))


@pytest.mark.parametrize("family", MODELS)
def test_checkpointing_alone_trains_like_the_original(family):
    assert_same_training(family, mst_config(checkpoint=(0,)))


def test_only_the_listed_layers_are_checkpointed():
    model = mst_hf.apply(tiny_llama(), mst_config(checkpoint=(1,)))
    layers = model.model.layers
    assert "forward" not in vars(layers[0])
    assert isinstance(vars(layers[1])["forward"], CheckpointedForward)


def test_chunks_of_one_leave_the_model_untouched():
    model = mst_hf.apply(tiny_llama(), mst_config())
    assert "forward" not in vars(model)
    assert "forward" not in vars(model.lm_head)
    assert all("forward" not in vars(layer.mlp) and "forward" not in vars(layer) for layer in model.model.layers)
    assert mst_hf.applied_config(model) == mst_config()


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_the_patched_loss_returns_no_logits_and_keeps_other_outputs(zero_stage):
    base = tiny_llama()
    patched = mst_hf.apply(copy.deepcopy(base), mst_config(lm_head=(3, "recompute"), zero_stage=zero_stage))
    ids, labels = batch()
    out = patched(input_ids=ids, labels=labels, output_hidden_states=True)
    ref = base(input_ids=ids, labels=labels, output_hidden_states=True)
    assert out.logits is None
    close(out.loss, ref.loss)
    assert len(out.hidden_states) == len(ref.hidden_states)
    loss, *rest = patched(input_ids=ids, labels=labels, return_dict=False)
    close(loss, ref.loss)
    # as transformers makes the tuple: None entries left out, the logits too
    assert len(rest) == 0
    assert len(patched(input_ids=ids, labels=labels, return_dict=False, output_hidden_states=True)) == 2


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("zero_stage", [0, 3])
def test_a_router_loss_joins_the_patched_loss_as_it_joins_the_models_own(family, zero_stage):
    base = MODELS[family]()
    base.config.output_router_logits = True
    patched = mst_hf.apply(copy.deepcopy(base), mst_config(lm_head=(3, "fused"), zero_stage=zero_stage))
    ids, labels = batch()
    ref_loss, ref_grads = loss_and_grads(base, ids, labels)
    loss, grads = loss_and_grads(patched, ids, labels)
    assert not torch.allclose(ref_loss, base(input_ids=ids, labels=labels, output_router_logits=False).loss)
    close(loss, ref_loss)
    for name, g in ref_grads.items():
        close(grads[name], g)
    tupled = patched(input_ids=ids, labels=labels, return_dict=False)
    ref = base(input_ids=ids, labels=labels, return_dict=False)
    close(tupled[0], ref[0])
    close(tupled[1], ref[1])  # the router loss itself, where the model puts it


def test_without_labels_the_model_still_returns_logits():
    base = tiny_llama().eval()
    patched = mst_hf.apply(copy.deepcopy(base), mst_config(mlp=(3, "tiled"), lm_head=(3, "fused")))
    ids, _ = batch()
    with torch.no_grad():
        close(patched(input_ids=ids).logits, base(input_ids=ids).logits)


def test_num_items_in_batch_is_honoured_like_hugging_face():
    base = tiny_llama()
    patched = mst_hf.apply(copy.deepcopy(base), mst_config(lm_head=(7, "fused")))
    ids, labels = batch()
    ref = base(input_ids=ids, labels=labels).loss
    valid = int((labels[:, 1:] != -100).sum())
    out = patched(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(2 * valid)).loss
    close(out, ref / 2)


def test_a_deep_copy_of_a_patched_model_runs_on_its_own_weights():
    patched = mst_hf.apply(tiny_llama(), mst_config(mlp=(3, "loop"), lm_head=(3, "recompute"), checkpoint=(0,)))
    twin = copy.deepcopy(patched)
    assert twin.forward.module is twin
    assert twin.model.layers[0].mlp.forward.module is twin.model.layers[0].mlp
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    ids, labels = batch()
    assert not torch.allclose(twin(input_ids=ids, labels=labels).loss, patched(input_ids=ids, labels=labels).loss)


def test_applying_twice_is_refused():
    model = mst_hf.apply(tiny_llama(), mst_config(mlp=(2, "loop")))
    with pytest.raises(RuntimeError, match="already patched"):
        mst_hf.apply(model, mst_config(mlp=(2, "loop")))


def test_a_model_in_the_wrong_dtype_is_refused_before_any_change():
    model = tiny_llama()
    with pytest.raises(ValueError, match='precision: "pure-bf16" trains bfloat16 parameters.*float32'):
        mst_hf.apply(model, mst_config(mlp=(2, "loop"), precision="pure-bf16",
                                       optimizer={"name": "adamw", "state_dtype": "bf16", "in_backward": False}))
    assert "forward" not in vars(model.model.layers[0].mlp)
    assert mst_hf.applied_config(model) is None


def test_a_checkpoint_layer_beyond_the_model_is_refused():
    with pytest.raises(ValueError, match=r"checkpoint_layers: expected layer indices below 2 .*got \[2\]"):
        mst_hf.apply(tiny_llama(), mst_config(checkpoint=(0, 2)))


def test_hugging_face_checkpointing_of_all_layers_is_refused():
    model = tiny_llama()
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient_checkpointing_disable"):
        mst_hf.apply(model, mst_config(checkpoint=(0,)))


@pytest.mark.parametrize("family", ["llama", "phi3", "mixtral"])
@pytest.mark.parametrize("impl", ["recompute", "fused"])
def test_under_zero3_the_loss_inside_lm_head_trains_like_the_original(family, impl):
    assert_same_training(family, mst_config(lm_head=(3, impl), checkpoint=(1,), zero_stage=3))


class _Partitioned:
    """ZeRO-3's contract for one module, as DeepSpeed's hooks keep it (parameter_offload.py): the
    weight's storage exists only from the module's pre-forward hook to its post-forward hook, and
    again from its output's gradient (pre-backward) to its input's (post-backward). Outside, the
    parameter holds an empty tensor, so a read of it there fails."""

    def __init__(self, module):
        self.weight = module.weight
        self.full = module.weight.data
        self.gathers = []
        self.release()
        module.register_forward_pre_hook(self.pre_forward)
        module.register_forward_hook(self.post_forward)

    def gather(self, when):
        self.weight.data = self.full
        self.gathers.append(when)

    def release(self):
        self.weight.data = torch.empty(0, dtype=self.full.dtype)

    def pre_forward(self, module, inputs):
        self.gather("forward")
        return tuple(_Hook.apply(x, self.release) for x in inputs)  # released after the input's gradient

    def post_forward(self, module, inputs, output):
        self.release()
        return _Hook.apply(output, lambda: self.gather("backward"))  # gathered before the output's gradient


class _Hook(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, on_backward):
        ctx.on_backward = on_backward
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.on_backward()
        return g, None


@pytest.mark.parametrize("impl", ["recompute", "fused"])
def test_under_zero3_the_loss_reads_lm_head_only_while_it_is_gathered(impl):
    base = tiny_llama()
    patched = mst_hf.apply(copy.deepcopy(base), mst_config(lm_head=(3, impl), zero_stage=3))
    partitioned = _Partitioned(patched.lm_head)
    ids, labels = batch()
    ref_loss, ref_grads = loss_and_grads(base, ids, labels)
    loss, grads = loss_and_grads(patched, ids, labels)
    assert partitioned.gathers == ["forward", "backward"]
    assert patched.lm_head.weight.numel() == 0  # released after backward
    close(loss, ref_loss)
    for name, g in ref_grads.items():
        close(grads[name], g)
    # the same model outside ZeRO-3's contract fails: its loss would read the released weight
    outside = mst_hf.apply(copy.deepcopy(base), mst_config(lm_head=(3, impl)))
    _Partitioned(outside.lm_head)
    with pytest.raises(ValueError, match=r"expected weight \[V, 64\]"):
        outside(input_ids=ids, labels=labels)


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_a_tiled_mlp_whose_input_needs_no_gradient_still_gives_its_weights_theirs(zero_stage):
    # MLP-only fine-tuning: the embedding and layer 0's norms and attention frozen, so layer 0's MLP input
    # needs no gradient (ZeRO-3's tiled Function, whose only input it is, would never run backward)
    base = tiny_llama()
    base.model.embed_tokens.weight.requires_grad_(False)
    layer = base.model.layers[0]
    for module in (layer.input_layernorm, layer.self_attn, layer.post_attention_layernorm):
        module.requires_grad_(False)
    assert_same_training("llama", mst_config(mlp=(3, "tiled"), zero_stage=zero_stage), base)


def test_a_tiled_mlp_is_refused_where_a_router_loss_needs_the_routers_gradient():
    base = tiny_mixtral()
    base.config.output_router_logits = True
    with pytest.raises(ValueError, match="mlp.impl: expected loop for a Mixture-of-Experts model with "
                                         "config.output_router_logits"):
        mst_hf.apply(copy.deepcopy(base), mst_config(mlp=(3, "tiled")))
    assert_same_training("mixtral", mst_config(mlp=(3, "loop"), lm_head=(2, "fused")), base)


def test_zero3_refuses_an_optimizer_step_in_backward():
    with pytest.raises(ValueError, match="in_backward: expected false with zero_stage 2 or 3"):
        mst_config(zero_stage=3, optimizer={"name": "adamw", "state_dtype": "fp32", "in_backward": True})


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_under_zero3_the_tiled_mlp_reads_its_projections_only_while_they_are_gathered(family):
    # ALST's way: the projections are not the tiled Function's inputs (ZeRO-3 has them empty when it
    # is called); each chunk's backward accumulates into their .grad. The Function of the other stages,
    # which takes them as inputs, fails under the same contract, as it does under DeepSpeed.
    base = MODELS[family]()
    ids, labels = batch()
    ref_loss, ref_grads = loss_and_grads(base, ids, labels)

    def partitioned(zero_stage):
        model = mst_hf.apply(copy.deepcopy(base), mst_config(mlp=(3, "tiled"), lm_head=(2, "fused"), checkpoint=(1,),
                                                             zero_stage=zero_stage))
        for layer in model.model.layers:
            for m in layer.mlp.modules():
                if isinstance(m, torch.nn.Linear):
                    _Partitioned(m)
        return model

    loss, grads = loss_and_grads(partitioned(3), ids, labels)
    close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        close(grads[name], g)
    with pytest.raises(RuntimeError, match="invalid gradient"):
        loss_and_grads(partitioned(2), ids, labels)


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_a_model_that_rescales_lm_heads_output_is_refused_with_a_chunked_loss(zero_stage):
    # Granite divides the logits by config.logits_scaling before its loss (Cohere multiplies by
    # logit_scale): a loss computed from lm_head's input would miss it (by 8x under ZeRO-3, where the
    # division lands on the loss itself)
    config = transformers.GraniteConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, logits_scaling=8.0,
        attn_implementation="eager")
    torch.manual_seed(0)
    granite = transformers.GraniteForCausalLM(config).float().train()
    with pytest.raises(ValueError, match=r"lm_head.chunks: GraniteForCausalLM's forward divides lm_head's output by "
                                         r"config.logits_scaling \(8.0\)"):
        mst_hf.apply(copy.deepcopy(granite), mst_config(lm_head=(3, "fused"), zero_stage=zero_stage))
    mst_hf.apply(copy.deepcopy(granite), mst_config(mlp=(2, "loop"), zero_stage=zero_stage))  # a whole LM head: fine
    granite.config.logits_scaling = 1.0
    base = granite
    patched = mst_hf.apply(copy.deepcopy(base), mst_config(lm_head=(3, "fused"), zero_stage=zero_stage))
    ids, labels = batch()
    close(loss_and_grads(patched, ids, labels)[0], loss_and_grads(base, ids, labels)[0])


def test_under_zero3_a_model_that_soft_caps_lm_heads_output_is_refused():
    model = tiny_gemma2()
    with pytest.raises(ValueError, match="zero_stage: with ZeRO-3 the chunked loss runs inside lm_head's forward"):
        mst_hf.apply(model, mst_config(lm_head=(2, "fused"), zero_stage=3))
    assert "forward" not in vars(model.lm_head)
    mst_hf.apply(tiny_gemma2(), mst_config(lm_head=(1, "fused"), zero_stage=3))  # a whole LM head: untouched


def test_an_attention_mismatch_warns():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mst_hf.apply(tiny_llama(), mst_config(attention="flash"))
    assert any('plans "flash" attention' in str(w.message) for w in caught)


def test_apply_reads_a_config_file(tmp_path):
    path = tmp_path / "mst_config.json"
    path.write_text(mst_config(mlp=(2, "tiled")).to_json())
    model = mst_hf.apply(tiny_llama(), path)
    assert mst_hf.applied_config(model).mlp.impl == "tiled"


@pytest.mark.skipif(not hasattr(torch.Tensor, "register_post_accumulate_grad_hook"),
                    reason="needs torch >= 2.1 (post-accumulate-grad hooks)")
@pytest.mark.parametrize("family", MODELS)
def test_optimizer_in_backward_on_a_patched_model_matches_a_normal_adamw_step(family):
    patches = dict(mlp=(3, "tiled"), lm_head=(7, "fused"), checkpoint=(0,))
    in_backward = {"name": "adamw", "state_dtype": "fp32", "in_backward": True}
    base = MODELS[family]()
    normal = mst_hf.apply(copy.deepcopy(base), mst_config(**patches))
    stepped = mst_hf.apply(copy.deepcopy(base), mst_config(**patches, optimizer=in_backward))
    opt_normal = mst_hf.make_optimizer(normal, mst_hf.applied_config(normal), lr=1e-3, weight_decay=0.01)
    opt_stepped = mst_hf.make_optimizer(stepped, mst_hf.applied_config(stepped), lr=1e-3, weight_decay=0.01)
    ids, labels = batch()
    normal(input_ids=ids, labels=labels).loss.backward()
    opt_normal.step()
    stepped(input_ids=ids, labels=labels).loss.backward()
    opt_stepped.step()
    assert all(p.grad is None for p in stepped.parameters())
    for (name, a), b in zip(stepped.named_parameters(), normal.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_shard_lays_fsdp2_out_as_planned_and_refuses_what_was_not():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule
    from torch.testing._internal.distributed.fake_pg import FakeStore

    planned = dict(data_parallel=2, zero_stage=3, precision="bf16-master",
                   optimizer={"name": "adamw", "state_dtype": "fp32", "in_backward": False})
    model = tiny_llama()  # fp32 parameters: bf16-master's under FSDP2's bf16 policy
    with pytest.raises(ValueError, match="mst_hf.shard: fsdp2: expected a config planned for torch's FSDP2"):
        mst_hf.shard(model, mst_config(**planned))
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)  # (collectives move nothing)
    try:
        mesh = init_device_mesh("cpu", (2,))
        config = mst_config(fsdp2=True, mlp=(2, "tiled"), lm_head=(2, "recompute"), checkpoint=(1,), **planned)
        with pytest.raises(ValueError, match="mst_hf.shard: model: expected a model patched by mst_hf.apply with this config"):
            mst_hf.shard(model, config, mesh)
        with pytest.raises(ValueError, match="make_optimizer: fsdp2: expected the model sharded by mst_hf.shard first"):
            mst_hf.make_optimizer(model, config, lr=1e-5)
        mst_hf.apply(model, config)
        with pytest.raises(ValueError, match="mst_hf.shard: data_parallel: expected a one-dimensional mesh of 4 ranks"):
            mst_hf.shard(model, mst_config(fsdp2=True, **dict(planned, data_parallel=4)), mesh)
        with pytest.raises(ValueError, match="mst_hf.shard: fsdp2_groups: expected mst_hf .this plan's groups are accelerate's"):
            mst_hf.shard(model, mst_config(fsdp2=True, fsdp2_groups="accelerate", **dict(planned, precision="pure-bf16")), mesh)
        with pytest.raises(ValueError, match="mst_hf.shard: fsdp2_groups: expected mst_hf .* emit --format axolotl.* got 'axolotl'"):
            mst_hf.shard(model, mst_config(fsdp2=True, fsdp2_groups="axolotl", **dict(planned, precision="pure-bf16")), mesh)
        with pytest.raises(ValueError, match="got 2 dimension"):  # (HSDP's replicate x shard: not what was planned)
            mst_hf.shard(model, config, init_device_mesh("cpu", (1, 2), mesh_dim_names=("replicate", "shard")))
        mst_hf.shard(model, config.to_dict(), mesh)  # (a mapping: loaded as load_config does)
        # one group per decoder layer and the model's own, fp32 shards gathered in bf16, reduced in fp32
        assert isinstance(model, FSDPModule) and all(isinstance(layer, FSDPModule) for layer in model.model.layers)
        for module in (model, *model.model.layers):
            policy = module._get_fsdp_state()._mp_policy
            assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
        shards = [p.to_local() for p in model.parameters()]
        assert all(p.dtype == torch.float32 for p in shards)
        assert shards[0].shape == (VOCAB // 2, 64)  # the embedding's rows, halved
        optimizer = mst_hf.make_optimizer(model, config, lr=1e-5)
        assert not isinstance(optimizer, mst_hf.MasterWeightOptimizer)  # (the fp32 shards are the masters)
        ids, labels = batch()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        assert all(p.grad is not None and p.grad.to_local().dtype == torch.float32 for p in model.parameters())
    finally:
        dist.destroy_process_group()
