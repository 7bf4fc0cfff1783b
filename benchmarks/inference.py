r"""Captioning throughput: capjax (jitted) vs the PyTorch eager reference, greedy and beam search.

Both run the very same random network (the torch reference's weights converted into capjax, see
benchmarks/torch_reference.py) on the same device, image size, max length and vocabulary size, on
uint8 images already on the device. With --full_length (default) the <END> logit is pushed down so
that every caption runs all --max_len steps in both, whatever the random weights would emit; the
token agreement between the two is reported as a check. capjax's compile time is reported apart;
each timed figure excludes a warm-up call. --decoder_only times decoding from image vectors
(the LSTM part alone, no ResNet).

  python -m benchmarks.inference                      # CPU defaults: batches 1, 8, 32 at 224 px
  python -m benchmarks.inference --batch_sizes=1,32,256 --reps=20 --dtype=bfloat16
  python -m benchmarks.inference --decoder_only --batch_sizes=32,256
"""

import functools
import os
import sys
import time

if __package__ in (None, ''):  # run as `python benchmarks/inference.py`
  sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# torch shares the GPU with jax in this process: keep jax from preallocating 75% of its memory.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks import harness
from benchmarks import torch_reference
from capjax import inference
from capjax import mesh as mesh_lib
from capjax import vocab as vocab_lib
from capjax.models import captioner

FLAGS = flags.FLAGS


def define_flags() -> None:
  # Only when this file runs as the program: absl flags are process-global and the benchmarks import
  # one another (benchmarks/harness.py, "Flags").
  flags.DEFINE_list('batch_sizes', None, 'Default: 1,8,32 on CPU, 1,32,256 otherwise.')
  flags.DEFINE_integer('beam_size', 5, 'Beam size of the beam-search rows.')
  flags.DEFINE_list('modes', ['greedy', 'beam'], 'greedy and/or beam.')
  flags.DEFINE_list('impls', ['capjax', 'torch'], 'Implementations to time.')
  flags.DEFINE_integer('image_size', 224, 'Square image side in pixels.')
  flags.DEFINE_integer('max_len', 20, 'Generated tokens per caption.')
  flags.DEFINE_integer('vocab_size', 5507, 'Vocabulary size (5,507: the seed on Flickr8k).')
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype (capjax model '
                    'dtype; torch autocast).')
  flags.DEFINE_integer('reps', 0, 'Least timed calls per row; 0: 2 on CPU, 20 otherwise.')
  flags.DEFINE_float('min_seconds', 1.0, 'Timed calls go on until this much time passed.')
  flags.DEFINE_bool('full_length', True, 'Suppress <END> so every caption decodes '
                    '--max_len steps in both implementations.')
  flags.DEFINE_bool('decoder_only', False, 'Decode from random image vectors: no ResNet.')
  flags.DEFINE_integer('torch_threads', 0, 'torch intra-op threads; 0: its default.')
  flags.DEFINE_string('output', None, 'JSON path; default benchmarks/results/inference.json.')


def capjax_fn(model, mesh, beam_size: int):
  if not FLAGS.decoder_only:
    return inference.make_caption_fn(model, mesh, max_len=FLAGS.max_len, beam_size=beam_size)
  fn = functools.partial(inference.generate_from_encoded, model, max_len=FLAGS.max_len,
                         beam_size=beam_size)
  return jax.jit(fn, in_shardings=(mesh_lib.replicated(mesh), mesh_lib.batch_sharded(mesh)),
                 out_shardings=mesh_lib.replicated(mesh))


def torch_fn(reference, beam_size: int, device: str):
  autocast = torch.autocast(device_type=device.split(':')[0], dtype=torch.bfloat16,
                            enabled=FLAGS.dtype == 'bfloat16')

  def run(inputs):
    with autocast:
      if FLAGS.decoder_only:
        if beam_size == 1:
          return torch_reference.greedy_decode(reference, inputs, FLAGS.max_len)
        return torch_reference.beam_search(reference, inputs, beam_size, FLAGS.max_len)
      return torch_reference.caption(reference, inputs, FLAGS.max_len, beam_size)
  return run


def timed_calls(run, sync, reps: int):
  """(seconds per call, last output) after one untimed warm-up call: at least `reps` calls and at
  least --min_seconds (the output is synced after each call, so calls never overlap)."""
  out = run()
  sync(out)
  calls, start = 0, time.perf_counter()
  while calls < reps or time.perf_counter() - start < FLAGS.min_seconds:
    out = run()
    sync(out)
    calls += 1
  return (time.perf_counter() - start) / calls, out


def make_inputs(batch: int, rng: np.random.Generator) -> np.ndarray:
  if FLAGS.decoder_only:
    return rng.standard_normal((batch, 256)).astype(np.float32)
  return rng.integers(0, 256, (batch, FLAGS.image_size, FLAGS.image_size, 3), np.uint8)


