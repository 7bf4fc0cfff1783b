"""The seed captioner: ResNet image encoder -> 256-d vector -> LSTM language decoder.

Sequence layout (Show and Tell, Vinyals et al. 2015). A caption is stored as token ids
`[<START>, w_1, ..., w_n, <END>, <PAD>, ...]`. The LSTM (zero initial state) reads

    position:  0          1              2              ...  n+1
    input:     image_vec  emb(<START>)   emb(w_1)       ...  emb(w_n)
    predicts:  (nothing)  w_1            w_2            ...  <END>

so the output at position t >= 1 is scored against token t of the caption; the output at the image
position is not scored. `decoder_inputs(tokens) = tokens[:, :-1]` and `decoder_targets = tokens[:, 1:]`.
Inference feeds the image, then `<START>`, then each predicted word.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from capjax.models import resnet

# ImageNet statistics (RGB, 0-255 scale), the normalisation torchvision/Keras ResNet50 weights expect.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

LSTMCarry = tuple[jax.Array, jax.Array]  # (c, h)


def normalize_images(images: jax.Array, dtype) -> jax.Array:
  """uint8 RGB (N, H, W, 3) -> ImageNet-normalised floats. Done on device so hosts ship uint8."""
  images = images.astype(jnp.float32)
  images = (images - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
  return images.astype(dtype)


class ImageEncoder(nn.Module):
  """ResNet trunk -> global average pool -> Dense(embed_dim) -> BatchNorm."""

  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  embed_dim: int = 256
  # 'train': fine-tune everything; 'frozen': trunk gets no gradient and its BatchNorm uses running stats.
  trunk_mode: str = 'train'
  dtype: Any = jnp.float32

  def setup(self):
    self.trunk = resnet.ResNet(self.stage_sizes, self.width, dtype=self.dtype, name='trunk')
    self.projection = nn.Dense(self.embed_dim, dtype=self.dtype, name='projection')
    self.projection_bn = nn.BatchNorm(momentum=resnet.BN_MOMENTUM, epsilon=resnet.BN_EPSILON,
                                      dtype=self.dtype, name='projection_bn')

  def __call__(self, images, *, train: bool):
    trunk_train = train and self.trunk_mode == 'train'
    features = self.trunk(normalize_images(images, self.dtype), train=trunk_train)
    pooled = jnp.mean(features, axis=(1, 2))
    if self.trunk_mode == 'frozen':
      pooled = jax.lax.stop_gradient(pooled)
    return self.project(pooled, train=train)

  def pooled_trunk_features(self, images):
    """Inference-mode pooled trunk features (N, C), what the 'cached' encoder mode stores."""
    features = self.trunk(normalize_images(images, self.dtype), train=False)
    return jnp.mean(features, axis=(1, 2)).astype(jnp.float32)

  def project(self, pooled, *, train: bool):
    """Pooled trunk features (N, C) -> image vector (N, embed_dim)."""
    return self.projection_bn(self.projection(pooled.astype(self.dtype)),
                              use_running_average=not train)


class _RecurrentStep(nn.Module):
  """One LSTM step given the precomputed input projection; gate order i, f, g, o (as torch.nn.LSTM)."""

  hidden_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, carry: LSTMCarry, input_gates):
    c, h = carry
    gates = input_gates + nn.Dense(4 * self.hidden_size, use_bias=False, dtype=self.dtype,
                                   name='recurrent')(h)
    i, f, g, o = jnp.split(gates.astype(jnp.float32), 4, axis=-1)
    # The cell state stays float32 under bf16 compute: it integrates over the whole caption.
    c = nn.sigmoid(f) * c + nn.sigmoid(i) * jnp.tanh(g)
    h = (nn.sigmoid(o) * jnp.tanh(c)).astype(self.dtype)
    return (c, h), h


def _forget_gate_bias_init(value: float):
  """Gate biases (i, f, g, o): zeros, with `value` on the forget gate. A forget bias of 1 makes the
  cell keep what it read (here: the image, seen only at t=0) until it learns to let go; with 0 the
  cell halves its memory every step (Jozefowicz et al., 2015)."""
  def init(key, shape, dtype=jnp.float32):
    del key
    hidden = shape[0] // 4
    return jnp.zeros(shape, dtype).at[hidden:2 * hidden].set(value)
  return init


class LSTM(nn.Module):
  """LSTM over a whole sequence: the input projection of every step is one matmul outside the scan,
  so only the (hidden x 4 hidden) recurrent matmul is sequential."""

  hidden_size: int = 256
  unroll: int = 1
  dtype: Any = jnp.float32
  forget_bias: float = 1.0

  def setup(self):
    self.input_projection = nn.Dense(4 * self.hidden_size, dtype=self.dtype, name='input',
                                     bias_init=_forget_gate_bias_init(self.forget_bias))
    self.recurrence = nn.scan(
        _RecurrentStep, variable_broadcast='params', split_rngs={'params': False},
        in_axes=1, out_axes=1, unroll=self.unroll)(self.hidden_size, self.dtype, name='cell')

  def zero_carry(self, batch_size: int) -> LSTMCarry:
    return (jnp.zeros((batch_size, self.hidden_size), jnp.float32),
            jnp.zeros((batch_size, self.hidden_size), self.dtype))

  def __call__(self, carry: LSTMCarry, inputs):
    """inputs (N, T, D) -> (final carry, hidden states (N, T, hidden))."""
    return self.recurrence(carry, self.input_projection(inputs))


class CaptionDecoder(nn.Module):
  """Embedding + LSTM + vocabulary projection; see the module docstring for the sequence layout."""

  vocab_size: int
  embed_dim: int = 256
  hidden_size: int = 256
  lstm_unroll: int = 1
  dtype: Any = jnp.float32

  def setup(self):
    self.embed = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype, name='embed')
    self.lstm = LSTM(self.hidden_size, self.lstm_unroll, self.dtype, name='lstm')
    self.readout = nn.Dense(self.vocab_size, dtype=self.dtype, name='readout')

  def __call__(self, image_vec, input_tokens):
    """Teacher forcing: image_vec (N, D), input_tokens (N, T) -> logits (N, T, vocab), float32."""
    inputs = jnp.concatenate(
        [image_vec[:, None, :].astype(self.dtype), self.embed(input_tokens)], axis=1)
    _, hidden = self.lstm(self.lstm.zero_carry(image_vec.shape[0]), inputs)
    # One matmul for every position's vocabulary projection, after the recurrence.
    return self.readout(hidden[:, 1:]).astype(jnp.float32)

  def start(self, image_vec) -> LSTMCarry:
    """The carry after the LSTM has read the image vector (its output is not used)."""
    carry, _ = self.lstm(self.lstm.zero_carry(image_vec.shape[0]),
                         image_vec[:, None, :].astype(self.dtype))
    return carry

  def step(self, carry: LSTMCarry, tokens):
    """Feed one token per row: (carry, tokens (N,)) -> (carry, logits (N, vocab) float32)."""
    carry, hidden = self.lstm(carry, self.embed(tokens)[:, None, :])
    return carry, self.readout(hidden[:, 0]).astype(jnp.float32)


class Captioner(nn.Module):
  """Encoder + decoder. `__call__` is the teacher-forced training graph."""

  vocab_size: int
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  embed_dim: int = 256
  hidden_size: int = 256
  lstm_unroll: int = 1
  trunk_mode: str = 'train'
  dtype: Any = jnp.float32

  def setup(self):
    self.encoder = ImageEncoder(self.stage_sizes, self.width, self.embed_dim, self.trunk_mode,
                                self.dtype, name='encoder')
    self.decoder = CaptionDecoder(self.vocab_size, self.embed_dim, self.hidden_size,
                                  self.lstm_unroll, self.dtype, name='decoder')

  def __call__(self, images, input_tokens, *, train: bool):
    """Teacher forcing. input_tokens (N, T) -> logits (N, T, vocab); or (N, K, T), K captions per
    image -> logits (N * K, T, vocab): the encoder runs once per image (BatchNorm statistics over the
    N images) and its vector is shared by the image's K captions."""
    return self.decoder(*per_caption(self.encoder(images, train=train), input_tokens))

  def encode(self, images, *, train: bool = False):
    return self.encoder(images, train=train)

  def pooled_trunk_features(self, images):
    return self.encoder.pooled_trunk_features(images)

  def decode_from_features(self, pooled, input_tokens, *, train: bool):
    """Teacher forcing from cached pooled trunk features (the 'cached' encoder mode); tokens as in
    `__call__`."""
    return self.decoder(*per_caption(self.encoder.project(pooled, train=train), input_tokens))

  def start(self, image_vec):
    return self.decoder.start(image_vec)

  def step(self, carry, tokens):
    return self.decoder.step(carry, tokens)


