"""The captioners: a ResNet image encoder and an LSTM language decoder, in two designs.

`Captioner` is the seed (Show and Tell): the image is one pooled 256-d vector. `AttentionCaptioner`
(Show, Attend and Tell) keeps the trunk's spatial grid and attends over it at every word
(capjax/models/attention.py). `build_captioner` picks one from `config.model.decoder`.

Both expose the same methods, so training, decoding and evaluation never ask which one they run:
`__call__` (teacher forcing from images), `encode` (images -> what decoding starts from),
`cached_features`/`decode_from_features` (the 'cached' encoder mode), and the `capjax.decoding` step
contract as `prepare` (per-image tensors computed once, shared by every step and beam), `start` and
`step(carry, tokens, context)`.

The seed's sequence layout (Show and Tell, Vinyals et al. 2015). A caption is stored as token ids
`[<START>, w_1, ..., w_n, <END>, <PAD>, ...]`. The LSTM (zero initial state) reads

    position:  0          1              2              ...  n+1
    input:     image_vec  emb(<START>)   emb(w_1)       ...  emb(w_n)
    predicts:  (nothing)  w_1            w_2            ...  <END>

so the output at position t >= 1 is scored against token t of the caption; the output at the image
position is not scored. `decoder_inputs(tokens) = tokens[:, :-1]` and `decoder_targets = tokens[:, 1:]`.
Inference feeds the image, then `<START>`, then each predicted word.
"""

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from capjax import vocab as vocab_lib
from capjax.models import attention
from capjax.models import lstm as lstm_lib
from capjax.models import resnet

# ImageNet statistics (RGB, 0-255 scale), the normalisation torchvision/Keras ResNet50 weights expect.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

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

  def annotations(self, images, grid: int, *, train: bool):
    """The trunk's last feature map as G annotation vectors (N, G, C): resized to grid x grid cells when
    `grid` > 0 and the map is not already that size (bilinear; antialiased when it shrinks)."""
    features = self.trunk(normalize_images(images, self.dtype), train=train and self.trunk_mode == 'train')
    if self.trunk_mode == 'frozen':
      features = jax.lax.stop_gradient(features)
    n, height, width, channels = features.shape
    if grid and (height, width) != (grid, grid):
      features = jax.image.resize(features, (n, grid, grid, channels), 'linear').astype(self.dtype)
    return features.reshape(n, -1, channels)

  def pooled_trunk_features(self, images):
    """Inference-mode pooled trunk features (N, C), what the 'cached' encoder mode stores."""
    features = self.trunk(normalize_images(images, self.dtype), train=False)
    return jnp.mean(features, axis=(1, 2)).astype(jnp.float32)

  def project(self, pooled, *, train: bool):
    """Pooled trunk features (N, C) -> image vector (N, embed_dim)."""
    return self.projection_bn(self.projection(pooled.astype(self.dtype)),
                              use_running_average=not train)


class CaptionDecoder(nn.Module):
  """Embedding + LSTM + vocabulary projection; see the module docstring for the sequence layout."""

  vocab_size: int
  embed_dim: int = 256
  hidden_size: int = 256
  lstm_unroll: int = 1
  dtype: Any = jnp.float32

  def setup(self):
    self.embed = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype, name='embed')
    self.lstm = lstm_lib.LSTM(self.hidden_size, self.lstm_unroll, self.dtype, name='lstm')
    self.readout = nn.Dense(self.vocab_size, dtype=self.dtype, name='readout')

  def __call__(self, image_vec, input_tokens):
    """Teacher forcing: image_vec (N, D), input_tokens (N, T) -> logits (N, T, vocab), float32."""
    inputs = jnp.concatenate(
        [image_vec[:, None, :].astype(self.dtype), self.embed(input_tokens)], axis=1)
    _, hidden = self.lstm(self.lstm.zero_carry(image_vec.shape[0]), inputs)
    # One matmul for every position's vocabulary projection, after the recurrence.
    return self.readout(hidden[:, 1:]).astype(jnp.float32)

  def start(self, image_vec) -> lstm_lib.LSTMCarry:
    """The carry after the LSTM has read the image vector (its output is not used)."""
    carry, _ = self.lstm(self.lstm.zero_carry(image_vec.shape[0]),
                         image_vec[:, None, :].astype(self.dtype))
    return carry

  def step(self, carry: lstm_lib.LSTMCarry, tokens):
    """Feed one token per row: (carry, tokens (N,)) -> (carry, logits (N, vocab) float32)."""
    carry, hidden = self.lstm(carry, self.embed(tokens)[:, None, :])
    return carry, self.readout(hidden[:, 0]).astype(jnp.float32)


