"""alexnet-pipe: ImageNet-style images -> sharded LMDB/RecordIO -> DALI -> AlexNet.

The public Python API (docs/API.md), the library under the ``alexnet-pipe`` command line:

- convert a tree of images: ``run_convert(ConvertConfig(src, dst, image=ImageSettings(...)))``
- open a converted dataset: ``open_dataset(dst)`` -> ``Dataset``
- feed any torch model: ``loader(dst, "train", batch_size=..., crop=...)`` -> ``Loader`` of ``Batch``
  (``Loader(dataset, LoaderConfig(...))`` for full control)
- train and test the AlexNet recipe as the CLI does: ``fit(TrainConfig(dst))``,
  ``evaluate_weights(TrainConfig(dst, model_file=..., test_only=True))``
- classify image files with trained weights: ``run_predict(PredictConfig(model_file, inputs))``

The names are resolved lazily (PEP 562): ``import alexnet_pipe`` imports neither torch nor DALI,
so the converter's worker processes, which import the package, start fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute); resolved on first use by __getattr__
_PUBLIC = {
    "ConvertConfig": ("config", "ConvertConfig"),
    "ImageSettings": ("config", "ImageSettings"),
    "run_convert": ("convert.job", "run_convert"),
    "Dataset": ("dataset.manifest", "Dataset"),
    "open_dataset": ("dataset.manifest", "load_dataset"),
    "TrainConfig": ("config", "TrainConfig"),
    "fit": ("train.loop", "fit"),
    "evaluate_weights": ("train.evaluate", "run_test"),
    "PredictConfig": ("apps.predict", "PredictConfig"),
    "run_predict": ("apps.predict", "run_predict"),
    "loader": ("loading.open", "open_loader"),
    "Loader": ("loading.loader", "Loader"),
    "LoaderConfig": ("loading.pipeline", "LoaderConfig"),
    "Batch": ("loading.loader", "Batch"),
}

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    try:
        module, attr = _PUBLIC[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
