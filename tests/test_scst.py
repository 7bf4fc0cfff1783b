"""Self-critical sequence training: the reward's pitfalls, baselines, the loss and its gradient sign, the
sharded step, exact resume and init_from."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cider_reference
from capjax import decoding
from capjax import input_pipeline
from capjax import mesh as mesh_lib
from capjax import scst
from capjax import state as state_lib
from capjax import train
from capjax import vocab as vocab_lib
from capjax.data import records as records_lib
from capjax.data import shapes
from capjax.models import captioner
from configs import tiny

PAD, START, END, UNK = vocab_lib.PAD_ID, vocab_lib.START_ID, vocab_lib.END_ID, vocab_lib.UNK_ID
WORDS = ('a', 'red', 'blue', 'circle', 'square', 'on', 'the', 'left', 'right')
VOCAB = vocab_lib.Vocabulary(vocab_lib.SPECIALS + WORDS, min_count=1)


def _ids(text):
  return [VOCAB.words.index(w) for w in text.split()]


def _row(text, length=8, end=True):
  ids = _ids(text) + ([END] if end else [])
  return ids + [PAD] * (length - len(ids))


# Different reference counts per image (1, 2, 3); image 2 has a word the vocabulary lacks ('green').
REFERENCES = [['a red circle on the left'],
              ['a blue square', 'a blue square on the right'],
              ['a green circle', 'a red circle', 'the circle on the left']]


# ----------------------------------------------------------------------------------------------
# Reward


@pytest.mark.parametrize('reward_end', [False, True])
def test_reward_equals_the_reference_cider_d(reward_end):
  reward = scst.CaptionReward(REFERENCES, VOCAB, reward_end=reward_end)
  refs, unknown = scst.reference_ids(REFERENCES, VOCAB, append_end=reward_end)
  assert unknown == 1 and refs[2][0][1] == len(VOCAB)  # 'green' has an id of its own, not <UNK>
  texts = ['a red circle on the left', 'a blue square', 'a red circle', 'circle circle', 'a blue']
  image_index = np.array([0, 1, 2, 2, 1])
  got = reward(np.array([_row(t) for t in texts]), image_index)
  candidates = [_ids(t) + ([END] if reward_end else []) for t in texts]
  expected = cider_reference.cider_d(candidates, [refs[i] for i in image_index], refs)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)


def test_reward_pitfalls():
  reward = scst.CaptionReward(REFERENCES, VOCAB, reward_end=True)
  index = np.zeros(1, int)
  score = lambda row, image=0: float(reward(np.array([row]), index + image)[0])  # noqa: E731
  # An empty caption scores 0, however it is padded.
  assert score([END] + [PAD] * 7) == 0.0
  # Tokens after the first <END> are ignored; <START>/<PAD> inside a caption are dropped (as decode does).
  full = _row('a red circle on the left')
  assert score(full[:7] + [END]) == score(full)
  noisy = _ids('a red') + [PAD, START] + _ids('circle on the left') + [END]
  assert score(noisy) == score(full)
  # A sample that never emits <END> is scored truncated, and (reward_end) misses the ending's n-grams.
  unended = _ids('a red circle on the left') + _ids('a red')
  assert 0 < score(unended) < score(full)
  # <UNK> matches nothing, not even the image's out-of-vocabulary word ('green' in image 2): it fares
  # like any word its references lack ('square', also of corpus df <= 1, so of the same idf).
  assert score([UNK, END], image=2) == 0.0
  with_unk = score(_ids('a') + [UNK] + _ids('circle') + [END], image=2)
  assert with_unk == pytest.approx(score(_row('a square circle'), image=2), rel=1e-12)
  assert 0 < with_unk < score(_row('a red circle'), image=2)


def test_baselines_and_statistics():
  rewards = np.array([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
  np.testing.assert_allclose(scst.baselines(rewards, 3, 'mean'), [2.5, 2.0, 1.5, 3.0, 3.0, 0.0])
  np.testing.assert_allclose(scst.baselines(rewards, 3, 'greedy', np.array([0.5, 4.0])),
                             [0.5, 0.5, 0.5, 4.0, 4.0, 4.0])
  stats = scst.sample_statistics(np.array([[4, 5, END, PAD], [4, 4, 4, 4]]))
  assert stats == {'ended': 0.5, 'sample_len': 3.0}  # (2 + 4) / 2


# ----------------------------------------------------------------------------------------------
# Loss


def test_loss_sums_tokens_up_to_end_and_averages_over_samples():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 4, 6)), jnp.float32)
  samples = jnp.array([[4, END, PAD, PAD], [5, 4, 5, 4]])  # the second never ends: all 4 tokens count
  advantages = jnp.array([2.0, -1.0])
  log_probs = np.asarray(jax.nn.log_softmax(logits / 0.5))
  first = log_probs[0, 0, 4] + log_probs[0, 1, END]
  second = sum(log_probs[1, t, int(samples[1, t])] for t in range(4))
  expected = -(2.0 * first - 1.0 * second) / 2
  np.testing.assert_allclose(scst.scst_loss(logits, samples, advantages, 0.5), expected, rtol=1e-5)


def _bigram_logits(variables, batch, train):
  """A toy captioner: the next token's logits depend on the current token only (a learned table)."""
  del train
  tokens = batch['tokens'][..., :-1].reshape(-1, batch['tokens'].shape[-1] - 1)
  return variables['params']['table'][tokens]


