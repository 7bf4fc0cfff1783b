r"""The CPU gap: training-step images/s of capjax before and after the small-map convolution workaround,
beside the PyTorch eager reference, interleaved in one run.

  python -m benchmarks.investigations.cpu_gap           # 64 px batch 32 and 224 px batch 4, ~5 min here
  python -m benchmarks.investigations.cpu_gap --shapes=48x32,96x32 --rounds=5

Variants, per `--shapes` entry (image side x batch), all on the same synthetic batch (uint8 images,
caption-like tokens padded to 24, vocabulary 5,507) and the same model (ResNet50 + 256-unit LSTM):
  capjax lax convs   `capjax.state.compile_train_step` with every convolution `lax.conv_general_dilated`,
                     as before the workaround (`small_map_conv.Conv` as it behaves on accelerators)
  capjax             the same step as capjax runs it on CPU: the small-map rule of `small_map_conv`
  torch N thread(s)  `torch_reference.TorchCaptioner`, eager float32: masked cross-entropy, backward,
                     clipping, AdamW (the step of `train_throughput.py --torch_modes=train`), with
                     N = --torch_threads (default: 2 (torch's default here) and 1, which a shared
                     machine can favour; see benchmarks/RESULTS.md, surprise 1)
Compile time is apart; each variant gets one untimed step, then `--rounds` rounds of `--steps` steps
per variant, the order rotated every round (`structural_wins.time_interleaved`); medians are reported,
the range is in the JSON.
"""

import contextlib
import os
import sys
import time
from unittest import mock

if __package__ in (None, ''):  # run as `python benchmarks/investigations/cpu_gap.py`
  sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app
from absl import flags
import jax

from benchmarks import harness
from benchmarks import structural_wins
from capjax import mesh as mesh_lib
from capjax import state as state_lib
from capjax import vocab as vocab_lib
from capjax.models import captioner
from capjax.models import small_map_conv

VOCAB = 5507  # the seed's vocabulary on Flickr8k
MAX_LEN = 24


def lax_convolutions():
  """While active, `small_map_conv.Conv(impl='auto')` traces as on an accelerator: plain lax.conv, i.e.
  capjax before the workaround. (The captioner has no knob for it: it is not a modelling choice.)"""
  return mock.patch.object(small_map_conv, '_on_cpu', lambda: False)


def step_advancer(compiled, state, batch):
  """`advance(steps)`: runs the compiled train step `steps` times from the state it left; returns
  seconds per step."""
  def advance(steps: int) -> float:
    nonlocal state
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    return (time.perf_counter() - start) / steps
  return advance


def capjax_variant(model, host_batch: dict, image_size: int, mesh, *, lax_convs: bool = False):
  """(advancer, compile seconds) of capjax's train step for `model` on `host_batch`."""
  tx = harness.default_optimizer('train')
  state = state_lib.create_train_state(model, tx, 0, image_size, MAX_LEN, mesh)
  step = state_lib.compile_train_step(state_lib.teacher_forced_logits(model), tx, mesh)
  batch = mesh_lib.host_batch_to_global(host_batch, mesh)
  start = time.perf_counter()
  with lax_convolutions() if lax_convs else contextlib.nullcontext():
    compiled = step.lower(state, batch).compile()
  return step_advancer(compiled, state, batch), time.perf_counter() - start


def torch_variant(host_batch: dict, image_size: int, threads: int):
  """Advancer of the torch reference's training step (see `train_throughput.measure_torch`), run with
  `threads` intra-op threads."""
  import torch  # pylint: disable=g-import-not-at-top  (optional yardstick)
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
  inputs = {k: torch.from_numpy(v) for k, v in host_batch.items()}
  inputs['tokens'] = inputs['tokens'].long()
  model = torch_reference.random_reference(VOCAB, image_size).train()
  params = list(model.parameters())
  optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)

  def advance(steps: int) -> float:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    for _ in range(steps):
      # train_throughput.torch_loss_fn's 'train' loss.
      tokens = inputs['tokens']
      logits = model(inputs['image'], tokens[:, :-1])
      loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(),
                                               ignore_index=vocab_lib.PAD_ID)
      optimizer.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(params, 5.0)
      optimizer.step()
    return (time.perf_counter() - start) / steps
  return advance


