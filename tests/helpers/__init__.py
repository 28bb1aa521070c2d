"""Helpers shared by the test modules: images, archives, pixels, pickles."""
