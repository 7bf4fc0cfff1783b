"""What every benchmark shares: its flags, machine load, device facts, peak FLOP/s, test JPEGs, synthetic
batches, tables and JSON."""

import dataclasses
import datetime
import glob
import io
import json
import os
import platform
import sys
import time
import types

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from capjax import vocab as vocab_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every benchmark's raw results, the investigations' (benchmarks/investigations/) included.
RESULTS_DIR = os.path.join(REPO_ROOT, 'benchmarks', 'results')

# Dense peak FLOP/s per chip from the vendors' data sheets (SXM parts unless named). float32 is the
# TF32 tensor-core rate: XLA's default matmul/conv precision on Ampere and newer GPUs uses TF32 for
# float32 (with jax_default_matmul_precision='highest' the plain FP32 rate applies: 67 TFLOP/s on
# H100/H200, 19.5 on A100). Matched against `device_kind` in this order, first hit wins.
PEAK_FLOPS = (
    ('H100 PCIe', {'bfloat16': 756e12, 'float32': 378e12}),
    ('H100', {'bfloat16': 989e12, 'float32': 495e12}),
    ('H200', {'bfloat16': 989e12, 'float32': 495e12}),
    ('A100', {'bfloat16': 312e12, 'float32': 156e12}),
)

# Another process using more than this many cores during a run marks the machine as busy.
BUSY_CORES = 0.25


# ----------------------------------------------------------------------------------------------
# Flags. Each script defines its absl flags in `define_flags()`, called only when the file runs as the
# program (`if __name__ == '__main__': define_flags(); app.run(main)`): absl flags are process-global,
# the scripts import one another and the tests import several into one process, and many share names
# (--steps, --output...).


def script_flags() -> types.SimpleNamespace:
  """The parsed flags that the program (the file run as `__main__`) defined, one attribute each, in the
  order defined: what `argparse` returned (`vars()` of it is the settings a result records)."""
  # absl files the flags that `__main__` defines under sys.argv[0], as --helpshort reads them.
  own = flags.FLAGS.get_key_flags_for_module(sys.argv[0])
  return types.SimpleNamespace(**{flag.name: flag.value for flag in own})


def start(argv: list[str]) -> None:
  """What every benchmark's `main(argv)` does first. absl leaves the arguments that are not flags in argv:
  no benchmark takes any. `app.run` turns on the libraries' INFO logs (jax, orbax...): as in launch.py,
  they stay off unless --verbosity asks for them, so a run shows what the script prints."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}: every setting is a --flag (see --helpshort)')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


def on_cpu() -> bool:
  import jax  # pylint: disable=g-import-not-at-top  (grain workers import this module: keep it light)
  return jax.default_backend() == 'cpu'


def default_batch(flag: int, cpu: int, accelerator: int) -> int:
  """`flag`, or a global batch of `cpu` (on CPUs) or `accelerator` examples per device."""
  import jax  # pylint: disable=g-import-not-at-top
  return flag or jax.device_count() * (cpu if on_cpu() else accelerator)


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """Peak FLOP/s of one chip, or None where unknown (CPUs, other accelerators)."""
  for name, peaks in PEAK_FLOPS:
    if name.lower() in device_kind.lower():
      return peaks[dtype]
  return None


def _cpu_jiffies() -> tuple[int, int]:
  """(busy, total) jiffies over all cores since boot, from /proc/stat; (0, 0) where there is none."""
  try:
    with open('/proc/stat') as f:
      fields = [int(x) for x in f.readline().split()[1:]]
  except OSError:
    return 0, 0
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
  return sum(fields) - idle, sum(fields)


def _own_cpu_seconds() -> float:
  t = os.times()
  return t.user + t.system + t.children_user + t.children_system


class LoadMonitor:
  """How busy the machine was during a run, and how much of that was someone else.

  `others_cores` = all CPU time used on the machine minus this process's (and its reaped children's),
  per wall second: about 2.0 means another job kept both cores of this machine busy."""

  def __init__(self):
    self._start = (time.perf_counter(), _cpu_jiffies(), _own_cpu_seconds())

  def report(self) -> dict:
    (t0, (busy0, total0), own0) = self._start
    wall = time.perf_counter() - t0
    busy1, total1 = _cpu_jiffies()
    cores = os.cpu_count() or 1
    machine_cores = cores * (busy1 - busy0) / max(total1 - total0, 1)
    own_cores = (_own_cpu_seconds() - own0) / max(wall, 1e-9)
    others = max(machine_cores - own_cores, 0.0)
    return {'wall_s': round(wall, 1), 'machine_cores_busy': round(machine_cores, 2),
            'own_cores': round(own_cores, 2), 'others_cores': round(others, 2),
            'loadavg_1m': round(os.getloadavg()[0], 2), 'busy': others > BUSY_CORES}


def wait_until_quiet(max_cores: float = 0.1, timeout_s: float = 30.0) -> float:
  """Waits until this process (and its reaped children) use under `max_cores`, e.g. until a closed
  pipeline's prefetch threads have finished their batches. Returns the seconds waited."""
  start = time.perf_counter()
  while time.perf_counter() - start < timeout_s:
    own = _own_cpu_seconds()
    time.sleep(0.25)
    if (_own_cpu_seconds() - own) / 0.25 < max_cores:
      break
  return time.perf_counter() - start


