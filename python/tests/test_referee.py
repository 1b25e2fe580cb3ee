"""The referee (python/mst_referee): the real step on fake tensors, every storage recorded.

What stands behind its numbers, each checked here:
* a plain CPU step of the same job, with no dispatch mode at all, measured by torch.profiler,
  allocates the referee's events in the referee's order, byte for byte (what the profiler sees
  beyond them is kernel scratch freed inside its op, or Python scalars outside every op);
* PyTorch's own tracker (MemTracker) reports the same peak as the referee without its one
  correction, apart from the host step counters MemTracker also counts;
* the correction itself (autograd's InputBuffer sums in place in a plain run) on graphs small
  enough to state by hand.
"""

import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from mst_referee import jobs, referee, validate  # noqa: E402
from mst_referee import recorder as recorder_module  # noqa: E402
from mst_referee.recorder import CudaAutocastMismatch, StorageRecorder, cuda_autocast_policies, host_memory  # noqa: E402

TINY = "tiny-llama"
SLIDING_TIED = str(jobs.REPO_ROOT / "tests" / "data" / "tiny_sliding_tied.json")
GEMMA2 = str(jobs.REPO_ROOT / "tests" / "data" / "tiny_gemma2.json")


def job(model, seq=16, **knobs):
    return jobs.make_job(model, knobs=knobs, seq=seq, convert="python")


def non_init(events):
    return [e for e in events if e[5] != "init"]


# ---- the referee equals a plain CPU step ------------------------------------------------

PLAIN_STEP_CASES = [
    (TINY, {}),
    (TINY, {"checkpoint": "all", "mlp_chunks": 4, "lm_chunks": 4}),
    (TINY, {"checkpoint": [1], "mlp_chunks": 3, "mlp_impl": "tiled", "lm_chunks": 3, "lm_impl": "fused"}),
    (TINY, {"attention": "eager", "checkpoint": "all"}),
    (TINY, {"grad_accum": 2, "micro_batch": 2}),
    (TINY, {"precision": "bf16-master", "optimizer_impl": "for-loop"}),
    (TINY, {"precision": "amp", "lm_chunks": 2}),
    (TINY, {"optimizer": "sgd", "optimizer_impl": "foreach"}),
    (TINY, {"optimizer_impl": "fused", "optimizer_in_backward": True}),
    (SLIDING_TIED, {"checkpoint": "all", "mlp_chunks": 2, "lm_chunks": 2}),
    (GEMMA2, {"mlp_chunks": 2, "lm_chunks": 3}),
    (GEMMA2, {"attention": "eager"}),
]


@pytest.mark.parametrize("model, knobs", PLAIN_STEP_CASES, ids=[f"{m.split('/')[-1]}-{k}" for m, k in PLAIN_STEP_CASES])
def test_a_plain_cpu_step_allocates_the_referees_events_byte_for_byte(model, knobs):
    j = job(model, **knobs)
    recorded = non_init(referee.referee_step(j)["events"])
    alignment = validate.align(validate.profile_plain_step(j), recorded)
    assert alignment.problems == []
    assert alignment.matched == alignment.referee_events == len(recorded) > 100
    # What the profile holds beyond the referee is scratch and scalars: small, short-lived.
    assert alignment.profiled_events > alignment.matched


def test_the_referee_records_the_same_step_on_real_and_on_fake_tensors():
    # The same recorder on real tensors (the model built for real, no fake session) sees the
    # same events: fake tensors change nothing but the cost.
    from mst_referee.flash import stand_in, use_flash
    from mst_referee.step import run_step
    from mst_referee.train import build_model

    import mst_hf

    j = job(TINY, checkpoint="all", mlp_chunks=2)
    fake = referee.referee_step(j)["events"]
    cfg = mst_hf.load_config(j.mst_config)
    model = build_model(j, "sdpa", "cpu")
    use_flash(model, cfg.attention)
    mst_hf.apply(model, cfg)
    optimizer = mst_hf.make_optimizer(model, cfg, lr=j.lr)
    g = torch.Generator().manual_seed(j.seed + 1)
    recorder = StorageRecorder()
    with stand_in():
        batch = [torch.randint(0, j.hf_config["vocab_size"], (1, 16), generator=g)]
        run_step(model, optimizer, cfg, batch, "cpu", keep_loss=False)
        batch = [torch.randint(0, j.hf_config["vocab_size"], (1, 16), generator=g)]
        with recorder.tracking(model), recorder:
            run_step(model, optimizer, cfg, batch, "cpu", keep_loss=False)
    recorder.close()
    real = [e.to_list() for e in recorder.timeline()]
    # Without the driver's registrations and phase marks, compare what does not depend on them.
    assert [(e[0], e[2], e[9]) for e in non_init(fake)] == [(e[0], e[2], e[9]) for e in real]


