r"""Training throughput of the seed captioner: examples/s per encoder mode and dtype, and MFU.

Modes (all on every local device, batch sharded over 'data' like capjax's train loop):
  train   ResNet50 + LSTM, everything learns (capjax.state.compile_train_step)    -> images/s
  frozen  trunk in inference mode, no trunk gradient (encoder_mode='frozen')      -> images/s
  cached  decoder only, on precomputed pooled 2048-d trunk features: capjax's own cached-mode
          step (`teacher_forced_logits(from_features=True)`), trunk fixed         -> captions/s
plus, as a yardstick, the PyTorch eager reference's train and cached steps (--torch_modes, float32).

Compile time is measured apart (lower + compile); warm-up steps run the compiled step and are not
timed; the timed steps end with `block_until_ready`. FLOPs per step come from XLA's
`cost_analysis()` of the compiled step plus the LSTM recurrence steps that XLA does not see (it
counts a while-loop body once); `--flops=analytic` uses the closed-form estimate instead. MFU is
shown where the chip's peak is known (benchmarks/harness.py), else n/a.

`--with_pipeline` feeds the image modes from capjax's real grain pipeline (500x375 JPEGs, full
augmentation) and reports the fraction of the loop's wall time spent waiting in `next(iterator)`.

  python -m benchmarks.train_throughput                       # small CPU defaults, ~3 min
  python -m benchmarks.train_throughput --batch_size=256 --decoder_batch_size=8192 --steps=50
  python -m benchmarks.train_throughput --modes=train --dtypes=bfloat16 --with_pipeline \
      --pipeline_workers=8 --torch_modes=
"""

import os
import sys
import time

if __package__ in (None, ''):  # run as `python benchmarks/train_throughput.py`
  sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# torch shares the GPU with jax in this process: keep jax from preallocating 75% of its memory.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from benchmarks import harness
from capjax import input_pipeline
from capjax import mesh as mesh_lib
from capjax import state as state_lib
from capjax import vocab as vocab_lib
from capjax.models import captioner

FLAGS = flags.FLAGS


def define_flags() -> None:
  # Only when this file runs as the program: absl flags are process-global and the benchmarks import
  # one another (benchmarks/harness.py, "Flags").
  flags.DEFINE_list('modes', ['train', 'frozen', 'cached'], 'Encoder modes to measure.')
  flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Compute dtypes (params stay float32).')
  flags.DEFINE_integer('image_size', 224, 'Square image side in pixels.')
  flags.DEFINE_integer('batch_size', 0, 'Global batch for the image modes; 0: 4 per device '
                       'on CPU, 256 per device on accelerators.')
  flags.DEFINE_integer('decoder_batch_size', 0, 'Global batch for the cached mode; '
                       '0: 256 per device on CPU, 4096 per device on accelerators.')
  flags.DEFINE_integer('steps', 0, 'Timed steps; 0: 2 on CPU, 50 on accelerators.')
  flags.DEFINE_integer('warmup', 1, 'Untimed steps after compiling.')
  flags.DEFINE_list('lstm_unroll', ['1'], 'LSTM scan unroll factors (e.g. 1,4,8): each '
                    'one is a separate row.')
  flags.DEFINE_integer('vocab_size', 5507, 'Vocabulary size (5,507: the seed on Flickr8k).')
  flags.DEFINE_integer('max_caption_len', 24, 'Tokens per caption incl. <START>/<END>.')
  flags.DEFINE_enum('flops', 'xla', ['xla', 'analytic'], 'How FLOPs per step are counted.')
  flags.DEFINE_bool('with_pipeline', False, 'Image modes: feed steps from the grain '
                    'pipeline and report the time spent waiting for data.')
  flags.DEFINE_integer('pipeline_workers', 0, 'grain worker processes.')
  flags.DEFINE_integer('pipeline_images', 64, 'Distinct JPEGs in the pipeline source.')
  flags.DEFINE_list('torch_modes', ['train', 'cached'], 'Modes (train, cached) also '
                    'timed with the PyTorch eager reference (float32) as a yardstick.')
  flags.DEFINE_integer('torch_threads', 0, 'torch intra-op threads; 0: its default.')
  flags.DEFINE_string('output', None, 'JSON path; default benchmarks/results/train_throughput.json.')


RESNET50_FWD_FLOPS_224 = 8.2e9  # 4.1 G multiply-adds (the often quoted "4.1 GFLOPs") = 8.2 GFLOPs
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


# ----------------------------------------------------------------------------------------------
# FLOP counting


def _lstm_step_flops(hidden: int) -> float:
  return 2 * hidden * 4 * hidden  # the recurrent (H x 4H) matmul; gates are negligible


def analytic_flops_per_example(mode: str, image_size: int, vocab: int, max_len: int,
                               hidden: int = 256, embed: int = 256) -> float:
  """Closed-form training FLOPs per (image, caption) example: backward = 2x forward."""
  positions = max_len  # image vector + max_len - 1 input tokens
  decoder_fwd = (positions * 2 * embed * 4 * hidden  # input projection, outside the recurrence
                 + positions * _lstm_step_flops(hidden)
                 + (positions - 1) * 2 * hidden * vocab  # readout
                 + 2 * 2048 * embed)  # projection of the pooled features
  trunk_fwd = RESNET50_FWD_FLOPS_224 * (image_size / 224) ** 2
  trunk = {'train': 3 * trunk_fwd, 'frozen': trunk_fwd, 'cached': 0.0}[mode]
  return trunk + 3 * decoder_fwd