class Captioner(nn.Module):
  """The seed: encoder -> one image vector -> LSTM. `__call__` is the teacher-forced training graph.

  With `word_loss_weight` > 0, training adds an auxiliary loss on the image vector: a linear head
  predicts which vocabulary words the image's captions use (a multi-label "visual concepts" target,
  as in Fang et al. 2015 and Yao et al. 2017), sown into the 'losses' collection like the attention
  penalty. The caption loss alone reaches the encoder only through the LSTM, where words that the
  language model predicts without the image dominate the gradient; on the demo data the trunk then
  never learns shape (benchmarks/investigations/shape_learning.py). The head gives every image-dependent
  word a direct gradient; words every caption uses are learnt by its bias. Decoding does not use it.
  """

  has_attention: ClassVar[bool] = False

  vocab_size: int
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  embed_dim: int = 256
  hidden_size: int = 256
  lstm_unroll: int = 1
  trunk_mode: str = 'train'
  word_loss_weight: float = 0.0
  dtype: Any = jnp.float32

  def setup(self):
    self.encoder = ImageEncoder(self.stage_sizes, self.width, self.embed_dim, self.trunk_mode,
                                self.dtype, name='encoder')
    self.decoder = CaptionDecoder(self.vocab_size, self.embed_dim, self.hidden_size,
                                  self.lstm_unroll, self.dtype, name='decoder')
    if self.word_loss_weight:
      self.word_head = nn.Dense(self.vocab_size, dtype=self.dtype, name='word_head')

  def __call__(self, images, input_tokens, *, train: bool):
    """Teacher forcing. input_tokens (N, T) -> logits (N, T, vocab); or (N, K, T), K captions per
    image -> logits (N * K, T, vocab): the encoder runs once per image (BatchNorm statistics over the
    N images) and its vector is shared by the image's K captions."""
    return self._teacher_forced(self.encoder(images, train=train), input_tokens, train=train)

  def _teacher_forced(self, image_vec, input_tokens, *, train: bool):
    if self.word_loss_weight:
      sow_word_loss(self, image_vec, input_tokens, train=train)
    return self.decoder(*per_caption(image_vec, input_tokens))

  def encode(self, images, *, train: bool = False):
    return self.encoder(images, train=train)

  def cached_features(self, images):
    """What the 'cached' encoder mode stores per image: pooled trunk features (N, C) float32."""
    return self.encoder.pooled_trunk_features(images)

  def decode_from_features(self, pooled, input_tokens, *, train: bool):
    """Teacher forcing from cached pooled trunk features (the 'cached' encoder mode); tokens as in
    `__call__`."""
    return self._teacher_forced(self.encoder.project(pooled, train=train), input_tokens, train=train)

  def prepare(self, image_vec):
    """Per-image tensors for `step`: none (the image vector is already in the carry after `start`)."""
    del image_vec
    return ()

  def start(self, image_vec):
    return self.decoder.start(image_vec)

  def step(self, carry, tokens, context=()):
    del context
    return self.decoder.step(carry, tokens)


