"""The small apps: predict, benchmark, inspect, plot, info and the synthetic image sets."""