def idle_check(seconds: float = 1.0) -> dict:
  """Samples the machine for `seconds` while this process sleeps: others' load before a run."""
  monitor = LoadMonitor()
  time.sleep(seconds)
  return monitor.report()


def describe_load(load: dict) -> str:
  state = 'BUSY' if load['busy'] else 'quiet'
  return (f"machine {state}: other processes used {load['others_cores']:.2f} of {os.cpu_count()} "
          f"cores during the run (this benchmark {load['own_cores']:.2f}), "
          f"load average {load['loadavg_1m']}")


def machine_info() -> dict:
  """Host and library facts recorded with every result."""
  import jax  # pylint: disable=g-import-not-at-top
  info = {'date': datetime.date.today().isoformat(), 'host_cores': os.cpu_count(),
          'python': platform.python_version(), 'jax': jax.__version__,
          'backend': jax.default_backend(), 'device_kind': jax.devices()[0].device_kind,
          'device_count': jax.device_count()}
  if 'torch' in sys.modules:
    info['torch'] = sys.modules['torch'].__version__
  return info


def set_torch_threads(threads: int) -> int:
  """torch's intra-op threads (0 keeps its default, one per core); returns the count in use. On a
  machine shared with another job, torch's default of one OpenMP thread per core can be many times
  slower than 1 thread (see RESULTS.md): record which one a number was measured with."""
  import torch  # pylint: disable=g-import-not-at-top
  if threads:
    torch.set_num_threads(threads)
  return torch.get_num_threads()


# ----------------------------------------------------------------------------------------------
# Test images


def flickr_like_records(n: int, width: int = 500, height: int = 375, seed: int = 0) -> list[dict]:
  """`n` records shaped like Flickr8k's: 500x375 JPEGs (quality 90) of noisy drawn shapes, five
  captions each. JPEG decode time depends on the pixel count far more than on the content."""
  from capjax.data import shapes  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  records = []
  for i in range(n):
    image, captions, _ = shapes.render_example(rng, max(width, height))
    buffer = io.BytesIO()
    image.crop((0, 0, width, height)).save(buffer, format='JPEG', quality=90)
    records.append({'image': buffer.getvalue(), 'image_id': f'bench_{i:05d}.jpg', 'captions': captions})
  return records


def records_from_dir(pattern: str, limit: int) -> list[dict]:
  """Real JPEGs (e.g. Flickr8k's Images/*.jpg) as records with a placeholder caption."""
  paths = sorted(glob.glob(os.path.expanduser(pattern)))[:limit]
  if not paths:
    raise FileNotFoundError(f'no files match {pattern!r}')
  records = []
  for path in paths:
    with open(path, 'rb') as f:
      records.append({'image': f.read(), 'image_id': os.path.basename(path),
                      'captions': ['a photo']})
  return records


# ----------------------------------------------------------------------------------------------
# Synthetic training batches