# ---- PyTorch's MemTracker -----------------------------------------------------------------

@pytest.mark.parametrize("knobs, host_counters", [
    # torch's foreach AdamW keeps one float32 step counter per parameter on the host; tiny-llama has
    # 21 parameters: the embedding, 9 per layer (4 attention, 3 MLP, 2 norms) x 2, the final norm, lm_head.
    ({"optimizer_impl": "foreach"}, 21),
    ({"optimizer_impl": "fused", "checkpoint": "all"}, 0),  # fused keeps them on the device (registered)
    ({"optimizer": "sgd", "mlp_chunks": 2}, 0),  # SGD has none
])
def test_memtracker_reports_the_uncorrected_peak(knobs, host_counters):
    j = job(TINY, **knobs)
    uncorrected = referee.summarize_events(referee.referee_step(j, correct_buffer_sums=False)["events"])
    assert validate.memtracker_peak(j) == uncorrected["peak_bytes"] + 4 * host_counters


# ---- the InputBuffer correction -----------------------------------------------------------

class _Phases:
    """A stand-in for the recorder's phase marks when a test runs without one."""

    phase = "forward"


def _record(fn, correct=True):
    recorder = StorageRecorder(correct_buffer_sums=correct)
    with recorder:
        fn(recorder)
    recorder.close()
    return recorder


