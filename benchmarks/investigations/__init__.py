"""One-off investigations: each answered one question, recorded in benchmarks/RESULTS.md and results/.

Run from the repository root, e.g. `python -m benchmarks.investigations.cpu_gap`; see README.md here.
"""