def sow_word_loss(module: nn.Module, image_features, input_tokens, *, train: bool):
  """The word-presence loss of `module.word_head` on per-image features (N, D), or on per-cell features
  (N, G, D) pooled by their highest logit per word (multiple-instance learning: a word is present when
  one cell shows it, as Fang et al. 2015 detect words in image regions), times `module.word_loss_weight`,
  sown as losses/words when training. Called at init too (train=False), so the head's parameters
  exist."""
  word_logits = module.word_head(image_features).astype(jnp.float32)
  if word_logits.ndim == 3:
    word_logits = jnp.max(word_logits, axis=1)
  if train:
    module.sow('losses', 'words', module.word_loss_weight * word_presence_loss(word_logits, input_tokens))


def words_present(input_tokens, vocab_size: int) -> jax.Array:
  """(N, T) or (N, K, T) decoder inputs -> (N, vocab) float32: 1.0 for each word some caption of the
  image uses; the special tokens (<PAD> <START> <END> <UNK>) are never targets."""
  tokens = input_tokens.reshape(input_tokens.shape[0], -1)
  present = jnp.zeros((tokens.shape[0], vocab_size), jnp.float32)
  present = present.at[jnp.arange(tokens.shape[0])[:, None], tokens].set(1.0)
  return present.at[:, :len(vocab_lib.SPECIALS)].set(0.0)


def word_presence_loss(word_logits, input_tokens) -> jax.Array:
  """Sigmoid cross-entropy of `word_logits` (N, vocab) against `words_present`, summed over the
  vocabulary and the batch and divided by the number of present words: nats per present word, a scale
  that does not grow with the vocabulary's size the way a sum per image would."""
  present = words_present(input_tokens, word_logits.shape[-1])
  losses = optax.sigmoid_binary_cross_entropy(word_logits, present)
  losses = losses.at[:, :len(vocab_lib.SPECIALS)].set(0.0)
  return jnp.sum(losses) / jnp.maximum(jnp.sum(present), 1.0)


def real_steps(input_tokens):
  """1.0 where the decoder's step predicts a real token: the input is neither `<PAD>` nor `<END>`."""
  return ((input_tokens != vocab_lib.PAD_ID) & (input_tokens != vocab_lib.END_ID)).astype(jnp.float32)


