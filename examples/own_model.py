"""Feed your own torch model from alexnet-pipe: convert a small image tree, then train a network
that is not AlexNet on ``alexnet_pipe.loader`` batches, on the CPU.

    python examples/own_model.py                      # a drawn 4-class tree, in a temporary folder
    python examples/own_model.py --work DIR           # keep the tree and the dataset in DIR
    python examples/own_model.py --data CONVERTED     # an existing output of alexnet-pipe convert

Prints the mean training loss of each epoch and the validation accuracy (docs/API.md).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import alexnet_pipe
from alexnet_pipe.apps.synthetic import SynthConfig, make_image_tree

CLASSES = ("circle", "square", "hstripes", "vstripes")


def make_dataset(work: Path) -> Path:
    """Draw a small ImageNet-style tree under ``work/raw`` and convert it into ``work/data``."""
    make_image_tree(SynthConfig(work / "raw", train_per_class=64, val_per_class=16, size=(96, 72),
                                classes=CLASSES, seed=1, texture=0.3))
    cfg = alexnet_pipe.ConvertConfig(src=work / "raw", dst=work / "data", workers=2, progress=False,
                                     image=alexnet_pipe.ImageSettings(short_side=72))
    alexnet_pipe.run_convert(cfg)
    return work / "data"


class SmallNet(nn.Module):
    """Three conv blocks and global average pooling: any torch model takes the loader's batches."""

    def __init__(self, num_classes: int):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(3, 16), block(16, 32), block(32, 64))
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def real(batch: alexnet_pipe.Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's images and labels without the padding a rank may get at an epoch's end."""
    if batch.valid is None:
        return batch.images, batch.labels
    return batch.images[batch.valid], batch.labels[batch.valid.to(batch.labels.device)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, help="folder for the drawn tree and its conversion (default: a temp dir)")
    ap.add_argument("--data", type=Path, help="an existing converted dataset (skips drawing and converting)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        data = args.data or make_dataset(args.work or Path(tmp))
        ds = alexnet_pipe.open_dataset(data)
        print(f"dataset {data}: {ds.split('train')['records']} train, {ds.split('val')['records']} val images, "
              f"{ds.num_classes} classes")

        torch.manual_seed(args.seed)
        model = SmallNet(ds.num_classes)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        # The records, order, random crops, flips and mean `alexnet-pipe train` uses; one pass per epoch.
        train = alexnet_pipe.loader(data, "train", batch_size=args.batch_size, crop=args.crop, backend="cpu",
                                    seed=args.seed, data_threads=2)
        try:
            for epoch in range(args.epochs):
                model.train()
                total, seen = 0.0, 0
                for batch in train:
                    images, labels = real(batch)
                    loss = nn.functional.cross_entropy(model(images), labels)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    total, seen = total + loss.item() * len(labels), seen + len(labels)
                print(f"epoch {epoch + 1} loss {total / seen:.4f}")
        finally:
            train.close()

        # Validation: centre crops in stored order.
        val = alexnet_pipe.loader(data, "val", batch_size=args.batch_size, crop=args.crop, backend="cpu",
                                  data_threads=2)
        model.eval()
        correct = count = 0
        try:
            with torch.no_grad():
                for batch in val:
                    images, labels = real(batch)
                    correct += (model(images).argmax(1) == labels).sum().item()
                    count += len(labels)
        finally:
            val.close()
        print(f"val accuracy {100 * correct / count:.1f}% (chance {100 / ds.num_classes:.1f}%)")
        print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
