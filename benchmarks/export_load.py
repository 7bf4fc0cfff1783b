r"""Exporting and loading a model: what `launch.py --mode=export` costs and gives, and how fast each way of
loading a model starts to caption.

  python launch.py                                   # once: trains workdirs/demo (the demo model)
  python -m benchmarks.export_load                   # the demo model and a Flickr8k-sized one, 2 rounds
  python -m benchmarks.export_load --workdir=W --models=demo --rounds=3 --scratch=/tmp/export_load

Two models (--models):
- `demo`: the trained model in --workdir (default workdirs/demo; the script stops if there is none).
- `flickr8k`: capjax/configs/default.py (ResNet50, 224 px, captions of 24 tokens) with a 5,500-word
  vocabulary and random weights, written as a workdir with one checkpoint (step 1) into --scratch: a
  Flickr8k-sized model without training (its captions are random words).
For each, the script times `python launch.py --mode=export --beam_size=3 --checkpoint_step=latest` (the whole
command, process start-up included) and records the size of every file of the export, of the export, of
the workdir and of its checkpoints. Then, --rounds times, three fresh processes (no compilation cache:
JAX_COMPILATION_CACHE_DIR, XLA_FLAGS and PYTHONPATH are cleared) each caption one 500x375 JPEG
(harness.flickr_like_records) greedily, batch 1:
- `workdir`: `inference.ImageCaptioner.from_workdir(W, checkpoint='latest')` (orbax, the Flax model);
- `from_export`: `inference.ImageCaptioner.from_export(E)` (config.json + weights.safetensors);
- `standalone`: examples/caption_with_export.py's functions on the serialized greedy function, run from a
  temporary directory with capjax's checkout off sys.path and `import capjax` blocked (jax, numpy and
  pillow only, as a user of the export without capjax would run it).
Each reports its imports, the load (until the weights are on the device), the first caption (compilation
included) and the steady-state caption (median of --calls calls), and the whole process's wall time. The
three must give the same caption (the script exits 1 otherwise).

On the 2-core CPU machine both models with 2 rounds take about 2 minutes.
"""

import json
import math
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ''):  # run as `python benchmarks/export_load.py`
  sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from absl import app
from absl import flags

from benchmarks import harness
from capjax import checkpointing
from capjax import vocab as vocab_lib
from capjax import workdir as workdir_lib
from capjax.configs import default
from capjax.models import captioner

FLAGS = flags.FLAGS

MODELS = ('demo', 'flickr8k')
KINDS = ('workdir', 'from_export', 'standalone')
EXAMPLE = os.path.join(harness.REPO_ROOT, 'examples', 'caption_with_export.py')
EXPORT_BEAM_SIZE = 3
FLICKR8K_VOCAB = 5500  # Flickr8k's vocabulary at min count 5 is about this size (benchmarks use 5,507)
# The children start as a user's process would: no compilation cache, no XLA flags, nothing extra on the path.
CLEARED_ENV = ('PYTHONPATH', 'JAX_COMPILATION_CACHE_DIR', 'XLA_FLAGS')


def define_flags() -> None:
  # Only when this file runs as the program: absl flags are process-global and the benchmarks import
  # one another (benchmarks/harness.py, "Flags").
  flags.DEFINE_string('workdir', 'workdirs/demo', 'The demo model (`python launch.py` trains it there); '
                      'the default is relative to the repository root.')
  flags.DEFINE_list('models', list(MODELS), 'Which models: demo (--workdir) and/or flickr8k (random '
                    'weights, written into --scratch).')
  flags.DEFINE_integer('rounds', 2, 'Fresh processes per model and kind of loading.')
  flags.DEFINE_integer('calls', 15, 'Caption calls per process after the first; the median is reported.')
  flags.DEFINE_string('scratch', None, 'Where the exports and the flickr8k workdir go (an existing '
                      'flickr8k workdir there is reused); default a temporary directory, removed at the end.')
  flags.DEFINE_string('output', None, 'JSON path; default benchmarks/results/export_load.json.')