def measure_shape(image_size: int, batch: int, args, mesh) -> list[dict]:
  host_batch = harness.synthetic_batch('train', batch, image_size, MAX_LEN, VOCAB)
  model = captioner.Captioner(vocab_size=VOCAB)
  advancers, compile_s = {}, {}
  advancers['capjax lax convs'], compile_s['capjax lax convs'] = capjax_variant(
      model, host_batch, image_size, mesh, lax_convs=True)
  advancers['capjax'], compile_s['capjax'] = capjax_variant(model, host_batch, image_size, mesh)
  for threads in args.torch_threads:
    advancers[f'torch {threads} thread(s)'] = torch_variant(host_batch, image_size, threads)
  timings = structural_wins.time_interleaved(advancers, args.rounds, args.steps)
  rows = []
  for name, timing in timings.items():
    rows.append({'shape': f'{image_size} px x {batch}', 'image_size': image_size, 'batch': batch,
                 'variant': name, 'step_ms': 1e3 * timing['step_s'], 'images_per_s': batch / timing['step_s'],
                 'images_per_s_range': (batch / timing['step_s_max'], batch / timing['step_s_min']),
                 'compile_s': compile_s.get(name), **timing})
  best_torch = max(r['images_per_s'] for r in rows if r['variant'].startswith('torch'))
  before = next(r['images_per_s'] for r in rows if r['variant'] == 'capjax lax convs')
  for row in rows:
    row['vs_best_torch'] = row['images_per_s'] / best_torch
    row['vs_lax_convs'] = row['images_per_s'] / before
    print(f"  {row['shape']} {row['variant']}: {row['images_per_s']:.1f} images/s "
          f"({row['vs_best_torch']:.2f}x the faster torch)", flush=True)
  return rows


def define_flags() -> None:
  # Only when this file runs as the program: absl flags are process-global and the benchmarks import
  # one another (benchmarks/harness.py, "Flags").
  flags.DEFINE_string('shapes', '64x32,224x4', 'Image side x batch, comma-separated.')
  flags.DEFINE_integer('rounds', 3, 'Interleaved timing rounds.')
  flags.DEFINE_integer('steps', 2, 'Steps per variant per round.')
  flags.DEFINE_list('torch_threads', ['2', '1'], 'Torch variants: intra-op threads of each.')
  flags.DEFINE_string('output', None, 'JSON path; default benchmarks/results/cpu_gap.json.')


def main(argv):
  harness.start(argv)
  args = harness.script_flags()
  args.torch_threads = [int(t) for t in args.torch_threads if t]
  mesh = mesh_lib.make_mesh()
  before = harness.idle_check()
  print(f'before the run: {harness.describe_load(before)}')
  monitor = harness.LoadMonitor()
  rows = []
  for shape in args.shapes.split(','):
    image_size, batch = (int(v) for v in shape.split('x'))
    rows += measure_shape(image_size, batch, args, mesh)
  load = monitor.report()
  print()
  harness.print_table(rows, ['shape', 'variant', 'compile_s', 'step_ms', 'images_per_s', 'vs_best_torch',
                             'vs_lax_convs'])
  print(f'\n{harness.machine_info()}\n{harness.describe_load(load)}')
  harness.write_json(args.output or harness.default_output(__file__), {
      'benchmark': 'cpu_gap', 'argv': sys.argv, 'machine': harness.machine_info(), 'load_before': before,
      'load_during': load, 'vocab_size': VOCAB, 'max_caption_len': MAX_LEN, 'rows': rows})


if __name__ == '__main__':
  define_flags()
  app.run(main)
