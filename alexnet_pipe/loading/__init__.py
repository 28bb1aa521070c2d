"""Loading: epoch order, the DALI source and pipelines, and the loader that yields batches."""