# One process per measurement, run with `python -c` from an empty directory. It imports nothing of the
# benchmark (harness imports capjax): argv = kind, model source, image, repository root, example, calls.
_CHILD = r'''
import importlib.abc, importlib.util, json, os, sys, time
start = time.perf_counter()
kind, source, image, repo_root, example, calls = sys.argv[1:7]
if kind == 'standalone':
  # As a user without capjax: the checkout off sys.path, and capjax not importable even if installed.
  sys.path[:] = [p for p in sys.path if os.path.realpath(p or '.') != os.path.realpath(repo_root)]

  class NoCapjax(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
      if name.split('.')[0] in ('capjax', 'configs', 'benchmarks'):
        raise ImportError(f'{name}: the standalone kind runs without capjax')
      return None
  sys.meta_path.insert(0, NoCapjax())
else:
  sys.path.insert(0, repo_root)
import numpy as np
import jax
out = {}
if kind == 'standalone':
  spec = importlib.util.spec_from_file_location('caption_with_export', example)
  ex = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(ex)
  out['imports_s'] = time.perf_counter() - start
  t = time.perf_counter()
  with open(os.path.join(source, 'manifest.json'), encoding='utf-8') as f:
    manifest = json.load(f)
  function = manifest['functions']['greedy']
  batch = 1 if function['batch'] == 'symbolic' else min(function['batch'])
  key = 'b' if function['batch'] == 'symbolic' else str(batch)
  exported = jax.export.deserialize(bytearray(ex.read_verified(source, function['files'][key], manifest)))
  weights = ex.read_safetensors(ex.read_verified(source, 'weights.safetensors', manifest))
  words = json.loads(ex.read_verified(source, 'vocab.json', manifest))['words']
  size = json.loads(ex.read_verified(source, 'preprocessing.json', manifest))['image_size']
  jax.block_until_ready(weights)
  out['load_s'] = time.perf_counter() - t

  def caption():
    pixels = ex.load_image(image, size)[None]
    pixels = np.concatenate([pixels, np.zeros((batch - 1,) + pixels.shape[1:], np.uint8)])
    tokens, lengths = exported.call(weights, pixels)
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    return ' '.join(words[t] for t in tokens[0][:lengths[0]] if t > 1)
else:
  from capjax import inference
  out['imports_s'] = time.perf_counter() - start
  t = time.perf_counter()
  decode = dict(beam_size=1, length_penalty=0.0, no_repeat_ngram=0, batch_size=1)
  if kind == 'workdir':
    model = inference.ImageCaptioner.from_workdir(source, checkpoint='latest', **decode)
  else:
    model = inference.ImageCaptioner.from_export(source, **decode)
  jax.block_until_ready(model.variables)
  out['load_s'] = time.perf_counter() - t

  def caption():
    return model.caption([image])[0]
t = time.perf_counter()
out['caption'] = caption()
out['first_caption_s'] = time.perf_counter() - t
times = []
for _ in range(int(calls)):
  t = time.perf_counter()
  caption()
  times.append(time.perf_counter() - t)
out['steady_caption_ms'] = 1000 * float(np.median(times))
out['steady_caption_ms_min'] = 1000 * min(times)
out['capjax_imported'] = any(m == 'capjax' or m.startswith('capjax.') for m in sys.modules)
out['backend'] = jax.default_backend()
print('RESULT ' + json.dumps(out), flush=True)
'''


def has_checkpoints(workdir: str) -> bool:
  folder = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def write_random_workdir(workdir: str) -> None:
  """capjax/configs/default.py with a FLICKR8K_VOCAB-word vocabulary and random weights (He-like normal
  kernels, BatchNorm at identity), saved as a workdir with one checkpoint (step 1). Run in a child
  process (`child_env`), so that this process never holds the model."""
  config = default.get_config()
  vocab = vocab_lib.Vocabulary(
      vocab_lib.SPECIALS + tuple(f'word{i}' for i in range(FLICKR8K_VOCAB - len(vocab_lib.SPECIALS))), 5)
  model = captioner.build_captioner(config.model, len(vocab))
  shapes = captioner.abstract_variables(model, config.data.image_size, config.data.max_caption_len)
  variables = harness.random_variables(shapes, seed=0)
  os.makedirs(workdir, exist_ok=True)
  workdir_lib.save_config(workdir, workdir_lib.with_absolute_paths(config))
  workdir_lib.save_vocab(workdir, vocab)
  checkpointer = checkpointing.Checkpointer(workdir_lib.checkpoint_dir(workdir),
                                            best_metric=config.train.best_metric,
                                            best_mode=config.train.best_mode)
  checkpointer.save(1, dict(variables), run_info={'identity': workdir_lib.run_identity(config, vocab)})
  checkpointer.close()


def child_env() -> dict:
  return {k: v for k, v in os.environ.items() if k not in CLEARED_ENV}


