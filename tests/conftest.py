"""Shared fixtures: tiny, distinguishable images written with real codecs in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.images import make_tree


@pytest.fixture
def raw_tree(tmp_path) -> Path:
    """A raw ImageNet-layout tree: 3 classes, 6 train and 2 val images each."""
    root = tmp_path / "raw"
    make_tree(root, {"train": 6, "val": 2})
    return root


def pytest_collection_modifyitems(config, items):
    """Skip @pytest.mark.gpu tests where torch sees no CUDA device (CI, laptops)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `in keywords`: a folder named gpu matches that
            item.add_marker(skip)


@pytest.fixture(scope="module")
def torch_threads():
    """torch on two threads for a module (the CI machine's cores), restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
