"""Benchmark scripts: each builds rows over `l2c.evaluate` / `l2c.timing` and writes them with `l2c.results`.

Run them from the repository root as `python -m bench.<name> ...` or `python bench/<name>.py ...`.
"""