def _profile(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(_Phases())
    return validate.profiled_allocations(prof)


def test_an_op_only_cudas_autocast_casts_is_refused_on_a_bf16_input_under_autocast():
    # aten::sum has an AutocastCUDA kernel (fp32 accumulation: a bf16 input gives an fp32 result on a
    # GPU) and no AutocastCPU one: recorded on the CPU the step would not be the GPU's. softmax is
    # cast by CUDA's autocast before it decomposes into the _softmax the dispatch mode sees. aten::mm
    # has both (the CPU referee casts as CUDA does); outside autocast nothing is cast anywhere.
    x = torch.ones(8, 8, dtype=torch.bfloat16)

    def refused(op):
        def step(r):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                try:
                    op()
                except CudaAutocastMismatch:
                    pass  # caught by the code that ran: close() still refuses the step
        with pytest.raises(CudaAutocastMismatch):
            _record(step)

    refused(lambda: x.sum())
    refused(lambda: torch.nn.functional.softmax(x, dim=-1))
    refused(lambda: torch.mv(x.float(), x.float()[0]))  # a lower-precision op only on CUDA: fp32 is cast

    def fine(r):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x.float().sum()  # fp32 input: both autocasts leave it alone
            x.sum(dtype=torch.float32)  # a dtype asked for: CUDA's autocast does not cast either
            torch.nn.functional.softmax(x, dim=-1, dtype=torch.float32)
            torch.mm(x.float(), x.float())  # cast to bf16 by both
            # both cast conv1d; the aten::convolution it calls is CUDA's lower-precision op alone, on
            # bf16 already (the policies come from the installed torch's own lists)
            torch.nn.functional.conv1d(x.float().unsqueeze(0), torch.ones(2, 8, 3))
        x.sum()  # no autocast

    _record(fine)


def test_the_referees_cpu_autocast_casts_only_what_cudas_does():
    # aten::cat has an AutocastCPU kernel (it copies a bf16 input to fp32 before a mixed cat) and no
    # AutocastCUDA one (CUDA's cat kernel promotes as it copies): under cuda_autocast_policies the
    # CPU records what a GPU allocates, the output alone; outside it the extra copy reappears.
    a, b = torch.ones(4, 12, dtype=torch.float32), torch.ones(4, 4, dtype=torch.bfloat16)

    def cat(r):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.cat([a, b], dim=1)

    with cuda_autocast_policies():
        events = _record(cat).timeline()
    assert [(e.name.split(" ")[0], e.bytes) for e in events if e.alloc] == [("cat", 4 * 16 * 4)]
    events = _record(cat).timeline()
    assert [(e.name.split(" ")[0], e.bytes) for e in events if e.alloc] == [("_to_copy", 4 * 4 * 4), ("cat", 4 * 16 * 4)]


def test_two_gradients_of_one_tensor_are_summed_in_place_as_in_a_plain_run():
    x0 = torch.randn(1000, requires_grad=True)

    def step(r):
        x0.grad = None
        r.phase = "forward"
        x = x0 * 2  # 4000 bytes; its gradient arrives twice (from sin and from cos)
        y = (x.sin() + x.cos()).sum()
        r.phase = "backward"
        y.backward()

    # A plain run: cos's gradient (4000 bytes) is added into sin's in place (aten::add_).
    plain = _profile(step)
    recorder = _record(step)
    assert recorder.corrected_sums == 1
    assert validate.align(plain, [e.to_list() for e in recorder.timeline()]).exact
    uncorrected = _record(step, correct=False)
    sums = [e for e in uncorrected.timeline() if e.alloc and e.name.startswith("add ") and e.phase == "backward"]
    assert [e.bytes for e in sums] == [4000]  # under the mode the sum is a new 4000-byte tensor
    assert not validate.align(plain, [e.to_list() for e in uncorrected.timeline()]).exact


def test_a_gradient_that_is_a_view_is_summed_out_of_place_as_in_a_plain_run():
    x0 = torch.randn(12, requires_grad=True)

    def step(r):
        x0.grad = None
        r.phase = "forward"
        x = x0.reshape(3, 4) * 2
        # Each branch's gradient reaches x as the view that reshape's backward makes of it.
        y = (x.reshape(12).sin() + x.reshape(12).cos()).sum()
        r.phase = "backward"
        y.backward()

    plain = _profile(step)
    recorder = _record(step)
    assert recorder.corrected_sums == 0
    assert validate.align(plain, [e.to_list() for e in recorder.timeline()]).exact
    sums = [e for e in recorder.timeline() if e.alloc and e.name.startswith("add ") and e.phase == "backward"]
    assert [e.bytes for e in sums] == [48]  # the plain run allocates the sum too


def test_host_memory_is_recorded_as_host():
    recorder = StorageRecorder()
    with recorder:
        with host_memory():
            h = torch.empty(10)
        d = h.clone()
        del h, d
    recorder.close()
    assert [(e.alloc, e.device, e.bytes) for e in recorder.timeline()] == [
        (True, "host", 40), (True, "gpu", 40), (False, "host", 40), (False, "gpu", 40)]
    assert [e.category for e in recorder.timeline()][:2] == ["offloaded", "transient"]


def test_a_meta_tensor_is_no_memory():
    """DeepSpeed's ZeRO keeps a zeros_like(param, device="meta") per parameter: shapes, no bytes."""
    held = torch.zeros(4, device="meta")  # made before recording, then registered: not an allocation either
    recorder = StorageRecorder()
    recorder.register([("held", held)], "workspace", "init.test")
    with recorder:
        m = torch.zeros_like(torch.empty(0), device="meta").new_zeros(1000)
        d = torch.zeros(10)
        del m, d
    recorder.close()
    assert [(e.alloc, e.bytes, e.name) for e in recorder.timeline()] == [(True, 40, "zeros f32[10]"), (False, 40, "-")]


def test_a_storage_resized_in_place_is_a_free_of_its_bytes_and_a_new_allocation():
    before = torch.empty(8)  # made before recording: untracked
    recorder = StorageRecorder()
    with recorder, recorder:  # (entered twice, it still records each resize once)
        t = torch.empty(100)                # 400 bytes
        t.untyped_storage().resize_(0)      # FSDP2's free_storage: the bytes go back
        t.untyped_storage().resize_(400)    # its alloc_storage: a new block
        t.untyped_storage().resize_(800)    # grown: a larger block, the copy, then the old one back
        before.untyped_storage().resize_(0)  # not tracked: nothing of this step
        del t
    recorder.close()
    assert torch.UntypedStorage.resize_ is recorder_module._RESIZE  # torch's own again once no recorder is active
    assert [(e.alloc, e.tensor, e.bytes, e.name) for e in recorder.timeline()] == [
        (True, 0, 400, "empty f32[100]"), (False, 0, 400, "resize_"),
        (True, 1, 400, "resize_ u8[400]"), (True, 2, 800, "resize_ u8[800]"), (False, 1, 400, "resize_"),
        (False, 2, 800, "-")]


def test_fsdp2_frees_and_reallocates_each_unsharded_parameter_by_resizing_its_storage():
    """FSDP2 (fully_shard) on a fake process group of 4 ranks: each unit all-gathers its parameters
    into one [4 x shard] buffer, copies them out into per-parameter unsharded tensors, and after the
    unit's forward and again after its backward frees those by resize_(0); before the backward's
    all-gather it allocates them again by resize_. By hand: a Linear(64, 256) weight is 16384
    bf16 elements (32768 bytes), its shard on each of 4 ranks 4096 (8192 bytes)."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    try:
        mesh = init_device_mesh("cpu", (4,))
        with FakeTensorMode():
            model = torch.nn.Sequential(torch.nn.Linear(64, 256, bias=False, dtype=torch.bfloat16),
                                        torch.nn.Linear(256, 64, bias=False, dtype=torch.bfloat16))
            for layer in model:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            x = torch.randn(8, 64, dtype=torch.bfloat16)
            recorder = StorageRecorder()
            with recorder:
                loss = model(x).sum()
                recorder.phase = "backward"
                loss.backward()
                del loss
            recorder.close()
    finally:
        dist.destroy_process_group()
    events = recorder.timeline()
    resized = [(e.alloc, e.phase, e.bytes) for e in events if e.name.startswith("resize_")]
    # Forward: both units' copies freed after their forward. Backward: each allocated before its
    # all-gather and freed after its backward (the second unit's backward runs first).
    assert resized == [(False, "forward", 32768), (False, "forward", 32768),
                       (True, "backward", 32768), (False, "backward", 32768),
                       (True, "backward", 32768), (False, "backward", 32768)]
    gathers = [e.bytes for e in events if e.alloc and e.name.startswith("empty bf16[16384]")]
    assert 32768 in gathers  # the [4 x 4096] all-gather buffers (and the forward's unsharded copies)
    live = {}
    for e in events:  # consistent: every free names a live allocation of its bytes
        if e.alloc:
            live[e.tensor] = e.bytes
        else:
            assert live.pop(e.tensor) == e.bytes
    assert not [b for b in live.values() if b == 32768]  # no unsharded copy outlives the step


def test_fsdp2_over_a_transformers_llama_gathers_copies_and_reduce_scatters_each_layer_as_derived_by_hand():
    """transformers' Llama (hidden 64, intermediate 176, 4 heads of 16, 2 key heads, 2 layers) under
    FSDP2 with each decoder layer and the model its own unit, on a fake process group of 4 ranks.

    By hand, a layer's parameters in bf16 bytes: q 64x64 (8192), k and v 32x64 (4096 each), o 64x64
    (8192), gate and up 176x64 and down 64x176 (22528 each), two norms of 64 (128 each). FSDP2 shards
    each on dim 0 over 4 ranks: 16, 8, 8, 16, 44, 44, 16 rows and 16 norm elements, 11552 elements a
    rank. So each layer, in forward and again in backward: an all-gather output of 4 x 11552 bf16
    (92416 bytes) and the nine unsharded copies, freed by resize_(0) after the layer; in backward
    its gradients' reduce-scatter input (92416 bytes) and output, the sharded gradient (23104)."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore
    import transformers

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
                                      tie_word_embeddings=False, attn_implementation="sdpa")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    default_dtype = torch.get_default_dtype()
    try:
        mesh = init_device_mesh("cpu", (4,))
        with FakeTensorMode():
            torch.set_default_dtype(torch.bfloat16)
            model = transformers.LlamaForCausalLM(config)
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            ids = torch.randint(0, 256, (1, 32))
            recorder = StorageRecorder()
            with recorder, recorder.tracking(model):
                loss = model(input_ids=ids, labels=ids).loss
                recorder.phase = "backward"
                loss.backward()
                del loss
            recorder.close()
    finally:
        torch.set_default_dtype(default_dtype)
        dist.destroy_process_group()
    copies = sorted([8192, 4096, 4096, 8192, 22528, 22528, 22528, 128, 128])
    events = recorder.timeline()
    for phase in ("forward", "backward"):
        # forward: both layers' all-gathers; backward: both again (the next one prefetched while a
        # layer runs its backward) and both reduce-scatter inputs
        flat = [e.bytes for e in events if e.phase == phase and e.alloc and e.name == "empty bf16[46208]"]
        assert flat == [92416] * (2 if phase == "forward" else 4)
        copied = [e.bytes for e in events if e.phase == phase and e.alloc and e.layer >= 0 and e.bytes in copies
                  and (e.name.startswith("resize_") or e.name.startswith("empty bf16["))]
        freed = [e.bytes for e in events if e.phase == phase and not e.alloc and e.name == "resize_" and e.bytes in copies]
        assert sorted(copied) == sorted(copies * 2)  # both layers' unsharded copies made ...
        # ... and freed by resize_(0) in the same phase; the model's own unit (embedding, final norm
        # 128, LM head) keeps its copies from forward to the end of backward
        assert sorted(freed) == sorted(copies * 2 + ([128] if phase == "backward" else []))
    scattered = [e.bytes for e in events if e.phase == "backward" and e.alloc and e.name == "empty bf16[11552]"]
    assert scattered == [23104, 23104]  # each layer's sharded gradient


