r"""What each structural speed-up buys: every one timed against its absence, in the same run.

  python -m benchmarks.structural_wins                    # all of them, CPU defaults, ~10 min here
  python -m benchmarks.structural_wins --wins=lstm_layout,unroll

--wins (default all):
  lstm_layout  Decoder-only training step (embedding, LSTM, vocabulary projection, loss, AdamW) in
               three layouts that compute the same function (checked on converted parameters):
                 capjax        input projection of all steps = one matmul before the scan, vocabulary
                               projection of all steps = one matmul after it (models/captioner.py)
                 readout_in    input projection outside, vocabulary projection inside the scanned step
                 both_in       both inside the scanned step (a per-step LSTMCell + Dense loop)
  unroll       The capjax decoder step with `nn.scan(unroll=...)` 1, 2, 4, 8.
  donation     The full train step (capjax.state.train_step) jitted with and without donating the old
               state: XLA's memory analysis of each executable (bytes aliased, temporaries) and step time.
  loop         A training loop (frozen trunk, the real grain pipeline over 500x375 JPEGs, full
               augmentation) with device prefetch (one batch ahead, as capjax's loop) on or off, and
               metrics fetched lazily (every --log_every steps, as capjax) or after every step. Reports
               images/s and the share of the loop spent waiting in `next(iterator)`.
  image_cache  The grain pipeline alone, second epoch: decoded uint8 images kept in memory
               (`input_pipeline.DecodedImageCache`, data.cache_images_min_side) vs decoding every JPEG
               again; at the seed's 224 px and the demo's 48 px. Also the cache's memory.
"""

import functools
import os
import sys
import time
from typing import Any

if __package__ in (None, ''):  # run as `python benchmarks/structural_wins.py`
  sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import harness
from capjax import input_pipeline
from capjax import mesh as mesh_lib
from capjax import state as state_lib
from capjax.models import captioner

WINS = ('lstm_layout', 'unroll', 'donation', 'loop', 'image_cache')

FLAGS = flags.FLAGS


def define_flags() -> None:
  # Only when this file runs as the program: absl flags are process-global and the benchmarks import
  # one another (benchmarks/harness.py, "Flags").
  flags.DEFINE_list('wins', list(WINS), f'Which of {WINS} to measure.')
  flags.DEFINE_integer('vocab', 5507, 'Vocabulary size (5,507: the seed on Flickr8k).')
  flags.DEFINE_integer('caption_len', 24, 'Tokens per caption incl. <START>/<END>.')
  flags.DEFINE_integer('decoder_batch', 0, 'Decoder-only batch; 0: 256 per device on '
                       'CPU, 4096 per device on accelerators.')
  flags.DEFINE_integer('image_batch', 0, 'Batch of the image steps; 0: 4 per device on '
                       'CPU for donation, 32 for the loop; 256 per device on accelerators.')
  flags.DEFINE_integer('donation_image_size', 0, 'Image side of the donation step; '
                       '0: 64 on CPU (memory analysis does not depend on it), 224 else.')
  flags.DEFINE_integer('loop_image_size', 0, 'Image side of the loop; 0: 64 on CPU, 224 else.')
  flags.DEFINE_integer('loop_steps', 0, 'Timed loop steps; 0: 20 on CPU, 200 otherwise.')
  flags.DEFINE_integer('loop_rounds', 3, 'Runs of each loop variant (median reported).')
  flags.DEFINE_integer('log_every', 10, 'Lazy metrics: fetched every this many steps.')
  flags.DEFINE_integer('workers', 0, 'grain worker processes in the loop.')
  flags.DEFINE_integer('rounds', 0, 'Interleaved timing rounds of the step benchmarks; 0: 5 '
                       'on CPU, 10 otherwise.')
  flags.DEFINE_integer('steps', 0, 'Steps per variant per round; 0: 2 on CPU, 20 otherwise.')
  flags.DEFINE_integer('cache_images', 128, 'Distinct JPEGs in the image_cache epochs.')
  flags.DEFINE_string('output', None, 'JSON path; default benchmarks/results/structural_wins.json.')


