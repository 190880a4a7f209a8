"""Developer tools: models built offline for tests and benchmarks (no weights downloaded)."""