def xla_flops(compiled, num_devices: int) -> float | None:
  """FLOPs of one step as XLA counts them (per device program x devices), or None."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or 'flops' not in analysis:
    return None
  return float(analysis['flops']) * num_devices


def uncounted_scan_flops(batch: int, max_len: int, unroll: int, hidden: int = 256) -> float:
  """The recurrence steps XLA's cost analysis misses: it counts the scan's while-loop body (unroll
  steps) once, forward and backward (the backward pass costs about twice the forward)."""
  return 3 * batch * max(max_len - unroll, 0) * _lstm_step_flops(hidden)


# ----------------------------------------------------------------------------------------------
# Steps and inputs


def build_step(mode: str, dtype: str, unroll: int, mesh):
  """(jitted step, initial state) for one configuration."""
  model = captioner.Captioner(vocab_size=FLAGS.vocab_size, lstm_unroll=unroll,
                              trunk_mode='frozen' if mode == 'frozen' else 'train',
                              dtype=DTYPES[dtype])
  tx = harness.default_optimizer(mode)
  logits_fn = state_lib.teacher_forced_logits(model, from_features=mode == 'cached')
  state = state_lib.create_train_state(model, tx, 0, FLAGS.image_size, FLAGS.max_caption_len, mesh)
  return state_lib.compile_train_step(logits_fn, tx, mesh), state


# ----------------------------------------------------------------------------------------------
# Measuring


def pipeline_batches(iterator, mesh):
  """Device batches from the grain iterator, with the seconds spent in `next(iterator)`."""
  try:
    while True:
      start = time.perf_counter()
      host = next(iterator)
      wait = time.perf_counter() - start
      yield mesh_lib.host_batch_to_global(host, mesh), wait
  finally:
    iterator.close()  # stops grain's worker processes and frees their shared memory


def make_pipeline(batch: int):
  records = harness.flickr_like_records(FLAGS.pipeline_images)
  vocab = harness.vocabulary_of(records)
  pipeline = input_pipeline.PipelineConfig(
      image_size=FLAGS.image_size, max_caption_len=FLAGS.max_caption_len, captions_per_image=5,
      num_workers=FLAGS.pipeline_workers)
  return input_pipeline.make_train_iterator(records, vocab, pipeline,
                                            host_batch_size=batch // jax.process_count())


def measure(mode: str, dtype: str, unroll: int, mesh) -> dict:
  image_mode = mode != 'cached'
  batch = (harness.default_batch(FLAGS.batch_size, 4, 256) if image_mode
           else harness.default_batch(FLAGS.decoder_batch_size, 256, 4096))
  steps = FLAGS.steps or (2 if harness.on_cpu() else 50)
  step_fn, state = build_step(mode, dtype, unroll, mesh)
  host_batch = harness.synthetic_batch(mode, batch, FLAGS.image_size, FLAGS.max_caption_len, FLAGS.vocab_size)
  device_batch = mesh_lib.host_batch_to_global(host_batch, mesh)

  start = time.perf_counter()
  compiled = step_fn.lower(state, device_batch).compile()
  compile_s = time.perf_counter() - start

  with_pipeline = FLAGS.with_pipeline and image_mode
  batches = (pipeline_batches(make_pipeline(batch), mesh) if with_pipeline
             else harness.repeat_batch(device_batch))
  _, seconds, waited = harness.time_steps(compiled, state, batches, FLAGS.warmup, steps)
  batches.close()

  analytic = analytic_flops_per_example(mode, FLAGS.image_size, FLAGS.vocab_size,
                                        FLAGS.max_caption_len) * batch
  counted = xla_flops(compiled, mesh.devices.size) if FLAGS.flops == 'xla' else None
  if counted is not None:
    counted += uncounted_scan_flops(batch, FLAGS.max_caption_len, unroll)
  flops, source = (counted, 'xla') if counted is not None else (analytic, 'analytic')
  peak = harness.peak_flops(jax.devices()[0].device_kind, dtype)
  step_s = seconds / steps
  return {
      'mode': mode, 'dtype': dtype, 'unroll': unroll, 'batch': batch, 'steps': steps,
      'compile_s': compile_s, 'step_ms': 1e3 * step_s, 'per_s': batch / step_s,
      'unit': 'images/s' if image_mode else 'captions/s',
      'gflop_per_example': flops / batch / 1e9, 'flops_source': source,
      'analytic_gflop_per_example': analytic / batch / 1e9,
      'mfu': flops / step_s / (peak * mesh.devices.size) if peak else None,
      'data_wait_fraction': waited / seconds if with_pipeline else None,
  }


def torch_loss_fn(model, mode: str, batch: dict):
  """The torch reference's teacher-forced loss: from images ('train') or pooled features ('cached')."""
  import torch  # pylint: disable=g-import-not-at-top  (optional dependency)
  tokens = batch['tokens']
  if mode == 'train':
    logits = model(batch['image'], tokens[:, :-1])
  else:
    image_vec = model.projection_bn(model.projection(batch['features']))
    hidden, _ = model.lstm(torch.cat([image_vec[:, None], model.embed(tokens[:, :-1])], dim=1))
    logits = model.readout(hidden[:, 1:])
  return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(),
                                           ignore_index=vocab_lib.PAD_ID)


