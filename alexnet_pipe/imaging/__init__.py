"""Imaging: one input -> one clean, validated baseline JPEG."""
