"""pytest-benchmark collection for `pytest benchmarks --benchmark-only` (not part of the CI test suite)."""
