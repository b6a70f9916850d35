"""The answer domain: the pipeline's seven steps, coalescing, the events and their observer."""
