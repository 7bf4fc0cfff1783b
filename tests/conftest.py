"""Test setup: 8 simulated CPU devices (set before JAX is imported), a compilation cache shared by the
run's tests, and parsed absl flags."""

import atexit
import os
import shutil
import sys
import tempfile

# Tests compile many small programs and run each for a few steps: XLA's compile time dominates (a tiny
# train step: 25 s to compile, 20 ms to run), and backend optimisation level 0 cuts compiling by ~40%.
# CAPJAX_TEST_XLA_OPT=1 keeps XLA's default optimisation (what training and the benchmarks use).
_opt = '' if os.environ.get('CAPJAX_TEST_XLA_OPT') == '1' else ' --xla_backend_optimization_level=0'
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8' + _opt).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Most tests build the same tiny models (configs/tiny.py), so many of their XLA programs are identical;
# JAX's persistent compilation cache compiles each once per test run (measured: tests/test_encoder_modes.py
# 145 s without, 119 s with an empty cache, 41 s with a filled one). Set through the environment so the
# launch.py and worker subprocesses the tests start share it. A fresh folder per run unless
# CAPJAX_TEST_COMPILATION_CACHE names one to keep.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = os.environ.get('CAPJAX_TEST_COMPILATION_CACHE')
  if not _cache:
    _cache = tempfile.mkdtemp(prefix='capjax-test-jax-cache-')
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402  pylint: disable=g-import-not-at-top

# grain worker processes and absl-logging code read flags; pytest does not parse them.
flags.FLAGS.mark_as_parsed()