def _toy_state(tx, vocab_size=8):
  params = {'table': jnp.zeros((vocab_size, vocab_size))}
  return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                              opt_state=tx.init(params), rng=jax.random.key_data(jax.random.PRNGKey(0)))


@pytest.mark.parametrize('advantage', [1.0, -1.0])
def test_gradient_pushes_a_sample_toward_its_advantage(advantage):
  tx = optax.sgd(0.5)
  step = jax.jit(lambda state, batch, samples, adv: scst.update_step(
      state, batch, samples, adv, logits_fn=_bigram_logits, tx=tx, cfg=scst.ScstConfig()))
  # Two images, one sample each, disjoint tokens: sample 0 gets `advantage`, sample 1 the opposite.
  samples = jnp.array([[4, 5, END, PAD], [6, 7, 6, END]])
  batch = {'image': jnp.zeros((2, 1))}
  state = _toy_state(tx)

  def log_probs(state):
    tokens = jnp.concatenate([jnp.full((2, 1), START), samples], axis=1)[:, None]
    return scst.sequence_log_probs(_bigram_logits(state.variables, {'tokens': tokens}, False), samples)

  before = log_probs(state)
  state, metrics = step(state, batch, samples, jnp.array([advantage, -advantage]))
  change = np.asarray(log_probs(state) - before)
  assert np.sign(change[0]) == np.sign(advantage) and np.sign(change[1]) == -np.sign(advantage), change
  assert int(state.step) == 1 and float(metrics['grad_norm']) > 0


# ----------------------------------------------------------------------------------------------
# The step on the real models


def _config(decoder='seed', encoder_mode='frozen'):
  """Tiny SCST config. The trunk is frozen unless a test needs its gradient: what SCST adds does not
  depend on it, and the trunk's backward pass is most of the compile time."""
  config = tiny.get_config()
  config.model.decoder = decoder
  config.model.encoder_mode = encoder_mode
  if decoder == 'attention':  # a 2x2 grid at 32 px
    config.model.stage_sizes = (1, 1, 1)
  config.train.objective = 'scst'
  config.train.scst_samples = 3
  config.train.metrics_every_epochs = 0
  config.data.augment.flip_prob = 0.0
  config.data.random_caption = True  # one example (image) per step row: an epoch visits each image once
  config.train.batch_size = 8
  return config


def _records(num_train=48):
  return {s: list(shapes.generate_records(s, n, 48))
          for s, n in [('train', num_train), ('validation', 16), ('test', 16)]}


def _vocab(source):
  return vocab_lib.build_vocabulary([c for r in source for c in records_lib.record_captions(r)], 2)


