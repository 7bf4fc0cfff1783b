"""The sharded train step: equality with one device, global BatchNorm, loss that falls, resume."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from capjax import mesh as mesh_lib
from capjax import state as state_lib
from capjax import train
from capjax import vocab as vocab_lib
from capjax.data import shapes
from capjax.evaluation import loss as loss_lib
from capjax.models import captioner
from configs import tiny


def _tiny_config(decoder='seed'):
  config = tiny.get_config()
  config.train.metrics_every_epochs = 0
  config.model.decoder = decoder
  if decoder == 'attention':  # three stages: a 2x2 grid at 32 px, so there is something to attend over
    config.model.stage_sizes = (1, 1, 1)
    # The seed case runs the word loss (the demo's weight, 30). Here, on 8 devices, it moved one trunk
    # kernel element of 512 by 1.5% after 3 Adam steps (a near-zero gradient's rounding); without it
    # this case is the attention decoder's own sharding test, as before the word loss.
    config.model.word_loss_weight = 0.0
  return config


def _setup(config, devices, vocab_size=30):
  mesh = mesh_lib.make_mesh(devices)
  model = captioner.build_captioner(config.model, vocab_size)
  schedule = state_lib.make_schedule(config.train, steps_per_epoch=10, total_steps=50)
  tx = state_lib.make_optimizer(config.train, schedule, config.model.encoder_mode)
  state = state_lib.create_train_state(model, tx, 0, config.data.image_size, config.data.max_caption_len,
                                   mesh)
  return mesh, model, tx, state


def _batch(batch_size=16, image_size=32, length=12, vocab_size=30, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, vocab_size, (batch_size, length)).astype(np.int32)
  tokens[:, 0] = vocab_lib.START_ID
  lengths = rng.integers(4, length, batch_size)
  for row, n in zip(tokens, lengths):
    row[n] = vocab_lib.END_ID
    row[n + 1:] = vocab_lib.PAD_ID
  return {'image': rng.integers(0, 255, (batch_size, image_size, image_size, 3)).astype(np.uint8),
          'tokens': tokens}


@pytest.mark.parametrize('decoder', ['seed', 'attention'])
def test_eight_device_step_equals_one_device_step(decoder):
  assert jax.device_count() == 8
  config = _tiny_config(decoder)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh, model, tx, state = _setup(config, devices)
    step = state_lib.compile_train_step(state_lib.teacher_forced_logits(model), tx, mesh)
    losses = []
    for i in range(3):
      state, metrics = step(state, mesh_lib.host_batch_to_global(_batch(seed=i), mesh))
      losses.append(float(metrics['loss']))
    results.append((losses, jax.device_get(state.params), jax.device_get(state.batch_stats)))
  (losses1, params1, stats1), (losses8, params8, stats8) = results
  np.testing.assert_allclose(losses1, losses8, rtol=1e-4)
  # BatchNorm running statistics equal: the 8-way sharded step normalises over the global batch.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4), stats1, stats8)
  # The image projection's bias sits right before BatchNorm, which subtracts it again: its true gradient
  # is zero, and Adam turns the rounding noise (summed in another order on 8 devices) into lr-sized steps
  # of a parameter that changes no output. Every other parameter must agree.
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params1), jax.tree.leaves(params8)):
    if jax.tree_util.keystr(path) != "['encoder']['projection']['bias']":
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_loss_decreases_on_a_fixed_batch():
  config = _tiny_config()
  mesh, model, _, _ = _setup(config, jax.devices())
  tx = state_lib.make_optimizer(config.train, optax.constant_schedule(1e-2), 'train')
  state = state_lib.create_train_state(model, tx, 0, 32, 12, mesh)
  step = state_lib.compile_train_step(state_lib.teacher_forced_logits(model), tx, mesh)
  batch = mesh_lib.host_batch_to_global(_batch(), mesh)
  losses = []
  for _ in range(25):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert losses[-1] < 0.6 * losses[0], losses


def test_padding_is_masked_and_weighted():
  logits = jnp.zeros((2, 3, 5))
  tokens = jnp.array([[1, 4, 2, 0], [1, 4, 4, 2]])
  loss_sum, count = state_lib.token_cross_entropy(logits, tokens)
  assert float(count) == 5  # row 0: targets 4, <END>; row 1: 4, 4, <END>
  np.testing.assert_allclose(loss_sum, 5 * np.log(5), rtol=1e-6)
  _, weighted = state_lib.token_cross_entropy(logits, tokens, jnp.array([1.0, 0.0]))
  assert float(weighted) == 2


def test_eval_loss_is_also_summed_per_target_word():
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 6))
  tokens = jnp.array([[1, 4, 5, 2], [1, 4, 2, 0]])  # targets: 4, 5, <END> and 4, <END>, <PAD>
  batch = {'tokens': tokens, 'weight': jnp.array([1.0, 1.0])}
  out = state_lib.eval_step(types.SimpleNamespace(variables=None), batch,
                            logits_fn=lambda variables, batch, train: logits)
  nll = -np.asarray(jax.nn.log_softmax(logits))
  expected = np.zeros(6)
  for row, t, word in [(0, 0, 4), (0, 1, 5), (0, 2, 2), (1, 0, 4), (1, 1, 2)]:
    expected[word] += nll[row, t, word]
  np.testing.assert_allclose(out['word_loss_sum'], expected, rtol=1e-5)
  np.testing.assert_array_equal(out['word_count'], [0, 0, 2, 0, 2, 1])
  np.testing.assert_allclose(np.sum(out['word_loss_sum']), out['loss_sum'], rtol=1e-5)
  assert float(out['tokens']) == 5


def test_split_loss_by_word_class():
  vocab = vocab_lib.Vocabulary((*vocab_lib.SPECIALS, 'red', 'blue', 'circle', 'on'))
  loss = loss_lib.SplitLoss(mean=0.0, word_loss_sum=np.array([0, 0, 1.0, 0, 3.0, 1.0, 6.0, 2.0]),
                            word_count=np.array([0, 0, 2, 0, 2, 2, 3, 2.0]))
  by_class = loss.by_word_class(vocab, {'colour': ('red', 'blue', 'green'), 'shape': ('circle',),
                                        'size': ('big',)})
  # colour: (3 + 1) / (2 + 2); shape: 6 / 3; no 'size' target; other: <END> and 'on', (1 + 2) / (2 + 2)
  assert by_class == {'colour': 1.0, 'shape': 2.0, 'other': 0.75}


def _records(num_train=48):
  return {s: list(shapes.generate_records(s, n, 48))
          for s, n in [('train', num_train), ('validation', 16), ('test', 16)]}


@pytest.mark.parametrize('decoder', ['seed', 'attention'])
def test_resume_after_kill_gives_identical_losses(tmp_path, monkeypatch, decoder):
  config = _tiny_config(decoder)
  config.train.checkpoint_every_steps = 3
  splits = _records(num_train=24)  # 120 pairs: 7 steps per epoch, 14 in all
  unbroken = train.train_and_evaluate(config, str(tmp_path / 'a'), splits)
  uninterrupted = unbroken.step_losses
  assert len(uninterrupted) == 14

  real_draw = train._draw_batches

  def killed_after_12(iterator, count):
    for i, item in enumerate(real_draw(iterator, count)):
      if i == 11:  # steps 1..11 ran; checkpoints at 3, 6, 7 (epoch end), 9
        raise KeyboardInterrupt('simulated kill')
      yield item

  monkeypatch.setattr(train, '_draw_batches', killed_after_12)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path / 'b'), splits)
  monkeypatch.setattr(train, '_draw_batches', real_draw)
  resumed = train.train_and_evaluate(config, str(tmp_path / 'b'), splits)
  assert min(resumed.step_losses) == 10  # resumed from the checkpoint at step 9
  for step, loss in resumed.step_losses.items():
    assert loss == pytest.approx(uninterrupted[step], rel=1e-6, abs=1e-6), step
  assert [h['step'] for h in resumed.history] == [7, 14]
  # Epoch 2 was interrupted at step 11: its train loss still averages all of its 7 steps.
  assert [h['train_loss'] for h in resumed.history] == [h['train_loss'] for h in unbroken.history]