# ----------------------------------------------------------------------------------------------
# LSTM layouts: the same decoder with the two big projections inside or outside the recurrence


class _StepWithProjections(nn.Module):
  """One LSTM step that projects its own input (and, with `readout`, its own vocabulary logits):
  what a per-step `LSTMCell` + `Dense` loop computes. Same gate order and cell as capjax's LSTM."""

  hidden_size: int
  vocab_size: int
  readout: bool

  @nn.compact
  def __call__(self, carry, x):
    c, h = carry
    gates = (nn.Dense(4 * self.hidden_size, name='input')(x)
             + nn.Dense(4 * self.hidden_size, use_bias=False, name='recurrent')(h))
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    c = nn.sigmoid(f) * c + nn.sigmoid(i) * jnp.tanh(g)
    h = nn.sigmoid(o) * jnp.tanh(c)
    return (c, h), (nn.Dense(self.vocab_size, name='readout')(h) if self.readout else h)


class ProjectionsInsideDecoder(nn.Module):
  """CaptionDecoder's function with the input projection (and optionally the readout) per step."""

  vocab_size: int
  readout_inside: bool
  embed_dim: int = 256
  hidden_size: int = 256

  @nn.compact
  def __call__(self, image_vec, input_tokens):
    inputs = jnp.concatenate(
        [image_vec[:, None, :], nn.Embed(self.vocab_size, self.embed_dim, name='embed')(input_tokens)],
        axis=1)
    batch = image_vec.shape[0]
    carry = (jnp.zeros((batch, self.hidden_size)), jnp.zeros((batch, self.hidden_size)))
    scan = nn.scan(_StepWithProjections, variable_broadcast='params', split_rngs={'params': False},
                   in_axes=1, out_axes=1)
    _, outputs = scan(self.hidden_size, self.vocab_size, self.readout_inside, name='cell')(carry, inputs)
    if self.readout_inside:  # the image position's logits were computed too (1 of 24): not scored
      return outputs[:, 1:]
    return nn.Dense(self.vocab_size, name='readout')(outputs[:, 1:])


def params_from_capjax(capjax_params: dict, readout_inside: bool) -> dict:
  """capjax CaptionDecoder params -> ProjectionsInsideDecoder params (same function)."""
  lstm = capjax_params['lstm']
  cell = {'input': lstm['input'], 'recurrent': lstm['cell']['recurrent']}
  params = {'embed': capjax_params['embed'], 'cell': cell}
  if readout_inside:
    cell['readout'] = capjax_params['readout']
  else:
    params['readout'] = capjax_params['readout']
  return params


def decoder_step(params, opt_state, batch, *, model, tx):
  """Teacher-forced loss, gradient and AdamW update of a decoder on 256-d image vectors."""
  def loss_fn(p):
    logits = model.apply({'params': p}, batch['image_vec'], batch['tokens'][:, :-1])
    loss_sum, count = state_lib.token_cross_entropy(logits, batch['tokens'])
    return loss_sum / jnp.maximum(count, 1.0)

  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, {'loss': loss}


def _decoder_batch(batch: int, mesh) -> dict:
  rng = np.random.default_rng(0)
  host = {'image_vec': rng.normal(size=(batch, 256)).astype(np.float32),
          'tokens': harness.random_tokens(rng, batch, FLAGS.caption_len, FLAGS.vocab)}
  return mesh_lib.host_batch_to_global(host, mesh)


def _compiled_decoder_step(model, params, batch, mesh):
  """(advance, compile seconds): `advance(steps)` runs that many `decoder_step`s on its own copy of
  the parameters and optimizer state (both donated) and returns seconds per step."""
  tx = harness.default_optimizer('train')
  replicated = mesh_lib.replicated(mesh)
  step = jax.jit(functools.partial(decoder_step, model=model, tx=tx),
                 in_shardings=(replicated, replicated, mesh_lib.batch_sharded(mesh)),
                 out_shardings=(replicated, replicated, replicated), donate_argnums=(0, 1))
  # A copy: the step donates its parameters, and the caller's are converted for other layouts.
  params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=replicated)(params)
  opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
  start = time.perf_counter()
  compiled = step.lower(params, opt_state, batch).compile()
  compile_s = time.perf_counter() - start
  return _advancer(compiled, (params, opt_state), batch), compile_s


