"""alexnet-pipe: ImageNet-style images -> sharded LMDB/RecordIO -> DALI -> AlexNet."""

__version__ = "0.1.0"