# ---- records -------------------------------------------------------------------------------

def test_a_referee_record_holds_the_full_timeline(tmp_path):
    from mst_referee import cli

    out = tmp_path / "run.json"
    knobs = tmp_path / "knobs.json"
    knobs.write_text(json.dumps({"checkpoint": "all", "lm_chunks": 2}))
    assert cli.main([TINY, "--setup", str(knobs), "--seq", "32", "--device", "fake", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["backend"] == "referee" and record["workspace_bytes"] == 0
    t = record["timeline"]
    assert t["format"] == "mst-timeline/1" and t["model"] == "tiny-llama" and t["micro_steps"] == 1
    kinds = {e[0] for e in t["events"]}
    assert kinds == {"alloc", "free"}
    phases = {e[5] for e in t["events"]}
    assert phases == {"init", "forward", "recompute", "backward", "optimizer"}
    categories = {e[3] for e in t["events"]}
    assert {"weights", "optimizer_state", "gradients", "checkpoint", "saved_activation", "transient"} <= categories
    s = record["summary"]
    assert s["peak_bytes"] == referee.summarize_events(t["events"])["peak_bytes"]
    assert s["events"] == len(t["events"]) and s["corrected_sums"] > 0 and math.isfinite(s["seconds"])
    # Every decoder layer's input is a checkpoint (2 layers), and each checkpoint is freed in backward.
    checkpoints = [e for e in t["events"] if e[0] == "alloc" and e[3] == "checkpoint"]
    assert [e[5] for e in checkpoints] == ["forward", "forward"]


def test_a_matrix_runs_on_fake_tensors_without_touching_cuda(tmp_path):
    # The full-size matrix (scripts/referee_matrix.json) runs this way on a machine with no GPU:
    # between runs only Python's garbage is collected, no CUDA cache is asked for.
    from mst_referee import cli

    matrix = tmp_path / "matrix.json"
    matrix.write_text(json.dumps({"format": "mst-torch-matrix/1", "defaults": {"steps": 1, "warmup": 0},
                                  "runs": [{"name": "a", "model": TINY, "seq": 16, "setup": {}},
                                           {"name": "b", "model": TINY, "seq": 16, "setup": {"checkpoint": "all"}}]}))
    assert cli.main(["--matrix", str(matrix), "--device", "fake", "--out-dir", str(tmp_path / "out")]) == 0
    records = [json.loads((tmp_path / "out" / f"{n}.json").read_text()) for n in ("a", "b")]
    assert [r["backend"] for r in records] == ["referee", "referee"]
    assert [r["setup"]["checkpoint"] for r in records] == [[], [0, 1]]


# ---- the Hugging Face Trainer's forward ---------------------------------------------------

TRAINER_CASES = [
    (TINY, {}),
    (TINY, {"attention": "eager", "checkpoint": "all", "grad_accum": 2}),
    (TINY, {"lm_chunks": 2, "mlp_chunks": 2}),
    (GEMMA2, {"checkpoint": [0]}),
    # an fp32 model (amp): the trainer's autocast is the one the plan's amp runs under
    (TINY, {"precision": "amp"}),
    (TINY, {"precision": "amp", "checkpoint": "all", "grad_accum": 2, "attention": "eager"}),
    (GEMMA2, {"precision": "amp", "lm_chunks": 2, "mlp_chunks": 2}),
]


@pytest.mark.parametrize("model, knobs", TRAINER_CASES, ids=[f"{m.split('/')[-1]}-{k}" for m, k in TRAINER_CASES])
def test_the_hf_trainers_bf16_forward_adds_only_an_fp32_copy_of_the_logits_and_no_peak(model, knobs):
    # The HF Trainer with bf16=True on a bf16 model: accelerate's autocast changes no allocation on
    # these paths, and its fp32 copy of the output logits comes after the loss's own fp32 logits
    # are gone: the step's peaks are the plain loop's (what the hf runtime predicts). On an fp32
    # model (amp) its autocast is the loop's own, and the same holds.
    plain = referee.referee_step(job(model, **knobs))["events"]
    trainer = referee.referee_step(jobs.make_job(model, knobs=knobs, seq=16, convert="python", trainer="hf-trainer"))["events"]
    a, b = referee.summarize_events(plain), referee.summarize_events(trainer)
    assert (b["peak_bytes"], b["phase_peak_bytes"]) == (a["peak_bytes"], a["phase_peak_bytes"])
    vocab = jobs.load_model_config(jobs.resolve_model(model)[1])["vocab_size"]
    copy = 16 * vocab * 4  # [1, 16, V] fp32, one per micro-step, when the head returns logits
    extra = [e for e in trainer if e[2] == copy and e[5] == "forward"]
    chunked = knobs.get("lm_chunks", 1) > 1
    micro = knobs.get("grad_accum", 1)
    assert len(trainer) - len(plain) == (0 if chunked else 2 * min(micro, 2))
    assert len(extra) - len([e for e in plain if e[2] == copy and e[5] == "forward"]) == len(trainer) - len(plain)


def test_the_trainers_forward_and_the_setups_hf_trainer_bf16_are_one_choice():
    # --trainer hf-trainer is recorded as the setup's hf_trainer_bf16 (mst-plan re-simulates the record's
    # setup, the fp32 copy of the logits included), and a setup that says it runs the Trainer's forward.
    by_flag = jobs.make_job(TINY, knobs={}, seq=16, convert="python", trainer="hf-trainer")
    assert by_flag.setup["hf_trainer_bf16"] is True and by_flag.trainer == "hf-trainer"
    by_setup = jobs.make_job(TINY, knobs={"hf_trainer_bf16": True}, seq=16, convert="python")
    assert by_setup.trainer == "hf-trainer" and by_setup.setup["hf_trainer_bf16"] is True
    plain = jobs.make_job(TINY, knobs={}, seq=16, convert="python")
    assert plain.trainer == "loop" and "hf_trainer_bf16" not in plain.setup
    with pytest.raises(jobs.CrosscheckError, match="hf_trainer_bf16: expected false with runtime kernels"):
        jobs.make_job(TINY, knobs={"hf_trainer_bf16": True, "runtime": "kernels"}, seq=16, convert="python")


def test_a_timelines_columns_name_each_event_field_where_to_list_puts_it():
    e = recorder_module.Event(alloc=True, tensor=7, bytes=512, device="gpu", phase="forward", layer=3, micro_step=1,
                              op="mlp.up", name="up_proj bf16[1, 4, 8]", category="transient")
    row = dict(zip(referee.timeline("llama-3-8b.json", {"events": [e.to_list()], "micro_steps": 1,
                                                         "micro_steps_recorded": 1})["columns"], e.to_list()))
    assert row == {"kind": "alloc", "tensor": 7, "bytes": 512, "category": "transient", "device": "gpu",
                   "phase": "forward", "layer": 3, "micro_step": 1, "op": "mlp.up", "name": "up_proj bf16[1, 4, 8]"}