def per_caption(encoded, input_tokens):
  """(encoded images (N, ...), tokens (N, T)) unchanged; with tokens (N, K, T), each image's encoding
  repeated for its K captions and the tokens flattened to (N * K, T), rows image-major."""
  if input_tokens.ndim == 2:
    return encoded, input_tokens
  per_image = input_tokens.shape[1]
  return jnp.repeat(encoded, per_image, axis=0), input_tokens.reshape(-1, input_tokens.shape[-1])


ENCODER_MODES = ('train', 'frozen', 'cached')


def build_captioner(model_config, vocab_size: int, trunk_mode: str | None = None) -> Captioner:
  """Model from the `config.model` section; the only place that reads the config for the model.
  `trunk_mode` overrides what `encoder_mode` implies (the frozen warm-up phase of fine-tuning)."""
  dtypes = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
  if model_config.dtype not in dtypes:
    raise ValueError(f'config.model.dtype: expected one of {sorted(dtypes)}, got {model_config.dtype!r}')
  if model_config.encoder_mode not in ENCODER_MODES:
    raise ValueError(f'config.model.encoder_mode: expected one of {ENCODER_MODES}, '
                     f'got {model_config.encoder_mode!r}')
  if trunk_mode is None:
    trunk_mode = 'train' if model_config.encoder_mode == 'train' else 'frozen'
  return Captioner(
      vocab_size=vocab_size,
      stage_sizes=tuple(model_config.stage_sizes),
      width=model_config.width,
      embed_dim=model_config.embed_dim,
      hidden_size=model_config.hidden_size,
      lstm_unroll=model_config.lstm_unroll,
      trunk_mode=trunk_mode,
      dtype=dtypes[model_config.dtype],
  )


def init_variables(model: Captioner, rng, image_size: int, max_caption_len: int) -> dict:
  """Fresh {'params', 'batch_stats'} for square `image_size` images and captions of `max_caption_len`."""
  images = jnp.zeros((1, image_size, image_size, 3), jnp.uint8)
  tokens = jnp.zeros((1, max_caption_len - 1), jnp.int32)
  return model.init({'params': rng}, images, tokens, train=False)


def abstract_variables(model: Captioner, image_size: int, max_caption_len: int) -> dict:
  """Shapes and dtypes of `init_variables` without computing anything (a restore target)."""
  return jax.eval_shape(
      lambda rng: init_variables(model, rng, image_size, max_caption_len), jax.random.PRNGKey(0))
