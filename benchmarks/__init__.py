"""Benchmarks, one script per kernel and pipeline stage; installed as ctrlsafe.benchmarks so that
`ctrlsafe bench` runs them from an install. Each script: `python benchmarks/bench_X.py [--quick]`."""