def _advancer(compiled, state: tuple, batch):
  """Closure that runs `compiled(*state, batch) -> (*state, metrics)` `steps` times, keeping the
  state between calls; returns seconds per step."""
  def advance(steps: int) -> float:
    nonlocal state
    start = time.perf_counter()
    for _ in range(steps):
      *new_state, metrics = compiled(*state, batch)
      state = tuple(new_state)
    jax.block_until_ready((state, metrics))
    return (time.perf_counter() - start) / steps
  return advance


def rotated(items: list, r: int) -> list:
  """`items` starting at position r (mod len): the order of round r."""
  r %= len(items)
  return items[r:] + items[:r]


def time_interleaved(advancers: dict, rounds: int, steps: int) -> dict[str, dict]:
  """Seconds per step of each variant: one untimed warm-up call each, then `rounds` rounds of
  `steps` steps per variant, the order rotated every round, so that drift of the machine (other
  jobs, clock, memory) falls on every variant alike. Returns median, min and max per variant."""
  names = list(advancers)
  for name in names:
    advancers[name](1)
  seconds = {name: [] for name in names}
  for r in range(rounds):
    for name in rotated(names, r):
      seconds[name].append(advancers[name](steps))
  return {name: {'step_s': float(np.median(v)), 'step_s_min': min(v), 'step_s_max': max(v),
                 'rounds': rounds, 'steps_per_round': steps} for name, v in seconds.items()}


def _rounds() -> tuple[int, int]:
  """(rounds, steps per round) of the interleaved step timings."""
  return FLAGS.rounds or (5 if harness.on_cpu() else 10), FLAGS.steps or (2 if harness.on_cpu() else 20)


def _timing_row(win: str, variant: str, batch: int, unit: str, timing: dict, **extra) -> dict:
  """A result row from `time_interleaved`'s timing of one variant: median throughput and range."""
  return {'win': win, 'variant': variant, 'batch': batch, 'step_ms': 1e3 * timing['step_s'],
          'per_s': batch / timing['step_s'],
          'per_s_range': (batch / timing['step_s_max'], batch / timing['step_s_min']),
          'unit': unit, **timing, **extra}


def _decoder_rows(win: str, variants: dict, batch, mesh) -> list[dict]:
  """Times {name: (model, params)} decoder steps interleaved; one row per variant."""
  advancers, compile_s = {}, {}
  for name, (model, params) in variants.items():
    advancers[name], compile_s[name] = _compiled_decoder_step(model, params, batch, mesh)
  timings = time_interleaved(advancers, *_rounds())
  size = batch['tokens'].shape[0]
  rows = []
  for name, timing in timings.items():
    rows.append(_timing_row(win, name, size, 'captions/s', timing, compile_s=compile_s[name]))
    print(f"  {win} {name}: {rows[-1]['per_s']:,.0f} captions/s (median of {timing['rounds']}; "
          f"range {rows[-1]['per_s_range'][0]:,.0f}-{rows[-1]['per_s_range'][1]:,.0f})", flush=True)
  return rows


