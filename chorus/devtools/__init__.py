"""Developer tools: generated checkpoints for tests, demos and benchmarks; docs generation."""
