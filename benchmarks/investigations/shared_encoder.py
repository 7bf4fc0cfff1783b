r"""Pairs/s of the training step with one encoder pass per image for its K captions (seq_per_img=K) vs one
per (image, caption) pair (seq_per_img=1), at the same number of pairs per step, interleaved in one run.

  python -m benchmarks.investigations.shared_encoder    # 224 px, 20 pairs per step, ~4 min here
  python -m benchmarks.investigations.shared_encoder --image_size=64 --pairs=160

Both variants are capjax's own train step (`capjax.state.compile_train_step` on the full ResNet50 + LSTM
captioner, vocabulary 5,507, captions padded to 24 tokens, synthetic data) as the training loop builds
it for each setting:
  shared    `--pairs / K` images with K captions each: tokens (B, K, L); the encoder (and its BatchNorm
            statistics) runs on the B images, the decoder on all B*K captions
  per_pair  `--pairs` images with one caption each: tokens (B*K, L), the encoder runs on every pair
Timing as in cpu_gap.py: compile apart, rounds of steps with the order rotated, medians.
"""

import os
import sys

if __package__ in (None, ''):  # run as `python benchmarks/investigations/shared_encoder.py`
  sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app
from absl import flags
import numpy as np

from benchmarks import harness
from benchmarks import structural_wins
from benchmarks.investigations import cpu_gap
from capjax import mesh as mesh_lib
from capjax.models import captioner


def host_batch(images: int, captions_per_image: int, image_size: int) -> dict:
  """`images` uint8 images and `captions_per_image` caption-like token rows for each ((B, L) for one)."""
  rng = np.random.default_rng(0)
  tokens = harness.random_tokens(rng, images * captions_per_image, cpu_gap.MAX_LEN, cpu_gap.VOCAB)
  if captions_per_image > 1:
    tokens = tokens.reshape(images, captions_per_image, cpu_gap.MAX_LEN)
  return {'image': rng.integers(0, 256, (images, image_size, image_size, 3), np.uint8), 'tokens': tokens}


def define_flags() -> None:
  # Only when this file runs as the program: absl flags are process-global and the benchmarks import
  # one another (benchmarks/harness.py, "Flags").
  flags.DEFINE_integer('image_size', 224, 'Square image side.')
  flags.DEFINE_integer('pairs', 20, '(image, caption) pairs per step.')
  flags.DEFINE_integer('seq_per_img', 5, 'K of the shared variant.')
  flags.DEFINE_integer('rounds', 3, 'Interleaved timing rounds.')
  flags.DEFINE_integer('steps', 1, 'Steps per variant per round.')
  flags.DEFINE_string('output', None, 'JSON path; default benchmarks/results/shared_encoder.json.')


def main(argv):
  harness.start(argv)
  args = harness.script_flags()
  if args.pairs % args.seq_per_img:
    raise SystemExit(f'--pairs={args.pairs} is not a multiple of --seq_per_img={args.seq_per_img}')
  mesh = mesh_lib.make_mesh()
  before = harness.idle_check()
  print(f'before the run: {harness.describe_load(before)}')
  monitor = harness.LoadMonitor()
  model = captioner.Captioner(vocab_size=cpu_gap.VOCAB)
  images = {'shared': args.pairs // args.seq_per_img, 'per_pair': args.pairs}
  batches = {'shared': host_batch(images['shared'], args.seq_per_img, args.image_size),
             'per_pair': host_batch(args.pairs, 1, args.image_size)}
  advancers, compile_s = {}, {}
  for name, batch in batches.items():
    advancers[name], compile_s[name] = cpu_gap.capjax_variant(model, batch, args.image_size, mesh)
  timings = structural_wins.time_interleaved(advancers, args.rounds, args.steps)
  load = monitor.report()
  rows = []
  for name, timing in timings.items():
    rows.append({'variant': name, 'images': images[name], 'pairs': args.pairs,
                 'tokens_shape': batches[name]['tokens'].shape, 'compile_s': compile_s[name],
                 'step_ms': 1e3 * timing['step_s'], 'pairs_per_s': args.pairs / timing['step_s'],
                 'pairs_per_s_range': (args.pairs / timing['step_s_max'], args.pairs / timing['step_s_min']),
                 **timing})
  per_pair = next(r['pairs_per_s'] for r in rows if r['variant'] == 'per_pair')
  for row in rows:
    row['vs_per_pair'] = row['pairs_per_s'] / per_pair
  harness.print_table(rows, ['variant', 'images', 'pairs', 'compile_s', 'step_ms', 'pairs_per_s',
                             'vs_per_pair'])
  print(f'\n{harness.machine_info()}\n{harness.describe_load(load)}')
  harness.write_json(args.output or harness.default_output(__file__), {
      'benchmark': 'shared_encoder', 'argv': sys.argv, 'machine': harness.machine_info(),
      'load_before': before, 'load_during': load, 'settings': vars(args), 'rows': rows})


if __name__ == '__main__':
  define_flags()
  app.run(main)
