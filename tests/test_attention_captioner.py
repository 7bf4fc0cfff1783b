"""The attention captioner in the system: same contract as the seed for training, decoding, caching and
captioning; its maps and its penalty. (The decoder's own equations: tests/test_attention.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capjax import cli
from capjax import train
from capjax import decoding
from capjax import inference
from capjax import mesh as mesh_lib
from capjax import state as state_lib
from capjax import vocab as vocab_lib
from capjax.data import shapes
from capjax.models import captioner
from configs import tiny

VOCAB = 24


def _config(**model):
  config = tiny.get_config()
  config.model.decoder = 'attention'
  config.model.stage_sizes = (1, 1, 1)  # 2x2 grid at 32 px
  config.train.metrics_every_epochs = 0
  config.model.word_loss_weight = 0.0  # tests that want it set it
  for key, value in model.items():
    config.model[key] = value
  return config


def _model_and_variables(config, seed=0):
  model = captioner.build_captioner(config.model, VOCAB)
  variables = captioner.init_variables(model, jax.random.PRNGKey(seed), config.data.image_size,
                                       config.data.max_caption_len)
  # Non-trivial attention: the freshly initialised score vector is small, so scale it up.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x * 20 if 'score' in jax.tree_util.keystr(path) else x, variables['params'])
  return model, {**variables, 'params': params}


def _images(n, size=32, seed=0):
  return np.random.default_rng(seed).integers(0, 255, (n, size, size, 3)).astype(np.uint8)


def _tokens(n, length, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, VOCAB, (n, length)).astype(np.int32)
  tokens[:, 0] = vocab_lib.START_ID
  return tokens


def test_build_picks_the_decoder_and_refuses_unknown_names():
  assert isinstance(captioner.build_captioner(_config().model, VOCAB), captioner.AttentionCaptioner)
  config = _config()
  config.model.decoder = 'transformer'
  with pytest.raises(ValueError, match="config.model.decoder: expected one of"):
    captioner.build_captioner(config.model, VOCAB)


@pytest.mark.parametrize('grid', [0, 3])
def test_teacher_forced_logits_equal_step_by_step_decoding(grid):
  model, variables = _model_and_variables(_config(attention_grid=grid))
  images, tokens = _images(3), _tokens(3, 7)
  logits = model.apply(variables, images, tokens, train=False)
  encoded = model.apply(variables, images, method=model.encode)
  assert encoded.shape[1] == (grid * grid if grid else 4)
  context = model.apply(variables, encoded, method=model.prepare)
  carry = model.apply(variables, encoded, method=model.start)
  for t in range(tokens.shape[1]):
    carry, step_logits = model.apply(variables, carry, tokens[:, t], context, method=model.step)
    np.testing.assert_allclose(step_logits, logits[:, t], rtol=1e-4, atol=1e-5)


def test_k_captions_per_image_equal_the_image_repeated():
  """The shared pass: the grid is projected once per image and attended by its K captions."""
  model, variables = _model_and_variables(_config())
  images, tokens = _images(2), _tokens(6, 7).reshape(2, 3, 7)
  shared = model.apply(variables, images, tokens, train=False)
  repeated = model.apply(variables, np.repeat(images, 3, axis=0), tokens.reshape(6, 7), train=False)
  np.testing.assert_allclose(shared, repeated, rtol=1e-5, atol=1e-6)


def test_beam_of_one_is_greedy_and_the_maps_are_the_decoding_steps_attention():
  config = _config()
  model, variables = _model_and_variables(config)
  images = _images(4)
  greedy = inference.generate_tokens(model, variables, images, max_len=8)
  beam = inference.generate_from_encoded(
      model, variables, model.apply(variables, images, method=model.encode), max_len=8, beam_size=1)
  np.testing.assert_array_equal(greedy, beam)
  # The maps returned with a caption are the weights each word was generated with.
  tokens, alphas = inference.generate_with_attention(model, variables, images, max_len=8)
  np.testing.assert_array_equal(tokens, greedy)
  encoded = model.apply(variables, images, method=model.encode)
  context = model.apply(variables, encoded, method=model.prepare)
  carry = model.apply(variables, encoded, method=model.start)
  fed = jnp.full((4,), vocab_lib.START_ID, jnp.int32)
  for t in range(8):
    carry, _, alpha = model.apply(variables, carry, fed, context,
                                  method=lambda m, c, x, p: m.decoder.step_with_attention(c, x, p))
    np.testing.assert_allclose(alphas[:, t], alpha, rtol=1e-5, atol=1e-6)
    fed = tokens[:, t]
  np.testing.assert_allclose(np.sum(alphas, axis=-1), 1.0, rtol=1e-5)
  assert float(np.std(alphas)) > 1e-3  # the scaled score vector makes the maps non-uniform


def test_beam_search_reads_the_image_tensors_once_per_image():
  """The step closes over (B, G, ...) tensors; beams are (B * K) rows of the carry only."""
  config = _config()
  model, variables = _model_and_variables(config)
  encoded = model.apply(variables, _images(2), method=model.encode)
  context = model.apply(variables, encoded, method=model.prepare)
  carry = model.apply(variables, encoded, method=model.start)
  shapes_seen = []

  def step(c, t):
    shapes_seen.append(jax.tree.map(jnp.shape, context))
    return model.apply(variables, c, t, context, method=model.step)

  decoding.beam_search(step, carry, batch_size=2, beam_size=3, start_id=1, end_id=2, pad_id=0,
                       max_len=5)
  assert all(s.annotations[0] == 2 for s in shapes_seen)


def test_the_penalty_joins_the_loss_and_is_reported_apart():
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  batch = {'image': _images(4), 'tokens': np.concatenate(
      [_tokens(4, 6), np.full((4, 1), vocab_lib.END_ID), np.zeros((4, 5), np.int32)], axis=1)}
  losses = {}
  for regularizer in (0.0, 1.0):
    config = _config(attention_regularizer=regularizer, attention_dropout=0.0)
    model = captioner.build_captioner(config.model, VOCAB)
    tx = state_lib.make_optimizer(config.train, lambda _: 0.0, 'train')
    state = state_lib.create_train_state(model, tx, 0, 32, 12, mesh)
    step = state_lib.compile_train_step(state_lib.teacher_forced_logits(model), tx, mesh)
    _, metrics = step(state, mesh_lib.host_batch_to_global(batch, mesh))
    losses[regularizer] = metrics
  assert 'extra_loss' not in losses[0.0]
  # Cross-entropy is the same; the penalty is reported on its own: sum_i (1 - sum_t alpha)^2 with
  # 6 real steps over 4 cells is at least 4 * (1 - 6/4)^2 = 1 per caption, per token >= 1/6.
  np.testing.assert_allclose(losses[1.0]['loss'], losses[0.0]['loss'], rtol=1e-6)
  assert float(losses[1.0]['extra_loss']) >= 1 / 6 - 1e-6


def test_the_word_loss_reads_the_mean_annotation_and_joins_the_extra_loss():
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  batch = {'image': _images(4), 'tokens': np.stack([_tokens(4, 7)] * 2, axis=1)}  # 2 captions per image
  metrics = {}
  for weight in (0.0, 3.0):
    config = _config(attention_regularizer=0.0, attention_dropout=0.0, word_loss_weight=weight)
    model = captioner.build_captioner(config.model, VOCAB)
    tx = state_lib.make_optimizer(config.train, lambda _: 0.0, 'train')
    state = state_lib.create_train_state(model, tx, 0, 32, 8, mesh)
    step = state_lib.compile_train_step(state_lib.teacher_forced_logits(model), tx, mesh)
    _, metrics[weight] = step(state, mesh_lib.host_batch_to_global(batch, mesh))
  channels = state.params['encoder']['trunk']['stage3_block1']['conv3']['kernel'].shape[-1]
  assert state.params['word_head']['kernel'].shape == (channels, VOCAB)
  assert 'extra_loss' not in metrics[0.0]
  np.testing.assert_allclose(metrics[3.0]['loss'], metrics[0.0]['loss'], rtol=1e-6)
  assert float(metrics[3.0]['extra_loss']) > 0


def test_caption_api_returns_maps_that_sum_to_one_and_the_same_captions():
  config = _config()
  model, variables = _model_and_variables(config)
  vocab = vocab_lib.Vocabulary(['<PAD>', '<START>', '<END>', '<UNK>'] + [f'w{i}' for i in range(VOCAB - 4)])
  api = inference.ImageCaptioner(model, variables, vocab, 32, 8, mesh_lib.make_mesh(), beam_size=2)
  images = list(_images(3))
  plain = api.caption(images)
  with_maps = api.caption_with_attention(images)
  assert [r.caption for r in with_maps] == plain
  for result in with_maps:
    assert result.attention.shape == (len(result.words), 2, 2)
    np.testing.assert_allclose(result.attention.sum(axis=(1, 2)), 1.0, rtol=1e-5)
  # Decode options reach the API: with unigram blocking no word repeats.
  blocked = inference.ImageCaptioner(model, variables, vocab, 32, 8, mesh_lib.make_mesh(), beam_size=2,
                                     no_repeat_ngram=1).caption(images)
  assert all(len(set(c.split())) == len(c.split()) for c in blocked)
  seed_model = captioner.build_captioner(tiny.get_config().model, VOCAB)
  seed_variables = captioner.init_variables(seed_model, jax.random.PRNGKey(0), 32, 12)
  seed_api = inference.ImageCaptioner(seed_model, seed_variables, vocab, 32, 8, mesh_lib.make_mesh())
  with pytest.raises(ValueError, match='no attention'):
    seed_api.caption_with_attention(images)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A tiny attention model trained for one epoch, and its data."""
  base = tmp_path_factory.mktemp('attention')
  config = _config()
  config.data.data_dir = str(base / 'data')
  config.train.num_epochs = 1
  return config, str(base / 'workdir'), cli.train(config, str(base / 'workdir'))