def make_flickr8k_workdir(workdir: str) -> dict:
  if has_checkpoints(workdir):
    print(f'flickr8k: reusing the workdir in {workdir}', flush=True)
    return {'workdir': workdir, 'written_here': False}
  print('flickr8k: writing configs/default.py with random weights as a workdir...', flush=True)
  start = time.perf_counter()
  code = 'import sys; from benchmarks import export_load; export_load.write_random_workdir(sys.argv[1])'
  done = subprocess.run([sys.executable, '-c', code, workdir], cwd=harness.REPO_ROOT, env=child_env(),
                        capture_output=True, text=True)
  if done.returncode:
    raise RuntimeError(f'writing the flickr8k workdir failed:\n{done.stderr[-3000:]}')
  return {'workdir': workdir, 'written_here': True, 'write_s': time.perf_counter() - start}


def du(path: str) -> int:
  """Bytes of the files under `path`."""
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def safetensors_values(path: str) -> int:
  """How many numbers weights.safetensors holds (parameters and BatchNorm statistics), from its header."""
  with open(path, 'rb') as f:
    (size,) = struct.unpack('<Q', f.read(8))
    header = json.loads(f.read(size))
  header.pop('__metadata__', None)
  return sum(math.prod(info['shape']) for info in header.values())


def export(workdir: str, export_dir: str) -> dict:
  """Times `launch.py --mode=export` (a fresh export_dir) and measures what it wrote."""
  shutil.rmtree(export_dir, ignore_errors=True)
  command = [sys.executable, os.path.join(harness.REPO_ROOT, 'launch.py'), '--mode=export',
             f'--workdir={workdir}', f'--export_dir={export_dir}', f'--beam_size={EXPORT_BEAM_SIZE}',
             '--checkpoint_step=latest']
  start = time.perf_counter()
  done = subprocess.run(command, cwd=harness.REPO_ROOT, env=child_env(), capture_output=True, text=True)
  seconds = time.perf_counter() - start
  if done.returncode:
    raise RuntimeError(f'the export failed (exit {done.returncode}):\n{done.stderr[-3000:]}')
  said = done.stdout.strip().splitlines()
  return {'export_command_s': seconds, 'export_said': said[-1] if said else '',
          'files': {f: os.path.getsize(os.path.join(export_dir, f)) for f in sorted(os.listdir(export_dir))},
          'export_bytes': du(export_dir), 'workdir_bytes': du(workdir),
          'checkpoints_bytes': du(os.path.join(workdir, 'checkpoints')),
          'weight_values': safetensors_values(os.path.join(export_dir, 'weights.safetensors'))}


def load_and_caption(kind: str, source: str, image: str, cwd: str) -> dict:
  """One fresh process that loads the model `kind`'s way and captions `image`."""
  start = time.perf_counter()
  done = subprocess.run([sys.executable, '-c', _CHILD, kind, source, image, harness.REPO_ROOT, EXAMPLE,
                         str(FLAGS.calls)], cwd=cwd, env=child_env(), capture_output=True, text=True)
  seconds = time.perf_counter() - start
  if done.returncode:
    raise RuntimeError(f'the {kind} process failed (exit {done.returncode}):\n{done.stderr[-3000:]}')
  line = next(line for line in done.stdout.splitlines() if line.startswith('RESULT '))
  return {**json.loads(line[len('RESULT '):]), 'process_s': seconds}


def measure_model(name: str, workdir: str, scratch: str, image: str, cwd: str) -> dict:
  result = {'workdir': workdir, 'runs': {kind: [] for kind in KINDS}}
  if name == 'flickr8k':
    result.update(make_flickr8k_workdir(workdir))
  export_dir = os.path.join(scratch, f'{name}_export')
  result.update(export(workdir, export_dir))
  print(f"{name}: {result['export_said']}", flush=True)
  for round_ in range(FLAGS.rounds):
    for kind in KINDS:
      source = workdir if kind == 'workdir' else export_dir
      run = load_and_caption(kind, source, image, cwd)
      result['runs'][kind].append(run)
      print(f"  round {round_ + 1} {kind}: imports {run['imports_s']:.1f} s, load {run['load_s']:.2f} s, "
            f"first caption {run['first_caption_s']:.1f} s, then {run['steady_caption_ms']:.0f} ms",
            flush=True)
  captions = {run['caption'] for runs in result['runs'].values() for run in runs}
  result['same_caption'] = len(captions) == 1
  result['captions'] = sorted(captions)
  return result


