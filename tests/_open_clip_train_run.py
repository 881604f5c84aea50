"""Run open_clip_train's main for tests/test_open_clip_train.py and record every loss it computes.

    python tests/_open_clip_train_run.py RECORD.json {stock,flipkern} {float32,float64} <open_clip_train args>

stock: ``open_clip_train.main.main`` as it is; flipkern: through flipkern.open_clip_train
(the command under test). float64 runs stock open_clip_train on a float64 model and float64
images: the reference of the tolerance rule (open_clip_train itself has no float64
precision). Under torchrun it runs one rank, with DDP on CPU made possible (see
cpu_ddp). The loss values are recorded at full precision (the log rounds them to 5
digits) and written as JSON, one list per rank.
"""
import json
import sys

import torch


class RecordingLoss(torch.nn.Module):
    """``loss`` (ClipLoss, patched or not) that appends each total it returns to ``values``."""

    def __init__(self, loss, values):
        super().__init__()
        self.loss, self.values = loss, values

    def forward(self, *args, **kwargs):
        out = self.loss(*args, **kwargs)
        self.values.append(float(sum(out.values()) if isinstance(out, dict) else out))
        return out


def float64_models(create_model_and_transforms):
    def create_float64(*args, **kwargs):
        model, *transforms = create_model_and_transforms(*args, **kwargs)
        return (model.double(), *transforms)
    return create_float64


def cpu_ddp(ddp):
    """DDP that accepts open_clip_train's ``device_ids=[device]`` for a CPU module.

    open_clip_train (3.3.0) always passes device_ids, which DDP refuses for CPU modules, so
    stock open_clip_train cannot run DDP on CPU at all; the tests need it there (gloo).
    """
    class CpuDDP(ddp):
        def __init__(self, module, device_ids=None, **kwargs):
            if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids=device_ids, **kwargs)
    return CpuDDP


def main(record_path, mode, dtype, argv):
    import open_clip_train.main as train_main
    import open_clip_train.train as train_loop
    if mode == "flipkern":
        from flipkern.open_clip_train import install
        install()
    if dtype == "float64":
        train_main.create_model_and_transforms = float64_models(train_main.create_model_and_transforms)
        train_loop.get_input_dtype = lambda precision: torch.float64
    torch.nn.parallel.DistributedDataParallel = cpu_ddp(torch.nn.parallel.DistributedDataParallel)
    values = []
    create_loss = train_main.create_loss
    train_main.create_loss = lambda args: RecordingLoss(create_loss(args), values)
    train_main.main(argv)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    with open(f"{record_path}.rank{rank}", "w") as f:
        json.dump(values, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