def _batch(source, vocab, size=8, max_caption_len=12):
  cfg = input_pipeline.PipelineConfig(
      image_size=32, max_caption_len=max_caption_len, captions_per_image=5, random_caption=True,
      augment=input_pipeline.AugmentConfig(flip_prob=0.0), image_index=True)
  return next(input_pipeline.make_train_iterator(source, vocab, cfg, host_batch_size=size))


@pytest.mark.parametrize('decoder,encoder_mode', [('seed', 'train'), ('attention', 'frozen')])
def test_eight_device_step_equals_one_device_step(decoder, encoder_mode):
  assert jax.device_count() == 8
  config = _config(decoder, encoder_mode)
  source = _records()['train']
  vocab = _vocab(source)
  batch = _batch(source, vocab)
  reward = scst.CaptionReward.from_source(source, vocab)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = mesh_lib.make_mesh(devices)
    model = captioner.build_captioner(config.model, len(vocab))
    tx = state_lib.make_optimizer(config.train, optax.constant_schedule(1e-3), encoder_mode)
    state = state_lib.create_train_state(model, tx, 0, 32, 12, mesh)
    step = scst.compile_scst_step(model, state_lib.teacher_forced_logits(model), tx, mesh, reward,
                                  scst.ScstConfig.from_config(config))
    step.timed = len(devices) > 1  # benchmarks/scst_step.py's timing must not change what a step does
    runs = []
    for _ in range(2):
      state, metrics = step(state, mesh_lib.host_batch_to_global(batch, mesh))
      runs.append((step.last['samples'], step.last['rewards'], float(metrics['loss'])))
    if step.timed:
      assert set(step.last_seconds) == {'sample', 'reward', 'update'}
      assert all(seconds > 0 for seconds in step.last_seconds.values())
    else:
      assert step.last_seconds is None
    results.append((runs, jax.device_get(state.params)))
  (runs1, params1), (runs8, params8) = results
  for (samples1, rewards1, loss1), (samples8, rewards8, loss8) in zip(runs1, runs8):
    assert samples1.shape == (8 * 3, 11)
    np.testing.assert_array_equal(samples1, samples8)
    np.testing.assert_allclose(rewards1, rewards8, rtol=1e-6)
    assert np.isfinite(loss1) and loss1 == pytest.approx(loss8, rel=1e-4, abs=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), params1, params8)


@pytest.mark.parametrize('decoder', ['seed', 'attention'])
def test_the_update_scores_the_samples_the_decoder_drew(decoder):
  """The teacher-forced log-probs of the update equal those of the decoding steps that drew the samples
  (the K samples of an image share its encoding in both)."""
  config = _config(decoder)
  source = _records(num_train=16)['train']
  vocab = _vocab(source)
  batch = _batch(source, vocab, size=4)
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  model = captioner.build_captioner(config.model, len(vocab))
  tx = optax.sgd(0.0)
  state = state_lib.create_train_state(model, tx, 0, 32, 12, mesh)
  cfg = scst.ScstConfig.from_config(config)
  samples = jax.jit(lambda s, b: scst.sample_step(s, b, model=model, cfg=cfg))(state, batch)['samples']
  tokens = jnp.concatenate([jnp.full((12, 1), START), samples], axis=1).reshape(4, 3, 12)
  logits_fn = state_lib.teacher_forced_logits(model)
  logits = logits_fn(state.variables, {'image': batch['image'], 'tokens': tokens}, train=False)
  ours = scst.sequence_log_probs(logits, samples)

  def decoder_log_probs(variables, images, samples):
    encoded = model.apply(variables, images, method=model.encode)
    context = model.apply(variables, encoded, method=model.prepare)
    carry = model.apply(variables, encoded, method=model.start)
    carry = jax.tree.map(lambda x: jnp.repeat(x, 3, axis=0), carry)
    step_fn = lambda c, t: model.apply(variables, c, t, context, method=model.step)  # noqa: E731
    return decoding.sequence_log_prob(step_fn, carry, samples, END, start_id=START)

  expected = jax.jit(decoder_log_probs)(state.variables, batch['image'], samples)
  np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)


