"""Inputs: a raw tree, archives or list files -> a table of images and labels (no image is opened)."""