def measure_lstm_layout(mesh) -> list[dict]:
  batch = _decoder_batch(harness.default_batch(FLAGS.decoder_batch, 256, 4096), mesh)
  reference = captioner.CaptionDecoder(FLAGS.vocab)
  params = reference.init(jax.random.PRNGKey(0), batch['image_vec'][:2], batch['tokens'][:2, :-1])['params']
  expected = reference.apply({'params': params}, batch['image_vec'][:8], batch['tokens'][:8, :-1])
  variants = {'capjax': (reference, params)}
  for name in ('readout_in', 'both_in'):
    model = ProjectionsInsideDecoder(FLAGS.vocab, readout_inside=name == 'both_in')
    variant_params = params_from_capjax(params, readout_inside=name == 'both_in')
    got = model.apply({'params': variant_params}, batch['image_vec'][:8], batch['tokens'][:8, :-1])
    error = float(jnp.max(jnp.abs(got - expected)))
    if error > 1e-3:
      raise AssertionError(f'layout {name} computes a different function (max |dlogit| {error})')
    variants[name] = (model, variant_params)
  return _relative_to(_decoder_rows('lstm_layout', variants, batch, mesh), 'capjax')


def measure_unroll(mesh) -> list[dict]:
  batch = _decoder_batch(harness.default_batch(FLAGS.decoder_batch, 256, 4096), mesh)
  variants = {}
  for unroll in (1, 2, 4, 8):
    model = captioner.CaptionDecoder(FLAGS.vocab, lstm_unroll=unroll)
    params = model.init(jax.random.PRNGKey(0), batch['image_vec'][:2], batch['tokens'][:2, :-1])['params']
    variants[f'unroll {unroll}'] = (model, params)
  return _relative_to(_decoder_rows('unroll', variants, batch, mesh), 'unroll 1')


# ----------------------------------------------------------------------------------------------
# Donation


def _memory(compiled) -> dict:
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return {}
  if stats is None:
    return {}
  fields = ('argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes',
            'temp_size_in_bytes')
  mib = {f.replace('_size_in_bytes', '_mib'): getattr(stats, f) / 2**20 for f in fields}
  # What the executable needs at its peak beyond what is already live: outputs not aliased to
  # inputs, plus temporaries. Arguments are live either way.
  mib['new_buffers_mib'] = mib['output_mib'] - mib['alias_mib'] + mib['temp_mib']
  return mib


def measure_donation(mesh) -> list[dict]:
  size = FLAGS.donation_image_size or (64 if harness.on_cpu() else 224)
  batch_size = harness.default_batch(FLAGS.image_batch, 4, 256)
  model = captioner.Captioner(vocab_size=FLAGS.vocab)
  tx = harness.default_optimizer('train')
  host = harness.synthetic_batch('train', batch_size, size, FLAGS.caption_len, FLAGS.vocab)
  batch = mesh_lib.host_batch_to_global(host, mesh)
  replicated = mesh_lib.replicated(mesh)
  advancers, facts = {}, {}
  for donate in (True, False):
    name = 'donated (capjax)' if donate else 'not donated'
    step = jax.jit(functools.partial(state_lib.train_step, logits_fn=state_lib.teacher_forced_logits(model),
                                     tx=tx),
                   in_shardings=(replicated, mesh_lib.batch_sharded(mesh)),
                   out_shardings=(replicated, replicated), donate_argnums=(0,) if donate else ())
    state = state_lib.create_train_state(model, tx, 0, size, FLAGS.caption_len, mesh)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    facts[name] = {'compile_s': time.perf_counter() - start,
                   'state_mib': sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20,
                   **_memory(compiled)}
    advancers[name] = _advancer(compiled, (state,), batch)
  rows = []
  for name, timing in time_interleaved(advancers, *_rounds()).items():
    rows.append(_timing_row('donation', name, batch_size, 'images/s', timing, image_size=size,
                            **facts[name]))
    print(f"  donation {name}: {rows[-1]['per_s']:,.1f} images/s, "
          f"{rows[-1].get('new_buffers_mib', float('nan')):,.0f} MiB new buffers", flush=True)
  return _relative_to(rows, 'donated (capjax)')


# ----------------------------------------------------------------------------------------------
# The training loop: device prefetch and lazy metrics


def _timed_host_batches(iterator, waits: list):
  """Host batches from grain; the seconds spent in each `next()` go to `waits`."""
  while True:
    start = time.perf_counter()
    batch = next(iterator)
    waits.append(time.perf_counter() - start)
    yield batch, None


