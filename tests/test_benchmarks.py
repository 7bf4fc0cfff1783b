"""The benchmarks' own correctness: an ablation must compare the same function, and the interleaved
timer must give every variant the same treatment. (Speeds themselves are never tested.)"""

import importlib
import json
import os
import pkgutil
import subprocess
import sys

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import benchmarks
from benchmarks import harness
from benchmarks import investigations
from benchmarks import structural_wins
from benchmarks.investigations import step_profile
from benchmarks.investigations import xla_flags
from capjax import state as state_lib
from capjax import vocab as vocab_lib
from capjax.models import captioner

VOCAB = 37


def _decoder_inputs(batch=4, length=9):
  rng = np.random.default_rng(0)
  image_vec = jnp.asarray(rng.normal(size=(batch, 256)).astype(np.float32))
  tokens = jnp.asarray(harness.random_tokens(rng, batch, length, VOCAB))
  return image_vec, tokens


@pytest.mark.parametrize('readout_inside', [False, True])
def test_projection_layouts_compute_the_same_loss_and_gradients(readout_inside):
  image_vec, tokens = _decoder_inputs()
  reference = captioner.CaptionDecoder(VOCAB)
  params = reference.init(jax.random.PRNGKey(1), image_vec, tokens[:, :-1])['params']
  variant = structural_wins.ProjectionsInsideDecoder(VOCAB, readout_inside=readout_inside)
  variant_params = structural_wins.params_from_capjax(params, readout_inside)
  # The converted tree is exactly the variant's own parameter structure.
  own = variant.init(jax.random.PRNGKey(2), image_vec, tokens[:, :-1])['params']
  assert jax.tree.structure(own) == jax.tree.structure(variant_params)

  def loss(model, p):
    logits = model.apply({'params': p}, image_vec, tokens[:, :-1])
    loss_sum, count = state_lib.token_cross_entropy(logits, tokens)
    return loss_sum / count

  expected_loss, expected_grads = jax.value_and_grad(lambda p: loss(reference, p))(params)
  got_loss, got_grads = jax.value_and_grad(lambda p: loss(variant, p))(variant_params)
  np.testing.assert_allclose(got_loss, expected_loss, rtol=1e-5)
  expected_in_variant_layout = structural_wins.params_from_capjax(expected_grads, readout_inside)
  for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(expected_in_variant_layout)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_time_interleaved_rotates_the_order_and_reports_medians():
  calls = []

  def fake(name, seconds):
    def advance(steps):
      calls.append((name, steps))
      return seconds.pop(0)
    return advance

  timings = structural_wins.time_interleaved(
      {'a': fake('a', [9.0, 1.0, 2.0, 3.0]), 'b': fake('b', [9.0, 5.0, 4.0, 6.0])}, rounds=3, steps=2)
  # One warm-up call each (1 step), then rounds a,b / b,a / a,b of 2 steps.
  assert calls == [('a', 1), ('b', 1), ('a', 2), ('b', 2), ('b', 2), ('a', 2), ('a', 2), ('b', 2)]
  assert timings['a']['step_s'] == 2.0 and timings['a']['step_s_min'] == 1.0
  assert timings['b']['step_s'] == 5.0 and timings['b']['step_s_max'] == 6.0


def test_random_tokens_look_like_captions():
  tokens = harness.random_tokens(np.random.default_rng(0), 16, 24, VOCAB)
  assert tokens.shape == (16, 24) and tokens.dtype == np.int32
  assert (tokens[:, 0] == vocab_lib.START_ID).all()
  for row in tokens:
    end = int(np.argmax(row == vocab_lib.END_ID))
    assert 8 <= end - 1 <= 18
    assert (row[1:end] >= 4).all() and (row[end + 1:] == vocab_lib.PAD_ID).all()


