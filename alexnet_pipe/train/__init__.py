"""Training: the loop, the run's runtime, start, state, distribution, preemption and logging."""