def random_variables(shapes_tree, seed: int):
  """Fan-in scaled normal weights, BatchNorm at identity (scale and var 1, bias and mean 0): a freshly
  initialised model made in numpy from its abstract variables (jitting the model's init compiles for
  longer than a small benchmark or test runs)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name in ('scale', 'var'):
      return np.ones(leaf.shape, leaf.dtype)
    if name in ('bias', 'mean'):
      return np.zeros(leaf.shape, leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1])) or 1
    return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes_tree)


def random_tokens(rng: np.random.Generator, batch: int, max_len: int, vocab: int) -> np.ndarray:
  """Caption-like rows: <START>, 8-18 words, <END>, then <PAD>."""
  tokens = np.full((batch, max_len), vocab_lib.PAD_ID, np.int32)
  for row in tokens:
    longest = min(18, max_len - 2)
    n = int(rng.integers(min(8, longest), longest + 1))
    row[:n + 2] = [vocab_lib.START_ID, *rng.integers(4, vocab, n), vocab_lib.END_ID]
  return tokens


def vocabulary_of(records: list[dict]) -> vocab_lib.Vocabulary:
  """Every word of the records' captions (min count 1): the vocabulary of a benchmark dataset."""
  return vocab_lib.build_vocabulary((c for r in records for c in r['captions']), min_count=1)


def default_optimizer(encoder_mode: str):
  """capjax's optimizer for `encoder_mode` with the default config's settings."""
  from capjax import state as state_lib  # pylint: disable=g-import-not-at-top  (see on_cpu)
  from configs import default  # pylint: disable=g-import-not-at-top
  train_cfg = default.get_config().train
  return state_lib.make_optimizer(train_cfg, state_lib.make_schedule(train_cfg, 100, 1000),
                                  encoder_mode)


def time_steps(compiled, state, batches, warmup: int, steps: int):
  """Runs warmup + steps of a train step; `batches` yields (device batch, seconds waited for it).
  Returns (state, seconds of the timed steps, seconds of them spent waiting for batches)."""
  import jax  # pylint: disable=g-import-not-at-top  (see on_cpu)
  for _ in range(warmup):
    state, metrics = compiled(state, next(batches)[0])
  jax.block_until_ready((state, metrics))
  waited, start = 0.0, time.perf_counter()
  for _ in range(steps):
    batch, wait = next(batches)
    waited += wait
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  return state, time.perf_counter() - start, waited


def repeat_batch(batch):
  """The same device batch forever, with no wait: a step's speed without an input pipeline."""
  while True:
    yield batch, 0.0


def synthetic_batch(mode: str, batch: int, image_size: int, max_len: int, vocab: int) -> dict:
  rng = np.random.default_rng(0)
  out = {'tokens': random_tokens(rng, batch, max_len, vocab)}
  if mode == 'cached':
    out['features'] = rng.random((batch, 2048), np.float32)  # pooled post-ReLU features are >= 0
  else:
    out['image'] = rng.integers(0, 256, (batch, image_size, image_size, 3), np.uint8)
  return out


# ----------------------------------------------------------------------------------------------
# Output


def print_table(rows: list[dict], columns: list[str]) -> None:
  """A plain aligned text table of `columns` (missing values print as '-')."""
  def fmt(value):
    if value is None:
      return '-'
    if isinstance(value, float):
      return f'{value:,.3g}' if abs(value) < 100 else f'{value:,.0f}'
    return str(value)
  cells = [[fmt(row.get(c)) for c in columns] for row in rows]
  widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
  print('  '.join(c.rjust(w) for c, w in zip(columns, widths)))
  for r in cells:
    print('  '.join(v.rjust(w) for v, w in zip(r, widths)))


def write_json(path: str, payload: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(payload, f, indent=1, default=_jsonable)
  print(f'wrote {path}')


def _jsonable(value):
  if dataclasses.is_dataclass(value):
    return dataclasses.asdict(value)
  if isinstance(value, np.generic):
    return value.item()
  return str(value)


def default_output(script_file: str) -> str:
  """benchmarks/results/<script>.json: the raw numbers behind benchmarks/RESULTS.md."""
  name = os.path.splitext(os.path.basename(script_file))[0]
  return os.path.join(RESULTS_DIR, f'{name}.json')