def size_row(name: str, result: dict) -> dict:
  mib = lambda n: n / 2**20  # noqa: E731
  return {'model': name, 'weight_values': f"{result['weight_values']:,}",
          'export_s': result['export_command_s'], 'export_MiB': mib(result['export_bytes']),
          'weights_MiB': mib(result['files']['weights.safetensors']),
          'functions_KiB': sum(n for f, n in result['files'].items() if f.endswith('.jaxexport')) / 1024,
          'workdir_MiB': mib(result['workdir_bytes']), 'checkpoints_MiB': mib(result['checkpoints_bytes'])}


def load_rows(name: str, result: dict) -> list[dict]:
  """Per kind, the median over the rounds of each number."""
  rows = []
  for kind in KINDS:
    runs = result['runs'][kind]
    rows.append({'model': name, 'kind': kind, 'rounds': len(runs),
                 **{key: statistics.median(run[key] for run in runs)
                    for key in ('imports_s', 'load_s', 'first_caption_s', 'steady_caption_ms', 'process_s')}})
  return rows


def main(argv):
  harness.start(argv)
  unknown = sorted(set(FLAGS.models) - set(MODELS))
  if unknown or not FLAGS.models:
    raise app.UsageError(f'--models: {", ".join(unknown) or "none"}; choose from {", ".join(MODELS)}')
  if FLAGS.rounds < 1 or FLAGS.calls < 1:
    raise app.UsageError('--rounds and --calls must be at least 1')
  demo = os.path.abspath(FLAGS.workdir if FLAGS['workdir'].present
                         else os.path.join(harness.REPO_ROOT, FLAGS.workdir))
  if 'demo' in FLAGS.models and not has_checkpoints(demo):
    raise SystemExit(f'No model in {demo}: run `python launch.py` first (it trains the demo model there), '
                     'or pass --workdir or --models=flickr8k.')
  temporary = None if FLAGS.scratch else tempfile.TemporaryDirectory(prefix='capjax-export-load-')
  scratch = os.path.abspath(FLAGS.scratch) if FLAGS.scratch else temporary.name
  try:
    os.makedirs(scratch, exist_ok=True)
    image = os.path.join(scratch, 'photo.jpg')
    with open(image, 'wb') as f:
      f.write(harness.flickr_like_records(1)[0]['image'])
    cwd = tempfile.mkdtemp(prefix='cwd-', dir=scratch)  # the children's empty working directory
    before = harness.idle_check()
    print(f'before the run: {harness.describe_load(before)}', flush=True)
    monitor, results = harness.LoadMonitor(), {}
    for name in FLAGS.models:
      workdir = demo if name == 'demo' else os.path.join(scratch, 'flickr8k_workdir')
      results[name] = measure_model(name, workdir, scratch, image, cwd)
    load = monitor.report()
  finally:
    if temporary:
      temporary.cleanup()
  print()
  harness.print_table([size_row(name, r) for name, r in results.items()],
                      ['model', 'weight_values', 'export_s', 'export_MiB', 'weights_MiB', 'functions_KiB',
                       'workdir_MiB', 'checkpoints_MiB'])
  print()
  rows = [row for name, r in results.items() for row in load_rows(name, r)]
  harness.print_table(rows, ['model', 'kind', 'rounds', 'imports_s', 'load_s', 'first_caption_s',
                             'steady_caption_ms', 'process_s'])
  print()
  for name, r in results.items():
    print(f"{name}: {'the same caption' if r['same_caption'] else 'DIFFERENT captions'} from every process: "
          f"{' | '.join(r['captions'])[:200]}")
  machine = harness.machine_info()
  print(f'{machine}\n{harness.describe_load(load)}')
  harness.write_json(FLAGS.output or harness.default_output(__file__), {
      'benchmark': 'export_load', 'argv': sys.argv, 'machine': machine,
      'settings': vars(harness.script_flags()),
      'export_command': f'launch.py --mode=export --beam_size={EXPORT_BEAM_SIZE} --checkpoint_step=latest',
      'image': '500x375 JPEG (harness.flickr_like_records), greedy, batch 1',
      'load_before': before, 'load_during': load, 'rows': rows, 'models': results})
  if not all(r['same_caption'] for r in results.values()):
    raise SystemExit(1)


if __name__ == '__main__':
  define_flags()
  app.run(main)
