r"""Does an XLA:CPU flag make capjax's training step faster? Each flag set runs the step in its own
process (XLA reads XLA_FLAGS once, when the backend starts), in rotated rounds.

  python -m benchmarks.investigations.xla_flags         # 224 px batch 4, the sets below, ~6 min here
  python -m benchmarks.investigations.xla_flags --shape=64x32 --rounds=1
  python -m benchmarks.investigations.xla_flags --sets='default=;onednn=--xla_cpu_use_onednn=true'

The step is `cpu_gap.capjax_variant`'s: ResNet50 + LSTM, vocabulary 5,507, AdamW, as capjax runs it on
CPU (small_map_conv's rule). A child process compiles it, runs one untimed step, then times `--steps`
steps; the parent starts one child per set and round, the order of the sets rotated every round, and
reports each set's median step time beside the default's. Flags that change numerics (fast math) are
left out on purpose: a faster step that trains differently is not the same step.
"""

import json
import os
import statistics
import subprocess
import sys
import time

if __package__ in (None, ''):  # run as `python benchmarks/investigations/xla_flags.py`
  sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app
from absl import flags

from benchmarks import harness
from benchmarks import structural_wins

_YNN = '--xla_cpu_experimental_ynn_fusion_type='
# name=XLA_FLAGS; the XLA:CPU options of jax 0.10.2 that pick kernels, fusion and scheduling.
DEFAULT_SETS = ';'.join([
    'default=',
    'onednn=--xla_cpu_use_onednn=true',
    'concurrency scheduler=--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED',
    'ynn also eltwise+reduce=' + _YNN + ','.join(
        f'LIBRARY_FUSION_TYPE_{kind}'
        for kind in ('INDIVIDUAL_DOT', 'INDIVIDUAL_CONVOLUTION', 'ELTWISE', 'REDUCE')),
    'ynn dots only=' + _YNN + 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT',
    'no ynn (eigen)=' + _YNN + ' --xla_cpu_use_xnnpack=false',
    'xnn graph fusion=' + _YNN + ' --xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY',
])
_RESULT = 'XLA_FLAGS_RESULT '


def parse_sets(text: str) -> dict[str, str]:
  """'name=flags;name=flags' -> {name: flags}; a flag value may itself contain '='."""
  sets = {}
  for item in filter(None, (s.strip() for s in text.split(';'))):
    name, sep, set_flags = item.partition('=')
    if not sep or not name.strip() or name.lstrip().startswith('-'):  # a flag given without a name
      raise ValueError(f'--sets: expected name=XLA_FLAGS entries separated by ";", got {item!r}')
    sets[name.strip()] = set_flags.strip()
  return sets


def child(image_size: int, batch: int, steps: int) -> None:
  """Times the step under this process's XLA_FLAGS; prints one result line for the parent."""
  import jax  # pylint: disable=g-import-not-at-top  (after the parent set XLA_FLAGS)
  from benchmarks.investigations import cpu_gap  # pylint: disable=g-import-not-at-top
  from capjax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from capjax.models import captioner  # pylint: disable=g-import-not-at-top
  mesh = mesh_lib.make_mesh()
  host_batch = harness.synthetic_batch('train', batch, image_size, cpu_gap.MAX_LEN, cpu_gap.VOCAB)
  advance, compile_s = cpu_gap.capjax_variant(captioner.Captioner(vocab_size=cpu_gap.VOCAB), host_batch,
                                              image_size, mesh)
  advance(1)
  cpu_start, wall_start = time.process_time(), time.perf_counter()
  step_s = advance(steps)
  cores = (time.process_time() - cpu_start) / (time.perf_counter() - wall_start)
  print(_RESULT + json.dumps({'step_s': step_s, 'compile_s': compile_s, 'cores': cores,
                              'backend': jax.default_backend()}), flush=True)


