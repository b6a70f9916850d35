"""The answer domain: the pipeline's seven steps, coalescing, events and domain errors."""