def test_caption_mode_writes_one_attention_figure_per_image(trained, tmp_path, capsys):
  _, workdir, report = trained
  folder = tmp_path / 'maps'
  for i, row in enumerate(shapes.generate_records('test', 2, 48)):
    (tmp_path / f'{i}.png').write_bytes(row['image'])
  rows = cli.caption_images(workdir, str(tmp_path / '*.png'), attention_maps=str(folder))
  assert sorted(p.name for p in folder.iterdir()) == ['0.png', '1.png']
  assert all(row['attention_map'].startswith(str(folder)) for row in rows)
  assert report.evaluation.content is not None and report.evaluation.content.pointing is not None


def test_cached_attention_features_are_a_float16_grid_and_train_like_the_frozen_trunk(tmp_path):

  splits = {s: list(shapes.generate_records(s, n, 48))
            for s, n in [('train', 16), ('validation', 8), ('test', 8)]}
  losses = {}
  for mode in ('frozen', 'cached'):
    config = _config(encoder_mode=mode, attention_dropout=0.0)
    config.data.augment.enabled = False
    config.train.num_epochs = 1
    result = train.train_and_evaluate(config, str(tmp_path / mode), splits)
    losses[mode] = [result.step_losses[s] for s in sorted(result.step_losses)]
  features = np.load(tmp_path / 'cached' / 'features' / 'train.npy')
  assert features.dtype == np.float16 and features.shape[:2] == (16, 4)
  # float16 annotations against float32 ones: equal to the rounding of the cache.
  np.testing.assert_allclose(losses['cached'], losses['frozen'], rtol=2e-3)