def main(argv):
  harness.start(argv)
  on_cpu = harness.on_cpu()
  batch_sizes = [int(b) for b in FLAGS.batch_sizes or (['1', '8', '32'] if on_cpu
                                                        else ['1', '32', '256'])]
  reps = FLAGS.reps or (2 if on_cpu else 20)
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  torch.backends.cudnn.benchmark = True
  torch_threads = harness.set_torch_threads(FLAGS.torch_threads)
  mesh = mesh_lib.make_mesh()

  reference = torch_reference.random_reference(FLAGS.vocab_size)
  if FLAGS.full_length:
    with torch.no_grad():
      reference.readout.bias[vocab_lib.END_ID] = -1e4
  variables = mesh_lib.tree_replicate(torch_reference.capjax_variables(reference), mesh)
  reference = reference.to(device)
  model = captioner.Captioner(vocab_size=FLAGS.vocab_size,
                              dtype={'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[FLAGS.dtype])

  before = harness.idle_check()
  print(f'before the run: {harness.describe_load(before)}')
  monitor = harness.LoadMonitor()
  rng = np.random.default_rng(0)
  rows = []
  for batch in batch_sizes:
    inputs = make_inputs(batch, rng)
    for mode in FLAGS.modes:
      beam = 1 if mode == 'greedy' else FLAGS.beam_size
      label = 'greedy' if beam == 1 else f'beam-{beam}'
      outputs, row_load = {}, harness.LoadMonitor()
      if 'capjax' in FLAGS.impls:
        x = mesh_lib.host_batch_to_global({'x': inputs}, mesh)['x']
        start = time.perf_counter()
        compiled = capjax_fn(model, mesh, beam).lower(variables, x).compile()
        compile_s = time.perf_counter() - start
        seconds, out = timed_calls(lambda: compiled(variables, x), jax.block_until_ready, reps)
        outputs['capjax'] = np.asarray(out)
        rows.append({'impl': 'capjax', 'mode': label, 'batch': batch, 'compile_s': compile_s,
                     'ms_per_batch': 1e3 * seconds, 'captions_per_s': batch / seconds})
      if 'torch' in FLAGS.impls:
        x = torch.from_numpy(inputs).to(device)
        sync = (lambda _: torch.cuda.synchronize()) if device == 'cuda' else (lambda _: None)
        seconds, out = timed_calls(functools.partial(torch_fn(reference, beam, device), x), sync, reps)
        outputs['torch'] = out.cpu().numpy()
        rows.append({'impl': 'torch eager', 'mode': label, 'batch': batch,
                     'ms_per_batch': 1e3 * seconds, 'captions_per_s': batch / seconds})
      if len(outputs) == 2:
        rows[-2]['capjax/torch'] = rows[-2]['captions_per_s'] / rows[-1]['captions_per_s']
        rows[-2]['same_tokens_%'] = 100 * float(np.mean(outputs['capjax'] == outputs['torch']))
      for row in rows[-len(outputs):]:
        row['others_cores'] = row_load.report()['others_cores']
        print(f"  {row['impl']} {label} batch {batch}: {row['captions_per_s']:,.1f} captions/s",
              flush=True)
  load = monitor.report()
  add_beam_slowdown(rows)
  print()
  harness.print_table(rows, ['impl', 'mode', 'batch', 'compile_s', 'ms_per_batch', 'captions_per_s',
                             'capjax/torch', 'beam/greedy_time', 'same_tokens_%', 'others_cores'])
  print(f'\n{harness.machine_info()}, torch threads {torch_threads}\n{harness.describe_load(load)}')
  harness.write_json(FLAGS.output or harness.default_output(__file__), {
      'benchmark': 'inference', 'argv': sys.argv, 'machine': harness.machine_info(),
      'torch_device': device, 'torch_threads': torch_threads, 'load_before': before, 'load_during': load,
      'image_size': FLAGS.image_size, 'max_len': FLAGS.max_len, 'vocab_size': FLAGS.vocab_size,
      'dtype': FLAGS.dtype, 'full_length': FLAGS.full_length, 'decoder_only': FLAGS.decoder_only,
      'reps': reps, 'rows': rows})


def add_beam_slowdown(rows: list[dict]) -> None:
  """beam/greedy_time: how many times longer a beam-search batch takes than a greedy one."""
  greedy = {(r['impl'], r['batch']): r['ms_per_batch'] for r in rows if r['mode'] == 'greedy'}
  for row in rows:
    key = (row['impl'], row['batch'])
    if row['mode'] != 'greedy' and key in greedy:
      row['beam/greedy_time'] = row['ms_per_batch'] / greedy[key]


if __name__ == '__main__':
  define_flags()
  app.run(main)