class AttentionCaptioner(nn.Module):
  """Show, Attend and Tell: the trunk's spatial grid (N, G, C) as annotation vectors, and the soft-
  attention LSTM decoder of capjax/models/attention.py. Same methods as `Captioner`.

  Training adds the doubly stochastic attention penalty, `regularizer * sum over captions of
  sum_i (1 - sum_t alpha_ti)^2`, divided by the number of real tokens (the paper's summed objective on
  the per-token scale of the cross-entropy). It is reported through flax's `sow` into the 'losses'
  collection, which the train step makes mutable and adds to the loss.
  """

  has_attention: ClassVar[bool] = True

  vocab_size: int
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  embed_dim: int = 256
  hidden_size: int = 256
  attention_dim: int = 256
  attention_grid: int = 0  # 0: the trunk's own grid (7x7 at 224 px)
  cell_positions: bool = False  # annotations carry their cells' positions (attention.AttentionDecoder)
  attention_query_word: bool = False  # the attention query reads the word just fed (the same)
  deep_output: bool = False  # the readout also reads the word fed and the context (the same)
  attention_location: bool = False  # scores also read each cell's previous weight and coverage (the same)
  dropout_rate: float = 0.5
  regularizer: float = 1.0
  lstm_unroll: int = 1
  trunk_mode: str = 'train'
  word_loss_weight: float = 0.0  # as `Captioner`'s; the head reads the mean annotation vector
  # 'mean': the word head reads the mean annotation; 'cells': it reads every cell and a word's logit is
  # its highest over the cells (so single cells must show the words: features that are local).
  word_loss_pooling: str = 'mean'
  dtype: Any = jnp.float32

  def setup(self):
    self.encoder = ImageEncoder(self.stage_sizes, self.width, self.embed_dim, self.trunk_mode,
                                self.dtype, name='encoder')
    self.decoder = attention.AttentionDecoder(
        self.vocab_size, self.embed_dim, self.hidden_size, self.attention_dim, self.dropout_rate,
        lstm_unroll=self.lstm_unroll, cell_positions=self.cell_positions,
        attention_query_word=self.attention_query_word, deep_output=self.deep_output,
        attention_location=self.attention_location, dtype=self.dtype, name='decoder')
    if self.word_loss_weight:
      self.word_head = nn.Dense(self.vocab_size, dtype=self.dtype, name='word_head')

  def __call__(self, images, input_tokens, *, train: bool):
    """Teacher forcing; tokens (N, T) or (N, K, T) as for `Captioner`: the grid is computed (and
    projected) once per image and attended by its K captions."""
    return self._teacher_forced(self.encode(images, train=train), input_tokens, train=train)

  def encode(self, images, *, train: bool = False):
    """Images -> annotations (N, G, C)."""
    return self.encoder.annotations(images, self.attention_grid, train=train)

  def cached_features(self, images):
    """What the 'cached' encoder mode stores per image: the annotation grid (N, G, C) in float16 (half
    the bytes of float32; ResNet features keep about 3 significant digits)."""
    return self.encode(images).astype(jnp.float16)

  def decode_from_features(self, annotations, input_tokens, *, train: bool):
    return self._teacher_forced(annotations, input_tokens, train=train)

  def _teacher_forced(self, annotations, input_tokens, *, train: bool):
    if self.word_loss_weight:
      cells = annotations if self.word_loss_pooling == 'cells' else jnp.mean(annotations, axis=1)
      sow_word_loss(self, cells, input_tokens, train=train)
    tokens = input_tokens.reshape(-1, input_tokens.shape[-1])
    logits, alphas = self.decoder(annotations, tokens, train=train)
    if train and self.regularizer:
      mask = real_steps(tokens)
      penalty = jnp.sum(attention.attention_regularizer(alphas, mask))
      self.sow('losses', 'attention', self.regularizer * penalty / jnp.maximum(jnp.sum(mask), 1.0))
    return logits

  def prepare(self, annotations):
    return self.decoder.prepare(annotations)

  def start(self, annotations):
    return self.decoder.start(annotations)

  def step(self, carry, tokens, context):
    return self.decoder.step(carry, tokens, context)

  def attention_weights(self, annotations, generated):
    """The attention each generated word was produced with: generated tokens (N, L) as decoding returns
    them (no `<START>`) -> alphas (N, L, G) float32. Teacher forcing on the model's own output
    recomputes exactly the decoding steps, for greedy, beam and sampled captions alike."""
    start = jnp.full((generated.shape[0], 1), vocab_lib.START_ID, generated.dtype)
    _, alphas = self.decoder(annotations, jnp.concatenate([start, generated[:, :-1]], axis=1),
                             train=False)
    return alphas


def per_caption(encoded, input_tokens):
  """(encoded images (N, ...), tokens (N, T)) unchanged; with tokens (N, K, T), each image's encoding
  repeated for its K captions and the tokens flattened to (N * K, T), rows image-major."""
  if input_tokens.ndim == 2:
    return encoded, input_tokens
  per_image = input_tokens.shape[1]
  return jnp.repeat(encoded, per_image, axis=0), input_tokens.reshape(-1, input_tokens.shape[-1])


ENCODER_MODES = ('train', 'frozen', 'cached')
DECODERS = ('seed', 'attention')


