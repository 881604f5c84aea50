"""What every Triton launcher does before a kernel runs (flipkern/triton_kernels/_tiles.py):
all tensors of a call on one device, and that device current during the launch."""
import pytest
import torch

pytest.importorskip("triton")
from flipkern.triton_kernels import (  # noqa: E402
    _tiles,  # noqa: E402
    attention,
    losses,
    masking,
)


@pytest.mark.parametrize("call,argument", [
    (lambda meta: masking.drop_tokens(torch.zeros(1, 4, 8), meta(torch.zeros(1, 2, dtype=torch.int64)), None),
     "ids_keep"),
    (lambda meta: attention.varlen_attention_forward(torch.zeros(4, 1, 16), torch.zeros(4, 1, 16),
                                                     meta(torch.zeros(4, 1, 16)),
                                                     torch.tensor([0, 4], dtype=torch.int32), 4, False, 0.25), "v"),
    (lambda meta: losses.siglip_loss_forward(torch.zeros(2, 8), torch.zeros(2, 8), torch.tensor(1.0),
                                         meta(torch.tensor(0.0)), 0), "bias"),
], ids=["masking", "attention", "losses"])
def test_mixed_devices_name_the_argument(call, argument):
    # Checked before anything launches, on every device (meta stands in for a second GPU).
    with pytest.raises(ValueError, match=rf"{argument} is on meta but .* is on cpu"):
        call(lambda t: t.to("meta"))


def test_device_guard_makes_the_tensors_device_current():
    # Triton launches on torch.cuda.current_device(): the guard switches to the tensors'
    # device (constructing torch.cuda.device needs no GPU; entering it does).
    guard = _tiles.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(_tiles.device_guard(torch.device("cpu")), torch.cuda.device)