def run_child(set_flags: str, args) -> dict:
  env = dict(os.environ, XLA_FLAGS=set_flags)
  command = [sys.executable, '-m', 'benchmarks.investigations.xla_flags', '--child', f'--shape={args.shape}',
             f'--steps={args.steps}']
  done = subprocess.run(command, env=env, cwd=harness.REPO_ROOT, capture_output=True, text=True,
                        timeout=args.timeout_s)
  for line in done.stdout.splitlines():
    if line.startswith(_RESULT):
      return json.loads(line[len(_RESULT):])
  # XLA rejects an unknown flag or enum value at start-up: report it rather than a number.
  tail = (done.stderr.strip().splitlines() or ['no output'])[-1]
  return {'error': f'exit {done.returncode}: {tail[:300]}'}


def summarise(sets: dict[str, str], results: dict[str, list[dict]], batch: int) -> list[dict]:
  rows = []
  for name, runs in results.items():
    good = [r for r in runs if 'error' not in r]
    if not good:
      rows.append({'set': name, 'flags': sets[name], 'error': runs[-1]['error']})
      continue
    steps_s = [r['step_s'] for r in good]
    step_s = statistics.median(steps_s)
    rows.append({'set': name, 'flags': sets[name], 'step_ms': 1e3 * step_s, 'images_per_s': batch / step_s,
                 'step_ms_range': [1e3 * min(steps_s), 1e3 * max(steps_s)],
                 'cores': statistics.median(r['cores'] for r in good),
                 'compile_s': statistics.median(r['compile_s'] for r in good), 'runs': len(good)})
  default = next((r for r in rows if r['set'] == 'default' and 'step_ms' in r), None)
  for row in rows:
    if default and 'step_ms' in row:
      row['vs_default'] = default['step_ms'] / row['step_ms']
  return rows


def define_flags() -> None:
  # Only when this file runs as the program: absl flags are process-global and the benchmarks import
  # one another (benchmarks/harness.py, "Flags").
  flags.DEFINE_string('shape', '224x4', 'Image side x batch.')
  flags.DEFINE_string('sets', DEFAULT_SETS, 'name=XLA_FLAGS entries separated by ";".')
  flags.DEFINE_integer('rounds', 2, 'Rounds: one child process per set in each.')
  flags.DEFINE_integer('steps', 6, 'Timed steps per child.')
  flags.DEFINE_float('timeout_s', 600, 'A child taking longer is killed.')
  flags.DEFINE_bool('child', False, 'Internal: time the step under this process\'s XLA_FLAGS and print one '
                    'result line (the parent starts the children with it).')
  flags.DEFINE_string('output', None, 'JSON path; default benchmarks/results/xla_flags.json.')


def main(argv):
  harness.start(argv)
  args = harness.script_flags()
  image_size, batch = (int(v) for v in args.shape.split('x'))
  if args.child:
    child(image_size, batch, args.steps)
    return
  sets = parse_sets(args.sets)
  before = harness.idle_check()
  print(f'before the run: {harness.describe_load(before)}')
  monitor = harness.LoadMonitor()
  results = {name: [] for name in sets}
  names = list(sets)
  for r in range(args.rounds):
    for name in structural_wins.rotated(names, r):
      results[name].append(run_child(sets[name], args))
      shown = results[name][-1]
      print(f'  round {r + 1} {name}: ' + (shown['error'] if 'error' in shown else
                                           f"{1e3 * shown['step_s']:.0f} ms/step"), flush=True)
  load = monitor.report()
  rows = summarise(sets, results, batch)
  print()
  harness.print_table(rows, ['set', 'step_ms', 'images_per_s', 'vs_default', 'cores', 'compile_s', 'error'])
  print(f'\n{harness.machine_info()}\n{harness.describe_load(load)}')
  harness.write_json(args.output or harness.default_output(__file__), {
      'benchmark': 'xla_flags', 'argv': sys.argv, 'machine': harness.machine_info(), 'load_before': before,
      'load_during': load, 'shape': args.shape, 'sets': sets, 'rows': rows})


if __name__ == '__main__':
  define_flags()
  app.run(main)
