"""The model: the network, what it expects as input, checkpoints and weight importers."""
