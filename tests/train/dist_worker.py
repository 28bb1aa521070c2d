"""One rank of a torchrun job for tests/train/test_distributed.py (run with torch.distributed.run).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/train/dist_worker.py MODE DATA OUT

MODE samples: each rank reads one train epoch and reports the records and labels it was fed.
MODE step:    one training epoch of exactly one step, dropout off, gradients all-reduced in f32 or
              bf16; rank 0 saves the parameters before and after.
MODE mismatch: rank 1 asks for another lr than rank 0; fit must refuse to start.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from alexnet_pipe.config import TrainConfig
from alexnet_pipe.dataset.records import RecordReader, record_table
from alexnet_pipe.model.params import param_groups
from alexnet_pipe.train import start as warmstart
from alexnet_pipe.train.epoch import train_one_epoch
from alexnet_pipe.train.loop import fit
from alexnet_pipe.train.runtime import open_run


def config(data: Path, **kw) -> TrainConfig:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    base = dict(backend="cpu", datatype="f32", crop=67, batch_size=4, lr=0.01, lr_scale="none", progress=False,
                data_threads=1, rank=rank, world_size=world, eval_freq=0)
    return TrainConfig(data_dir=data, **{**base, **kw})


def samples(data: Path, out: Path) -> None:
    rt = open_run(config(data), join=True)
    loader = rt.loader("train", True, 0)
    table = record_table(rt.ds, "train", "lmdb")
    plan = loader.source.share(0)
    fed = [label for batch in loader for label in batch.labels.tolist()]
    reader = RecordReader(table)
    expected = [int(reader.read(int(i))[1]) for i in plan.indices]
    reader.close()
    got = {"rank": rt.dist.rank, "indices": plan.indices[plan.valid].tolist(), "padding": int((~plan.valid).sum()),
           "labels_fed_match_records": fed == expected, "steps": len(loader)}
    everyone = rt.dist.gather(got)
    if rt.dist.is_main:
        out.write_text(json.dumps(everyone))
    loader.close()
    rt.close()


def step(data: Path, out: Path, batch_size: int, grads: str) -> None:
    rt = open_run(config(data, batch_size=batch_size), join=True)
    model = warmstart.build(warmstart.decide_start(rt.cfg, rt.ds), rt.device, 0, rt.cfg.init)
    if rt.cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    for m in model.modules():  # dropout masks cannot match between 1 and 2 processes: take it out
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(param_groups(model, 0.01, 5e-4), lr=0.01, momentum=0.9)
    loader = rt.loader("train", True, 0)
    assert len(loader) == 1, "the test's split must fill exactly one step"
    train_one_epoch(rt.dist.wrap(model, bf16_grads=grads == "bf16"), loader, opt, None, rt, 0, 0.01)
    if rt.dist.is_main:
        torch.save({"before": before, "after": model.state_dict()}, out)
    loader.close()
    rt.close()


def mismatch(data: Path, out: Path) -> None:
    lr = 0.01 if os.environ["RANK"] == "0" else 0.02
    fit(config(data, lr=lr, epochs=1))


if __name__ == "__main__":
    mode, data, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if mode == "samples":
        samples(data, out)
    elif mode == "step":
        step(data, out, int(sys.argv[4]), sys.argv[5])
    elif mode == "mismatch":
        mismatch(data, out)
    else:
        raise SystemExit(f"unknown mode {mode}")
