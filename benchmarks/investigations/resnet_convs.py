r"""Every convolution of ResNet50 at one image size and batch: XLA's convolution vs the same as a matrix
product, with torch's conv2d beside them; which one `small_map_conv`'s rule picks, and what it adds up to.

  python -m benchmarks.investigations.resnet_convs --image_size=64 --batch=32
  python -m benchmarks.investigations.resnet_convs --image_size=224 --batch=4 \
      --output=benchmarks/results/resnet_convs_224px.json

The layers are the real trunk's (`capjax.models.resnet.ResNet()`, traced with `jax.eval_shape`, each
`small_map_conv.Conv` call recorded); identical layers are timed once and counted as often as they occur.
For each: forward, and forward+backward (the gradients a training step needs: kernel and input, kernel
only for the stem), jit-compiled, median of `--reps` calls after one untimed call, the implementations
interleaved call by call so that a neighbour's load hits them alike:
  lax     `lax.conv_general_dilated`, as `nn.Conv` calls it (capjax before the workaround)
  matmul  `small_map_conv.conv_as_matmul`: pad, kh*kw strided slices, one dot
  torch   `torch.nn.functional.conv2d` in NCHW (as torchvision runs it), eager, `--torch_threads`
The 'rule' column is what `small_map_conv.Conv` computes on XLA:CPU (impl='auto'); totals are summed over
all 53 convolutions, weighted by their counts: a trunk's convolution time per step, without BatchNorm,
ReLU, pooling or the optimizer.
"""

import collections
import functools
import os
import sys
import time

if __package__ in (None, ''):  # run as `python benchmarks/investigations/resnet_convs.py`
  sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app
from absl import flags
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from capjax.models import resnet
from capjax.models import small_map_conv

IMPLS = ('lax', 'matmul')


def trunk_convolutions(image_size: int, batch: int) -> list[dict]:
  """Distinct convolutions of the ResNet50 trunk at this input, with how often each occurs, in order."""
  seen = collections.OrderedDict()

  def record(next_fun, args, kwargs, context):
    conv = context.module
    if isinstance(conv, small_map_conv.Conv) and context.method_name == '__call__':
      x = args[0]
      strides = (conv.strides,) * 2 if isinstance(conv.strides, int) else tuple(conv.strides)
      padding = conv.padding
      if isinstance(padding, str):
        padding = lax.padtype_to_pads(x.shape[1:3], conv.kernel_size, strides, padding)
      key = (tuple(conv.kernel_size), strides, tuple(map(tuple, padding)), x.shape, conv.features)
      entry = seen.setdefault(key, {'layers': []})
      entry['layers'].append('/'.join(conv.scope.path))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: resnet.ResNet().init(jax.random.key(0), jnp.zeros((batch, image_size,
                                                                                 image_size, 3)),
                                               train=False))
  rows = []
  for (kernel, strides, padding, shape, features), entry in seen.items():
    rows.append({'layer': entry['layers'][0].replace('trunk/', ''), 'count': len(entry['layers']),
                 'kernel': kernel, 'strides': strides, 'padding': padding, 'input': shape,
                 'features': features, 'rule': 'matmul' if small_map_conv.uses_matmul(
                     kernel, small_map_conv.output_shape(shape[1:3], kernel, strides, padding)) else 'lax'})
  return rows


def _lax_conv(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=small_map_conv.DIMENSION_NUMBERS)


def jax_calls(impl: str, row: dict, x, w, g) -> dict:
  fn = {'lax': _lax_conv, 'matmul': small_map_conv.conv_as_matmul}[impl]
  conv = functools.partial(fn, strides=row['strides'], padding=row['padding'])
  forward = jax.jit(conv)
  # The stem's input is the image: a training step differentiates its kernel only.
  argnums = (1,) if row['layer'] == 'stem_conv' else (0, 1)
  grad = jax.jit(jax.grad(lambda x, w, g: jnp.vdot(conv(x, w), g), argnums=argnums))
  return {f'{impl} fwd': functools.partial(forward, x, w),
          f'{impl} fwd+bwd': functools.partial(grad, x, w, g)}


def torch_calls(row: dict, x, w, g, torch) -> dict:
  xt = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous()  # a writable copy
  wt = torch.from_numpy(np.array(w)).permute(3, 2, 0, 1).contiguous()
  gt = torch.from_numpy(np.array(g)).permute(0, 3, 1, 2).contiguous()
  stride, padding = row['strides'], tuple(p[0] for p in row['padding'])

  def forward():
    with torch.no_grad():
      return torch.nn.functional.conv2d(xt, wt, stride=stride, padding=padding)

  def forward_backward():
    xg = xt.detach().requires_grad_(row['layer'] != 'stem_conv')
    wg = wt.detach().requires_grad_()
    torch.nn.functional.conv2d(xg, wg, stride=stride, padding=padding).backward(gt)
    return wg.grad

  return {'torch fwd': forward, 'torch fwd+bwd': forward_backward}


