"""Storage formats: the on-disk codecs (Caffe Datum, MXNet RecordIO, BlobProto) and shard files."""
