"""accelerate 1.15's native amp, which ``hf_trainer_bf16`` models (src/core/sim/step.cpp, "forward.end"): with
``bf16=True`` the Hugging Face Trainer's accelerate wraps the model's forward in bf16 autocast and
``convert_outputs_to_fp32`` where it prepares the model itself (one process, DDP), and not where it prepares
FSDP2 (``_prepare_fsdp2``), which is why mst-plan refuses the knob with ``fsdp2``. accelerate's own
``prepare()`` on the CPU, in Axolotl's environment, which has accelerate (ctest python_axolotl); elsewhere
it skips, unless MST_REQUIRE_AXOLOTL=1 says that environment was meant to be there.
"""

import os
import socket

import pytest

if os.environ.get("MST_REQUIRE_AXOLOTL") == "1":
    import accelerate  # noqa: F401
else:
    pytest.importorskip("accelerate")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402


class Head(nn.Module):
    """A model whose output is a Hugging Face one's in miniature: bf16 logits and an fp32 loss."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> dict:
        logits = self.proj(x)
        return {"logits": logits, "loss": logits.float().logsumexp(-1).mean()}


@pytest.fixture(autouse=True)
def fresh_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_one_process_bf16_wraps_the_forward_and_copies_its_bf16_outputs_to_fp32():
    from accelerate import Accelerator

    acc = Accelerator(mixed_precision="bf16", cpu=True)
    model = Head().to(torch.bfloat16)
    prepared, _ = acc.prepare(model, torch.optim.AdamW(model.parameters()))
    assert acc.native_amp
    out = prepared(torch.randn(2, 8, dtype=torch.bfloat16))
    assert out["logits"].dtype == torch.float32  # the copy hf_trainer_bf16 adds as the forward returns
    assert out["loss"].dtype == torch.float32


def test_fsdp2_preparation_leaves_the_forward_unwrapped():
    # FSDP is chosen for GPU back-ends only: the distributed type is forced here, as a GPU run would have it,
    # on a model fully_shard sharded (mst_hf.shard's path: fsdp2_prepare_model returns it as it is)
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import FSDPModule, fully_shard

    acc = Accelerator(mixed_precision="bf16", cpu=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
        assert acc.is_fsdp2 and acc.native_amp  # (it would wrap, were prepare_model called)
        model = Head().to(torch.bfloat16)
        fully_shard(model.proj)
        fully_shard(model)
        prepared, _ = acc.prepare(model, torch.optim.AdamW(model.parameters()))
        assert prepared is model and isinstance(prepared, FSDPModule)
        out = prepared(torch.randn(2, 8, dtype=torch.bfloat16))
        assert out["logits"].dtype == torch.bfloat16  # no convert_outputs_to_fp32, no autocast
    finally:
        dist.destroy_process_group()