def build_captioner(model_config, vocab_size: int,
                    trunk_mode: str | None = None) -> Captioner | AttentionCaptioner:
  """Model from the `config.model` section; the only place that reads the config for the model.
  `trunk_mode` overrides what `encoder_mode` implies (the frozen warm-up phase of fine-tuning)."""
  dtypes = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
  if model_config.dtype not in dtypes:
    raise ValueError(f'config.model.dtype: expected one of {sorted(dtypes)}, got {model_config.dtype!r}')
  if model_config.encoder_mode not in ENCODER_MODES:
    raise ValueError(f'config.model.encoder_mode: expected one of {ENCODER_MODES}, '
                     f'got {model_config.encoder_mode!r}')
  decoder = model_config.get('decoder', 'seed')  # workdirs from before the attention decoder: seed
  if decoder not in DECODERS:
    raise ValueError(f'config.model.decoder: expected one of {DECODERS}, got {decoder!r}')
  if trunk_mode is None:
    trunk_mode = 'train' if model_config.encoder_mode == 'train' else 'frozen'
  word_loss_weight = model_config.get('word_loss_weight', 0.0)  # absent in older workdirs: off
  word_loss_pooling = model_config.get('word_loss_pooling', 'mean')  # absent in older workdirs
  if word_loss_pooling not in ('mean', 'cells'):
    raise ValueError(f"config.model.word_loss_pooling: expected 'mean' or 'cells', got {word_loss_pooling!r}")
  cell_positions = model_config.get('attention_cell_positions', False)  # absent in older workdirs
  query_word = model_config.get('attention_query_word', False)  # absent in older workdirs
  deep_output = model_config.get('attention_deep_output', False)  # absent in older workdirs
  location = model_config.get('attention_location', False)  # absent in older workdirs
  if decoder != 'attention' and (word_loss_pooling != 'mean' or cell_positions or query_word or deep_output
                                 or location):
    raise ValueError("config.model.word_loss_pooling='cells', attention_cell_positions, "
                     'attention_query_word, attention_deep_output and attention_location need '
                     "config.model.decoder='attention' (the seed decoder reads one pooled vector)")
  if decoder == 'attention':
    return AttentionCaptioner(
        vocab_size=vocab_size,
        stage_sizes=tuple(model_config.stage_sizes),
        width=model_config.width,
        embed_dim=model_config.embed_dim,
        hidden_size=model_config.hidden_size,
        attention_dim=model_config.attention_dim,
        attention_grid=model_config.attention_grid,
        cell_positions=cell_positions,
        attention_query_word=query_word,
        deep_output=deep_output,
        attention_location=location,
        dropout_rate=model_config.attention_dropout,
        regularizer=model_config.attention_regularizer,
        lstm_unroll=model_config.lstm_unroll,
        trunk_mode=trunk_mode,
        word_loss_weight=word_loss_weight,
        word_loss_pooling=word_loss_pooling,
        dtype=dtypes[model_config.dtype],
    )
  return Captioner(
      vocab_size=vocab_size,
      stage_sizes=tuple(model_config.stage_sizes),
      width=model_config.width,
      embed_dim=model_config.embed_dim,
      hidden_size=model_config.hidden_size,
      lstm_unroll=model_config.lstm_unroll,
      trunk_mode=trunk_mode,
      word_loss_weight=word_loss_weight,
      dtype=dtypes[model_config.dtype],
  )


def init_variables(model, rng, image_size: int, max_caption_len: int) -> dict:
  """Fresh {'params', 'batch_stats'} for square `image_size` images and captions of `max_caption_len`."""
  images = jnp.zeros((1, image_size, image_size, 3), jnp.uint8)
  tokens = jnp.zeros((1, max_caption_len - 1), jnp.int32)
  return model.init({'params': rng}, images, tokens, train=False)


def abstract_variables(model, image_size: int, max_caption_len: int) -> dict:
  """Shapes and dtypes of `init_variables` without computing anything (a restore target)."""
  return jax.eval_shape(
      lambda rng: init_variables(model, rng, image_size, max_caption_len), jax.random.PRNGKey(0))