def measure_torch(mode: str, mesh) -> dict:
  """The torch reference's step (float32, eager, one device): loss, backward, clipping, AdamW over
  what the mode trains (everything for 'train'; all but the trunk for 'cached')."""
  import torch  # pylint: disable=g-import-not-at-top  (optional dependency)
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
  if mode not in ('train', 'cached'):
    raise ValueError(f'--torch_modes: expected train and/or cached, got {mode!r}')
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
  image_mode = mode == 'train'
  batch = (harness.default_batch(FLAGS.batch_size, 4, 256) if image_mode
           else harness.default_batch(FLAGS.decoder_batch_size, 256, 4096)) // mesh.devices.size  # per device
  host = harness.synthetic_batch(mode, batch, FLAGS.image_size, FLAGS.max_caption_len, FLAGS.vocab_size)
  inputs = {k: torch.from_numpy(v).to(device) for k, v in host.items()}
  inputs['tokens'] = inputs['tokens'].long()
  model = torch_reference.random_reference(FLAGS.vocab_size).to(device).train()
  params = [p for name, p in model.named_parameters() if image_mode or not name.startswith('trunk')]
  optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)

  def step():
    loss = torch_loss_fn(model, mode, inputs)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 5.0)
    optimizer.step()

  for _ in range(FLAGS.warmup):
    step()
  sync()
  steps = FLAGS.steps or (2 if harness.on_cpu() else 50)
  start = time.perf_counter()
  for _ in range(steps):
    step()
  sync()
  step_s = (time.perf_counter() - start) / steps
  flops = analytic_flops_per_example(mode, FLAGS.image_size, FLAGS.vocab_size, FLAGS.max_caption_len)
  peak = harness.peak_flops(torch.cuda.get_device_name() if device == 'cuda' else 'cpu', 'float32')
  return {'mode': f'{mode} (torch eager)', 'dtype': 'float32', 'batch': batch, 'steps': steps,
          'step_ms': 1e3 * step_s, 'per_s': batch / step_s,
          'unit': 'images/s' if image_mode else 'captions/s',
          'gflop_per_example': flops / 1e9, 'flops_source': 'analytic',
          'mfu': flops * batch / step_s / peak if peak else None, 'data_wait_fraction': None,
          'torch_threads': harness.set_torch_threads(FLAGS.torch_threads)}


def main(argv):
  harness.start(argv)
  before = harness.idle_check()
  print(f'before the run: {harness.describe_load(before)}')
  mesh = mesh_lib.make_mesh()
  monitor = harness.LoadMonitor()
  rows = []
  for mode in FLAGS.modes:
    for dtype in FLAGS.dtypes:
      for unroll in (int(u) for u in FLAGS.lstm_unroll):
        row = measure(mode, dtype, unroll, mesh)
        print(f"  {mode} {dtype} unroll={unroll}: {row['per_s']:,.1f} {row['unit']} "
              f"(compile {row['compile_s']:.1f} s)", flush=True)
        rows.append(row)
  if FLAGS.torch_modes:
    harness.set_torch_threads(FLAGS.torch_threads)
  for mode in FLAGS.torch_modes:
    rows.append(measure_torch(mode, mesh))
    print(f"  torch eager {mode} float32: {rows[-1]['per_s']:,.1f} {rows[-1]['unit']} "
          f"({rows[-1]['torch_threads']} threads)", flush=True)
  load = monitor.report()
  print()
  for row in rows:
    row['mfu_%'] = 'n/a' if row['mfu'] is None else round(100 * row['mfu'], 1)
    row['wait_%'] = None if row['data_wait_fraction'] is None else round(100 * row['data_wait_fraction'], 1)
  columns = ['mode', 'dtype', 'unroll', 'batch', 'compile_s', 'step_ms', 'per_s', 'unit',
             'gflop_per_example', 'flops_source', 'mfu_%', 'torch_threads']
  if FLAGS.with_pipeline:
    columns.append('wait_%')
  harness.print_table(rows, columns)
  print(f'\n{harness.machine_info()}\n{harness.describe_load(load)}')
  harness.write_json(FLAGS.output or harness.default_output(__file__), {
      'benchmark': 'train_throughput', 'argv': sys.argv, 'machine': harness.machine_info(),
      'load_before': before, 'load_during': load, 'image_size': FLAGS.image_size,
      'vocab_size': FLAGS.vocab_size, 'max_caption_len': FLAGS.max_caption_len,
      'pipeline_workers': FLAGS.pipeline_workers if FLAGS.with_pipeline else None, 'rows': rows})


if __name__ == '__main__':
  define_flags()
  app.run(main)
