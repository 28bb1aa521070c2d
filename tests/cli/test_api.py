"""The public Python API (``alexnet_pipe.__all__``, docs/API.md): every name resolves lazily and is
documented, importing the package costs no torch, and ``alexnet_pipe.loader`` is the loader
training reads (same records, order, crops, flips; rank-aware; resumable by epoch and step)."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import alexnet_pipe
from alexnet_pipe.apps.synthetic import SynthConfig, make_image_tree
from alexnet_pipe.config import TrainConfig
from alexnet_pipe.loading.open import epoch_loader

REPO = Path(__file__).resolve().parents[2]


def test_importing_the_package_and_imaging_imports_neither_torch_nor_dali():
    # The converter's worker processes import these: torch or DALI would cost seconds per worker.
    code = ("import sys, alexnet_pipe, alexnet_pipe.imaging.process; "
            "assert 'torch' not in sys.modules, 'torch'; assert 'nvidia.dali' not in sys.modules, 'dali'; "
            "assert alexnet_pipe.__version__")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.parametrize("name", alexnet_pipe.__all__)
def test_every_public_name_resolves_and_has_a_docstring(name):
    obj = getattr(alexnet_pipe, name)
    doc = inspect.getdoc(obj) or ""
    assert doc.strip(), f"{name} has no docstring"
    assert not doc.startswith(f"{getattr(obj, '__name__', name)}("), f"{name}: only the dataclass's generated doc"
    assert name in dir(alexnet_pipe)


def test_public_names_do_not_shadow_submodules():
    # `alexnet_pipe.convert.job` is a module: a function of that name would turn into the module once
    # anything imports alexnet_pipe.convert.job.
    package = Path(alexnet_pipe.__file__).parent
    assert not {p.stem for p in package.glob("*.py")} & set(alexnet_pipe.__all__)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        alexnet_pipe.nope  # noqa: B018


def test_the_docs_list_every_public_name():
    text = (REPO / "docs" / "API.md").read_text(encoding="utf-8")
    assert [name for name in alexnet_pipe.__all__ if f"`{name}" not in text] == []


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("api")
    make_image_tree(SynthConfig(root / "raw", 5, 2, (96, 72), ("circle", "square", "ring"), seed=2))
    alexnet_pipe.run_convert(alexnet_pipe.ConvertConfig(
        src=root / "raw", dst=root / "data", shard_size=4, workers=1, progress=False,
        image=alexnet_pipe.ImageSettings(short_side=72)))
    return root / "data"


def _batches(loader) -> list:
    try:
        return [(b.step, b.images.clone(), b.labels.clone(), b.flipped.clone()) for b in loader]
    finally:
        loader.close()


@pytest.mark.parametrize(("split", "epoch", "step", "rank", "world"),
                         [("train", 0, 0, 0, 1), ("train", 2, 1, 0, 1), ("train", 1, 0, 1, 2), ("val", 0, 0, 0, 1)])
def test_loader_is_the_loader_training_reads(data, split, epoch, step, rank, world):
    ours = alexnet_pipe.loader(str(data), split, batch_size=4, crop=64, epoch=epoch, step=step, backend="cpu",
                               rank=rank, world_size=world, seed=5, data_threads=1)
    cfg = TrainConfig(data_dir=data, batch_size=4, crop=64, backend="cpu", rng_seed=5, rank=rank,
                      world_size=world, data_threads=1)
    theirs = epoch_loader(cfg, epoch, split, start_step=step)
    a, b = _batches(ours), _batches(theirs)
    assert a and len(a) == len(b)
    assert a[0][0] == step
    for (sa, ia, la, fa), (sb, ib, lb, fb) in zip(a, b):
        assert sa == sb and torch.equal(ia, ib) and torch.equal(la, lb) and torch.equal(fa, fb)
    assert tuple(a[0][1].shape[1:]) == (3, 64, 64)


def test_open_dataset_takes_a_str_or_a_path(data):
    assert alexnet_pipe.open_dataset(str(data)).root == data
    assert alexnet_pipe.open_dataset(data).num_classes == 3