def time_interleaved_calls(calls: dict, reps: int) -> dict:
  """Median milliseconds per call after one untimed call; every round calls each function once."""
  for fn in calls.values():
    jax.block_until_ready(fn())
  times = {label: [] for label in calls}
  for _ in range(reps):
    for label, fn in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[label].append(time.perf_counter() - start)
  return {label: round(1e3 * float(np.median(t)), 2) for label, t in times.items()}


def layer_inputs(row: dict):
  """Random input, kernel and output cotangent for one of `trunk_convolutions`' layers."""
  keys = jax.random.split(jax.random.key(0), 3)
  kh, kw = row['kernel']
  cin = row['input'][-1]
  x = jax.random.normal(keys[0], row['input'])
  w = jax.random.normal(keys[1], (kh, kw, cin, row['features'])) / np.sqrt(kh * kw * cin)
  g = jax.random.normal(keys[2], _lax_conv(x, w, row['strides'], row['padding']).shape)
  return x, w, g


def measure(row: dict, reps: int, torch) -> dict:
  x, w, g = layer_inputs(row)
  kh, kw = row['kernel']
  cin = row['input'][-1]
  out = _lax_conv(x, w, row['strides'], row['padding'])
  calls = {}
  for impl in IMPLS:
    calls.update(jax_calls(impl, row, x, w, g))
  if torch is not None:
    calls.update(torch_calls(row, x, w, g, torch))
  diff = small_map_conv.conv_as_matmul(x, w, row['strides'], row['padding']) - out
  return {**row, 'output': out.shape, 'gflop_fwd': 2 * out.size * kh * kw * cin / 1e9,
          'max_abs_diff': float(jnp.max(jnp.abs(diff))), 'ms': time_interleaved_calls(calls, reps)}


def totals(rows: list[dict], with_torch: bool) -> dict:
  """Milliseconds summed over all convolutions of the trunk (weighted by count), per mode."""
  out = {}
  for mode in ('fwd', 'fwd+bwd'):
    def total(pick):
      return round(sum(r['count'] * r['ms'][f'{pick(r)} {mode}'] for r in rows), 1)
    out[mode] = {'lax': total(lambda r: 'lax'), 'matmul': total(lambda r: 'matmul'),
                 'rule': total(lambda r: r['rule']),
                 'best': total(lambda r: min(IMPLS, key=lambda i: r['ms'][f'{i} {mode}']))}
    if with_torch:
      out[mode]['torch'] = total(lambda r: 'torch')
  return out


def define_flags() -> None:
  # Only when this file runs as the program: absl flags are process-global and the benchmarks import
  # one another (benchmarks/harness.py, "Flags").
  flags.DEFINE_integer('image_size', 64, 'Square image side of the trunk input.')
  flags.DEFINE_integer('batch', 32, 'Images per call.')
  flags.DEFINE_integer('reps', 5, 'Timed calls per implementation (median reported).')
  flags.DEFINE_integer('torch_threads', 0, "torch intra-op threads; 0: torch's default.")
  flags.DEFINE_bool('no_torch', False, 'Leave out the torch conv2d column.')
  flags.DEFINE_string('output', None, 'JSON path; default benchmarks/results/resnet_convs.json.')


def main(argv):
  harness.start(argv)
  args = harness.script_flags()
  torch = None
  if not args.no_torch:
    import torch  # pylint: disable=g-import-not-at-top  (optional yardstick)
    harness.set_torch_threads(args.torch_threads)
  before = harness.idle_check()
  print(f'before the run: {harness.describe_load(before)}')
  monitor = harness.LoadMonitor()
  rows = []
  for row in trunk_convolutions(args.image_size, args.batch):
    rows.append(measure(row, args.reps, torch))
    print(f"{row['layer']:<26} x{row['count']} {row['input']} k{row['kernel'][0]} s{row['strides'][0]}: "
          f"{rows[-1]['ms']}", flush=True)
  load = monitor.report()
  table = []
  for r in rows:
    cells = {'layer': r['layer'], 'n': r['count'], 'k/s': f"{r['kernel'][0]}/{r['strides'][0]}",
             'map': f"{r['input'][1]}->{r['output'][1]}", 'ch': f"{r['input'][-1]}->{r['features']}",
             'rule': r['rule']}
    cells.update({k: v for k, v in r['ms'].items()})
    table.append(cells)
  print()
  harness.print_table(table, list(table[0]))
  summary = totals(rows, torch is not None)
  print(f'\ntrunk convolutions, ms per step (sum over layers): {summary}')
  print(f'{harness.machine_info()}\n{harness.describe_load(load)}')
  harness.write_json(args.output or harness.default_output(__file__), {
      'benchmark': 'resnet_convs', 'argv': sys.argv, 'machine': harness.machine_info(),
      'torch_threads': None if torch is None else torch.get_num_threads(),
      'load_before': before, 'load_during': load, 'image_size': args.image_size, 'batch': args.batch,
      'reps': args.reps, 'totals_ms': summary, 'rows': rows})


if __name__ == '__main__':
  define_flags()
  app.run(main)
