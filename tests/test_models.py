"""Model shapes, parameter counts, and the documented teacher-forcing layout."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from capjax.models import captioner
from capjax.models import resnet


def test_resnet50_shapes_and_parameter_count():
  model = resnet.ResNet()  # the defaults are ResNet50
  images = jnp.zeros((1, 224, 224, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, train=False))
  features = jax.eval_shape(lambda v: model.apply(v, images, train=False), variables)
  assert features.shape == (1, 7, 7, 2048)
  # torchvision resnet50 has 25,557,032 parameters; minus its fc layer (2048*1000+1000) = 23,508,032.
  assert sum(x.size for x in jax.tree.leaves(variables['params'])) == 23_508_032
  blocks = [k for k in variables['params'] if k.startswith('stage')]
  assert len(blocks) == 3 + 4 + 6 + 3
  # Stride sits on the 3x3 conv (v1.5) and each stage's first block has a projection shortcut.
  assert 'proj_conv' in variables['params']['stage2_block1']
  assert 'proj_conv' not in variables['params']['stage2_block2']


def _tiny(vocab_size=20, **kwargs):
  return captioner.Captioner(vocab_size=vocab_size, stage_sizes=(1, 1, 1, 1), width=4, embed_dim=16,
                             hidden_size=16, **kwargs)


def test_captioner_output_shapes():
  model = _tiny()
  images = jnp.zeros((3, 32, 32, 3), jnp.uint8)
  tokens = jnp.ones((3, 9), jnp.int32)
  variables = model.init(jax.random.PRNGKey(0), images, tokens, train=False)
  assert model.apply(variables, images, tokens, train=False).shape == (3, 9, 20)
  assert model.apply(variables, images, method=model.encode).shape == (3, 16)
  assert variables['params']['decoder']['embed']['embedding'].shape == (20, 16)


def test_teacher_forcing_matches_step_by_step_decoding():
  """logits[:, t] of the training graph == the t-th step of image -> <START> -> w1 -> ... feeding."""
  model = _tiny()
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 255, (2, 32, 32, 3)), jnp.uint8)
  tokens = jnp.asarray(rng.integers(1, 20, (2, 6)), jnp.int32)
  variables = model.init(jax.random.PRNGKey(1), images, tokens, train=False)
  full = model.apply(variables, images, tokens, train=False)
  carry = model.apply(variables, model.apply(variables, images, method=model.encode), method=model.start)
  for t in range(tokens.shape[1]):
    carry, logits = model.apply(variables, carry, tokens[:, t], method=model.step)
    np.testing.assert_allclose(logits, full[:, t], rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params():
  model = _tiny(dtype=jnp.bfloat16)
  images = jnp.zeros((2, 32, 32, 3), jnp.uint8)
  tokens = jnp.ones((2, 5), jnp.int32)
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.PRNGKey(0), images, tokens)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables['params']))
  logits = jax.jit(functools.partial(model.apply, train=False))(variables, images, tokens)
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))


def test_frozen_trunk_gets_no_gradient():
  model = _tiny(trunk_mode='frozen')
  images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3)), jnp.uint8)
  tokens = jnp.ones((4, 5), jnp.int32)
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.PRNGKey(0), images, tokens)

  def loss(params):
    logits, _ = model.apply({**variables, 'params': params}, images, tokens, train=True,
                            mutable=['batch_stats'])
    return jnp.mean(logits ** 2)

  grads = jax.jit(jax.grad(loss))(variables['params'])
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads['encoder']['trunk']))
  assert float(jnp.abs(grads['encoder']['projection']['kernel']).max()) > 0


def test_lstm_starts_with_forget_gate_bias_one():
  """So the image, read only at t=0, is not halved away at every step before training starts."""
  model = _tiny()
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3), jnp.uint8),
                         jnp.ones((1, 4), jnp.int32), train=False)
  bias = np.asarray(variables['params']['decoder']['lstm']['input']['bias']).reshape(4, 16)
  np.testing.assert_array_equal(bias[1], 1.0)  # gate order i, f, g, o
  np.testing.assert_array_equal(bias[[0, 2, 3]], 0.0)


def test_words_present_marks_each_images_caption_words_but_no_special_token():
  # Two images x two captions of decoder inputs (<START> w ... <END> <PAD>); ids 0-3 are special.
  tokens = jnp.asarray([[[1, 5, 6, 2, 0], [1, 7, 3, 2, 0]],
                        [[1, 5, 5, 5, 2], [1, 2, 0, 0, 0]]])
  present = np.asarray(captioner.words_present(tokens, 9))
  np.testing.assert_array_equal(present, [[0, 0, 0, 0, 0, 1, 1, 1, 0],
                                          [0, 0, 0, 0, 0, 1, 0, 0, 0]])


def test_word_presence_loss_is_sigmoid_cross_entropy_per_present_word():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 12)).astype(np.float32)
  tokens = rng.integers(0, 12, size=(3, 2, 7))
  present = np.zeros((3, 12))
  for image in range(3):
    for word in tokens[image].ravel():
      present[image, word] = 1.0 if word >= 4 else 0.0
  probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
  expected = -(present * np.log(probs) + (1 - present) * np.log(1 - probs))[:, 4:].sum() / present.sum()
  np.testing.assert_allclose(captioner.word_presence_loss(jnp.asarray(logits), jnp.asarray(tokens)),
                             expected, rtol=1e-5)


def test_word_loss_trains_the_encoder_through_a_head_that_decoding_never_uses():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 255, (4, 32, 32, 3)), jnp.uint8)
  tokens = jnp.asarray(rng.integers(1, 20, (4, 2, 6)), jnp.int32)
  plain, with_words = _tiny(), _tiny(word_loss_weight=2.0)
  # Jitted calls: a tiny ResNet compiles faster as one program than op by op.
  variables = jax.jit(functools.partial(with_words.init, train=False))(jax.random.PRNGKey(0), images, tokens)
  assert variables['params']['word_head']['kernel'].shape == (16, 20)
  # Without the head's parameters the two models are the same captioner: equal logits, no loss sown.
  shared = {**variables, 'params': {k: v for k, v in variables['params'].items() if k != 'word_head'}}
  evaluate = jax.jit(lambda model, v: model.apply(v, images, tokens, train=False, mutable=['losses']),
                     static_argnums=0)
  (logits, updates), (plain_logits, _) = evaluate(with_words, variables), evaluate(plain, shared)
  np.testing.assert_allclose(logits, plain_logits, rtol=1e-6)
  assert 'losses' not in updates or not updates['losses']

  def word_loss(params):
    _, updates = with_words.apply({**variables, 'params': params}, images, tokens, train=True,
                                  mutable=['batch_stats', 'losses'])
    return jnp.sum(updates['losses']['words'][0])

  loss, grads = jax.jit(jax.value_and_grad(word_loss))(variables['params'])
  image_vec = jax.jit(lambda v: with_words.apply(v, images, train=True, method=with_words.encode,
                                                 mutable=['batch_stats'])[0])(variables)
  word_logits = image_vec @ variables['params']['word_head']['kernel']
  word_logits += variables['params']['word_head']['bias']
  np.testing.assert_allclose(loss, 2.0 * captioner.word_presence_loss(word_logits, tokens), rtol=1e-5)
  assert float(jnp.abs(grads['encoder']['trunk']['stem_conv']['kernel']).max()) > 0
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads['decoder']))
