r"""Where XLA:CPU spends a capjax training step: one step traced with `jax.profiler`, its XLA operations
summed by kind (a fusion's name without its number: 'ynn_fusion' = dots and convolutions run by
XNNPACK's successor, 'copy_bitcast_fusion' = layout copies, 'slice_pad_fusion'/'concatenate' = im2col...).

  python -m benchmarks.investigations.xla_op_profile    # the full train step, 64 px, batch 32
  python -m benchmarks.investigations.xla_op_profile --part=trunk_no_bn \
      --output=benchmarks/results/xla_op_profile_trunk.json

The step is compiled and run twice untimed, then one call is traced (`create_perfetto_trace=True`, read
back from the trace's JSON). Operations run on 2 threads may overlap, so their sum can exceed the wall time.
"""

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

if __package__ in (None, ''):  # run as `python benchmarks/investigations/xla_op_profile.py`
  sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app
from absl import flags
import jax

from benchmarks import harness
from benchmarks.investigations import cpu_gap
from benchmarks.investigations import step_profile
from capjax import mesh as mesh_lib
from capjax.models import captioner

# Trace events that are not XLA operations (the runtime's own spans, Python frames).
_NOT_OPS = re.compile(r'^(\$|Thunk|end: |PjitFunction|CommonPjRt|ParseArguments|SlinkyThreadPool)')


def advancer_for(part: str, image_size: int, batch: int, mesh):
  host_batch = harness.synthetic_batch('train', batch, image_size, cpu_gap.MAX_LEN, cpu_gap.VOCAB)
  if part == 'step':
    model = captioner.Captioner(vocab_size=cpu_gap.VOCAB)
    return cpu_gap.capjax_variant(model, host_batch, image_size, mesh)[0]
  images = captioner.normalize_images(jax.numpy.asarray(host_batch['image']), jax.numpy.float32)
  return step_profile.capjax_trunk(images, batchnorm='flax' if part == 'trunk' else 'none')


def op_times(trace_dir: str) -> tuple[dict, dict]:
  """(milliseconds, count) per operation kind in the perfetto trace under `trace_dir`."""
  path = sorted(glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True))[-1]
  with gzip.open(path) as f:
    events = json.load(f)['traceEvents']
  ms, count = collections.Counter(), collections.Counter()
  for event in events:
    if event.get('ph') == 'X' and not _NOT_OPS.match(event['name']):
      kind = re.sub(r'\.\d+$', '', event['name'])
      ms[kind] += event['dur'] / 1e3
      count[kind] += 1
  return dict(ms.most_common()), dict(count)


def define_flags() -> None:
  # Only when this file runs as the program: absl flags are process-global and the benchmarks import
  # one another (benchmarks/harness.py, "Flags").
  flags.DEFINE_enum('part', 'step', ['step', 'trunk', 'trunk_no_bn'], 'What one traced call runs.')
  flags.DEFINE_integer('image_size', 64, 'Square image side.')
  flags.DEFINE_integer('batch', 32, 'Images per call.')
  flags.DEFINE_string('output', None, 'JSON path; default benchmarks/results/xla_op_profile.json.')


def main(argv):
  harness.start(argv)
  args = harness.script_flags()
  mesh = mesh_lib.make_mesh()
  advance = advancer_for(args.part, args.image_size, args.batch, mesh)
  advance(1)
  advance(1)
  monitor = harness.LoadMonitor()
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    wall_s = advance(1)
    jax.profiler.stop_trace()
    ms, count = op_times(trace_dir)
  load = monitor.report()
  total = sum(ms.values())
  rows = [{'kind': k, 'ms': v, 'ops': count[k], 'share_%': 100 * v / total} for k, v in ms.items()]
  harness.print_table(rows[:25], ['kind', 'ms', 'ops', 'share_%'])
  print(f'\nsum of operations {total:,.0f} ms; the traced call took {1e3 * wall_s:,.0f} ms wall')
  print(harness.describe_load(load))
  harness.write_json(args.output or harness.default_output(__file__), {
      'benchmark': 'xla_op_profile', 'argv': sys.argv, 'machine': harness.machine_info(), 'load_during': load,
      'settings': vars(args), 'wall_ms': 1e3 * wall_s, 'sum_ms': total, 'rows': rows})


if __name__ == '__main__':
  define_flags()
  app.run(main)
