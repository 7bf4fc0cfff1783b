"""Throughput benchmarks for capjax (training, input pipeline, inference) and a PyTorch yardstick.

Run from the repository root, e.g. `python -m benchmarks.train_throughput`; see benchmarks/README.md.
"""