def run_loop(compiled, state, iterator, mesh, *, steps: int, warmup: int, prefetch: bool,
             fetch_every: int) -> tuple[float, float]:
  """capjax's `_train_loop` without checkpoints or evaluation. Returns (seconds, seconds waiting)."""
  waits = []
  host = _timed_host_batches(iterator, waits)
  if prefetch:
    batches = mesh_lib.prefetch_to_mesh(host, mesh, size=1)
  else:
    batches = ((mesh_lib.host_batch_to_global(b, mesh), t) for b, t in host)
  pending, losses = [], []
  for _ in range(warmup):
    state, metrics = compiled(state, next(batches)[0])
  jax.block_until_ready(metrics)
  timed_from = len(waits)
  start = time.perf_counter()
  for i in range(steps):
    state, metrics = compiled(state, next(batches)[0])
    pending.append(metrics)
    if (i + 1) % fetch_every == 0:
      losses.extend(float(m['loss']) for m in jax.device_get(pending))
      pending = []
  losses.extend(float(m['loss']) for m in jax.device_get(pending))
  jax.block_until_ready(state)
  seconds = time.perf_counter() - start
  # With prefetch the loop draws one batch ahead: the waits of the timed batches are those drawn
  # after the warm-up (the last one drawn is for a step that never runs; it still cost the loop).
  return seconds, sum(waits[timed_from:])


