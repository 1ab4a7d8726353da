"""Benchmarks: ratios against stock diffusers measured in the same run (``python -m benchmarks.<name>``)."""