def test_the_word_loss_read_cell_by_cell_takes_each_words_highest_cell():
  """word_loss_pooling='cells': a word's logit is its highest over the grid's cells (multiple-instance
  learning), checked against the head applied by hand; 'mean' reads the mean annotation."""
  images, tokens = _images(3), _tokens(3, 7)
  for pooling in ('cells', 'mean'):
    config = _config(word_loss_weight=2.0, word_loss_pooling=pooling, attention_regularizer=0.0)
    model, variables = _model_and_variables(config)
    _, sown = model.apply(variables, images, tokens, train=True, mutable=['losses', 'batch_stats'],
                          rngs={'dropout': jax.random.PRNGKey(1)})
    annotations, _ = model.apply(variables, images, train=True, method=model.encode,
                                 mutable=['batch_stats'])  # batch statistics, as in training
    head = variables['params']['word_head']
    cell_logits = np.einsum('ngc,cv->ngv', np.asarray(annotations), np.asarray(head['kernel'])) + head['bias']
    logits = cell_logits.max(axis=1) if pooling == 'cells' else (
        np.asarray(annotations).mean(axis=1) @ np.asarray(head['kernel']) + head['bias'])
    expected = 2.0 * captioner.word_presence_loss(jnp.asarray(logits), tokens)
    np.testing.assert_allclose(sown['losses']['words'][0], expected, rtol=1e-4)
  config = _config(word_loss_pooling='max')
  with pytest.raises(ValueError, match='config.model.word_loss_pooling'):
    captioner.build_captioner(config.model, VOCAB)
  config = _config(word_loss_pooling='cells', decoder='seed')
  with pytest.raises(ValueError, match="need config.model.decoder='attention'"):
    captioner.build_captioner(config.model, VOCAB)