def measure_loop(mesh) -> list[dict]:
  size = FLAGS.loop_image_size or (64 if harness.on_cpu() else 224)
  batch_size = harness.default_batch(FLAGS.image_batch, 32, 256)
  steps = FLAGS.loop_steps or (20 if harness.on_cpu() else 200)
  records = harness.flickr_like_records(64)
  vocab = harness.vocabulary_of(records)
  model = captioner.Captioner(vocab_size=len(vocab), trunk_mode='frozen')
  tx = harness.default_optimizer('frozen')
  compiled = state_lib.compile_train_step(state_lib.teacher_forced_logits(model), tx, mesh)
  variants = [(prefetch, lazy) for prefetch in (True, False) for lazy in (True, False)]
  runs = {v: [] for v in variants}
  rounds = FLAGS.loop_rounds
  for r in range(rounds):  # order rotated every round, as in time_interleaved
    for prefetch, lazy in rotated(variants, r):
      state = state_lib.create_train_state(model, tx, 0, size, FLAGS.caption_len, mesh)
      iterator = input_pipeline.make_train_iterator(
          records, vocab, input_pipeline.PipelineConfig(
              image_size=size, max_caption_len=FLAGS.caption_len, captions_per_image=5,
              num_workers=FLAGS.workers),
          host_batch_size=batch_size // jax.process_count())
      try:
        runs[prefetch, lazy].append(run_loop(
            compiled, state, iterator, mesh, steps=steps, warmup=2, prefetch=prefetch,
            fetch_every=FLAGS.log_every if lazy else 1))
      finally:
        iterator.close()
      harness.wait_until_quiet()
  rows = []
  for (prefetch, lazy), results in runs.items():
    seconds = float(np.median([s for s, _ in results]))
    waited = float(np.median([w for _, w in results]))
    rates = sorted(batch_size * steps / s for s, _ in results)
    variant = (f"prefetch {'on' if prefetch else 'off'}, metrics "
               f"{'every %d steps' % FLAGS.log_every if lazy else 'every step'}")
    rows.append({'win': 'loop', 'variant': variant, 'step_ms': 1e3 * seconds / steps,
                 'per_s': batch_size * steps / seconds,
                 'per_s_range': (rates[0], rates[-1]),
                 'unit': 'images/s', 'batch': batch_size, 'image_size': size, 'rounds': rounds,
                 'steps_per_round': steps, 'wait_%': 100 * waited / seconds})
    print(f"  loop {variant}: {rows[-1]['per_s']:,.1f} images/s, waiting "
          f"{rows[-1]['wait_%']:.1f}%", flush=True)
  return _relative_to(rows, f'prefetch on, metrics every {FLAGS.log_every} steps')


# ----------------------------------------------------------------------------------------------
# Decoded-image cache


def _epoch_rate(iterator, batches: int, batch_size: int) -> float:
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return batches * batch_size / (time.perf_counter() - start)


def measure_image_cache(mesh) -> list[dict]:
  del mesh
  num_images = FLAGS.cache_images
  records = harness.flickr_like_records(num_images)
  vocab = harness.vocabulary_of(records)
  batch_size = 16
  batches = num_images // batch_size  # one epoch: one random caption per image
  rows = []
  for size, min_side in ((224, 256), (48, 64)):
    for cached in (False, True):
      source = input_pipeline.DecodedImageCache(records, min_side) if cached else records
      iterator = input_pipeline.make_train_iterator(
          source, vocab, input_pipeline.PipelineConfig(
              image_size=size, max_caption_len=FLAGS.caption_len, captions_per_image=5,
              random_caption=True),
          host_batch_size=batch_size)
      try:
        first = _epoch_rate(iterator, batches, batch_size)
        second = _epoch_rate(iterator, batches, batch_size)
      finally:
        iterator.close()
      harness.wait_until_quiet()
      cache_mib = (sum(v['pixels'].nbytes for v in source._cache.values()) / 2**20  # pylint: disable=protected-access
                   if cached else None)
      variant = (f'{size} px, ' + (f'decoded images cached (shorter side {min_side})' if cached
                                   else 'JPEG decoded every epoch'))
      rows.append({'win': 'image_cache', 'variant': variant, 'image_size': size,
                   'epoch1_per_s': first, 'per_s': second, 'unit': 'images/s (epoch 2)',
                   'batch': batch_size, 'cache_mib': cache_mib,
                   'cache_mib_per_1000_images': cache_mib * 1000 / num_images if cached else None})
      print(f"  image_cache {variant}: epoch 1 {first:,.0f}, epoch 2 {second:,.0f} images/s", flush=True)
  for size in (224, 48):
    group = [r for r in rows if r['image_size'] == size]
    _relative_to(group, group[0]['variant'])
  return rows


# ----------------------------------------------------------------------------------------------


def _relative_to(rows: list[dict], baseline: str) -> list[dict]:
  """Adds each row's speed relative to the `baseline` variant."""
  base = next(r for r in rows if r['variant'] == baseline)
  for row in rows:
    row['vs_baseline'] = row['per_s'] / base['per_s']
  return rows


MEASURES = {'lstm_layout': measure_lstm_layout, 'unroll': measure_unroll,
            'donation': measure_donation, 'loop': measure_loop, 'image_cache': measure_image_cache}


def main(argv):
  harness.start(argv)
  unknown = set(FLAGS.wins) - set(WINS)
  if unknown:
    raise app.UsageError(f'--wins: unknown {sorted(unknown)}; expected some of {WINS}')
  before = harness.idle_check()
  print(f'before the run: {harness.describe_load(before)}')
  mesh = mesh_lib.make_mesh()
  monitor = harness.LoadMonitor()
  rows: list[dict[str, Any]] = []
  for win in FLAGS.wins:
    rows.extend(MEASURES[win](mesh))
  load = monitor.report()
  print()
  harness.print_table(rows, ['win', 'variant', 'batch', 'compile_s', 'step_ms', 'per_s', 'unit',
                             'vs_baseline', 'wait_%', 'new_buffers_mib', 'alias_mib', 'cache_mib'])
  print(f'\n{harness.machine_info()}\n{harness.describe_load(load)}')
  harness.write_json(FLAGS.output or harness.default_output(__file__), {
      'benchmark': 'structural_wins', 'argv': sys.argv, 'machine': harness.machine_info(),
      'load_before': before, 'load_during': load, 'vocab_size': FLAGS.vocab,
      'caption_len': FLAGS.caption_len, 'rows': rows})


if __name__ == '__main__':
  define_flags()
  app.run(main)
