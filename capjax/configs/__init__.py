"""The runnable configs, shipped in the package (the `capjax` command's default is `demo`); each holds its
command line in its docstring. A checkout's configs/*.py are one-line aliases of these, so
`--config=configs/demo.py` and `from configs import tiny` keep working."""