def test_xla_flag_sets_parse_and_compare_with_the_default():
  sets = xla_flags.parse_sets('default=; onednn=--xla_cpu_use_onednn=true ;two=--a=1 --b=x,y')
  assert sets == {'default': '', 'onednn': '--xla_cpu_use_onednn=true', 'two': '--a=1 --b=x,y'}
  assert 'default' in xla_flags.parse_sets(xla_flags.DEFAULT_SETS)
  with pytest.raises(ValueError, match='name=XLA_FLAGS'):
    xla_flags.parse_sets('default=;--xla_cpu_use_onednn=true')
  run = lambda s: {'step_s': s, 'compile_s': 10.0, 'cores': 1.8}
  rows = xla_flags.summarise(sets, {'default': [run(1.0), run(1.2), run(1.1)], 'onednn': [run(0.55)],
                                    'two': [{'error': 'exit 1: unknown flag'}]}, batch=4)
  by_set = {row['set']: row for row in rows}
  assert by_set['default']['step_ms'] == pytest.approx(1100) and by_set['default']['runs'] == 3
  assert by_set['onednn']['vs_default'] == pytest.approx(2.0)
  assert by_set['onednn']['images_per_s'] == pytest.approx(4 / 0.55)
  assert 'step_ms' not in by_set['two'] and by_set['two']['error'].startswith('exit 1')


def test_batchnorm_by_hand_is_flax_batchnorm_with_the_same_gradients_and_running_averages():
  x = jax.random.normal(jax.random.key(0), (3, 5, 4, 6)) * 2.0 + 1.0
  g = jax.random.normal(jax.random.key(1), x.shape)
  bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  variables = bn.init(jax.random.key(2), x)
  params = {'scale': jnp.linspace(0.5, 1.5, 6), 'bias': jnp.linspace(-1.0, 1.0, 6)}

  def loss(params, x, batchnorm):
    with step_profile.BATCHNORMS[batchnorm]():
      y, updates = bn.apply({**variables, 'params': params}, x, mutable=['batch_stats'])
    return jnp.vdot(y, g), (y, updates)
  grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
  (flax_grads, (flax_y, flax_updates)) = grad(params, x, 'flax')
  (hand_grads, (hand_y, hand_updates)) = grad(params, x, 'by hand')
  np.testing.assert_allclose(hand_y, flax_y, rtol=1e-5, atol=1e-5)
  hand, flax = jax.tree.leaves((hand_grads, hand_updates)), jax.tree.leaves((flax_grads, flax_updates))
  assert len(hand) == len(flax) == 5  # d/dbias, d/dscale, d/dx; running mean and variance
  for got, want in zip(hand, flax):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert not np.allclose(flax_updates['batch_stats']['mean'], variables['batch_stats']['mean'])
  # Evaluation mode (running averages) is flax's own.
  evaluating = nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=1e-5)
  stats = {**variables, 'params': params, 'batch_stats': flax_updates['batch_stats']}
  with step_profile.BATCHNORMS['by hand']():
    evaluated = evaluating.apply(stats, x)
  np.testing.assert_allclose(evaluated, evaluating.apply(stats, x))


def test_every_benchmark_imports_into_one_process_without_defining_flags():
  # absl flags are process-global and the scripts share names (--steps, --output...): each defines its
  # flags only when it runs as the program (benchmarks/harness.py, "Flags").
  names = [f'{package.__name__}.{module.name}' for package in (benchmarks, investigations)
           for module in pkgutil.iter_modules(package.__path__) if not module.ispkg]
  assert 'benchmarks.train_throughput' in names and 'benchmarks.investigations.cpu_gap' in names
  for name in names:
    importlib.import_module(name)
  defined = [module for module in flags.FLAGS.flags_by_module_dict() if module.startswith('benchmarks')]
  assert not defined, defined


def test_scale_benchmark_runs_its_stages_on_a_small_coco_and_times_the_scoring(tmp_path):
  """benchmarks/scale.py end to end on 60 images (the data stages and the 5,000-image scoring stage,
  scaled down): each stage in its own process, a row each, the scoring's seconds reported apart."""
  output = tmp_path / 'scale.json'
  proc = subprocess.run(
      [sys.executable, '-m', 'benchmarks.scale', '--num_images=60', '--jpeg_kb=6', '--vocab_words=300',
       '--stages=prepare,vocabulary,validation_scoring', '--scoring_images=40', f'--root={tmp_path}',
       f'--output={output}'],
      cwd=harness.REPO_ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1'))
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  rows = {row['stage']: row for row in json.loads(output.read_text())['rows']}
  assert list(rows) == ['prepare', 'vocabulary', 'validation_scoring']
  assert sum(rows['prepare']['facts']['images'].values()) == 60
  scoring = rows['validation_scoring']['facts']
  assert scoring['images'] == 40 and scoring['scoring_s'] > 0 and 0 <= scoring['CIDEr'] < 1
  assert all(row['peak_rss_mib'] > 0 for row in rows.values())