def test_resume_after_kill_gives_identical_losses_and_rewards(tmp_path, monkeypatch):
  config = _config()
  config.train.checkpoint_every_steps = 4
  config.train.scst_baseline = 'mean'
  splits = _records(num_train=40)  # 5 steps per epoch, 10 in all
  rewards = {}
  real_call = scst.ScstStep.__call__

  def recording(self, state, batch):
    step = int(state.step) + 1
    out = real_call(self, state, batch)
    rewards[(run, step)] = self.last['rewards']
    return out

  monkeypatch.setattr(scst.ScstStep, '__call__', recording)
  run = 'unbroken'
  unbroken = train.train_and_evaluate(config, str(tmp_path / 'a'), splits)
  assert sorted(unbroken.step_losses) == list(range(1, 11))
  assert all(np.isfinite(h['train_reward']) for h in unbroken.history)

  real_draw = train._draw_batches

  def killed(iterator, count):
    for i, item in enumerate(real_draw(iterator, count)):
      if i == 7:  # batches go one step ahead: steps 1..6 ran, checkpoints at 4 and 5 (epoch end)
        raise KeyboardInterrupt('simulated kill')
      yield item

  run = 'killed'
  monkeypatch.setattr(train, '_draw_batches', killed)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path / 'b'), splits)
  monkeypatch.setattr(train, '_draw_batches', real_draw)
  run = 'resumed'
  resumed = train.train_and_evaluate(config, str(tmp_path / 'b'), splits)
  assert min(resumed.step_losses) == 6  # resumed from the epoch-end checkpoint at step 5
  for step, loss in resumed.step_losses.items():
    assert loss == pytest.approx(unbroken.step_losses[step], rel=1e-6, abs=1e-7), step
    np.testing.assert_array_equal(rewards[('resumed', step)], rewards[('unbroken', step)])
  assert [h['train_reward'] for h in resumed.history] == [h['train_reward'] for h in unbroken.history]


def test_init_from_loads_the_other_workdirs_params(tmp_path, monkeypatch):
  splits = _records(num_train=16)
  xent = tiny.get_config()
  xent.model.encoder_mode = 'frozen'
  xent.train.metrics_every_epochs = 0
  xent.train.max_steps = 1
  first = train.train_and_evaluate(xent, str(tmp_path / 'xent'), splits)

  config = _config()
  config.train.init_from = str(tmp_path / 'xent')
  started = {}

  def no_steps(run, state, train_iter):
    del train_iter
    started['state'] = state
    return state, {}

  monkeypatch.setattr(train, '_train_loop', no_steps)
  train.train_and_evaluate(config, str(tmp_path / 'scst'), splits)
  state = started['state']
  assert int(state.step) == 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.variables),
               jax.device_get(first.state.variables))
  # The optimizer starts fresh: Adam's moments are zero.
  assert all(not np.any(x) for x in jax.tree.leaves(jax.device_get(state.opt_state))
             if np.issubdtype(np.asarray(x).dtype, np.floating))


def test_examples_carry_their_image_index():
  source = _records(num_train=12)['train']
  vocab = vocab_lib.build_vocabulary([c for r in source for c in records_lib.record_captions(r)], 1)
  batch = _batch(source, vocab, size=12, max_caption_len=24)
  assert sorted(batch['image_index'].tolist()) == list(range(12))
  for index, tokens in zip(batch['image_index'], batch['tokens']):
    assert vocab.decode(tokens) in [' '.join(vocab_lib.tokenize(c))
                                    for c in records_lib.record_captions(source[index])]


def test_config_checks():
  config = _config()
  scst.check_config(config)
  bad = _config()
  bad.data.augment.flip_prob = 0.5
  with pytest.raises(ValueError, match='flip'):
    scst.check_config(bad)
  bad = _config()
  bad.train.scst_baseline, bad.train.scst_samples = 'mean', 1
  with pytest.raises(ValueError, match='at least 2'):
    scst.check_config(bad)
  bad = _config()
  bad.model.encoder_mode = 'cached'
  with pytest.raises(ValueError, match='cached'):
    scst.check_config(bad)
