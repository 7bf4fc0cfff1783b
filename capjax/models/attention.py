"""Soft-attention LSTM decoder of Show, Attend and Tell (Xu et al., 2015, "deterministic" attention).

The decoder reads a grid of annotation vectors a_i (N, G, D) -- e.g. a ResNet50 7x7x2048 or 14x14 map
flattened to G cells -- instead of one pooled image vector. At every step t, with previous state h:

    e_ti  = w^T tanh(W_a a_i + b_a + W_h h)      scores over the G cells (`proj` = W_a a + b_a is per image)
    alpha = softmax_i(e_t)                       float32, sums to 1 over the grid
    z_t   = sum_i alpha_ti a_i                   context, D-dim
    beta  = sigmoid(w_b^T h + b_b)               gating scalar (paper section 4.2.1)
    (c, h) = LSTM([embed(y_{t-1}); beta z_t], (c, h))
    logits_t = W_o dropout(h) + b_o

with the initial state from the mean annotation: h_0 = tanh(W_h0 mean_i a_i + b), c_0 = tanh(W_c0 ... + b).

Sequence layout is the project's (see `capjax.models.captioner`): tokens
`[<START>, w_1, ..., w_n, <END>, <PAD>, ...]`, the decoder reads `input_tokens = tokens[:, :-1]` and
`logits[:, t]` predicts `tokens[:, t + 1]`. There is no image position: the image enters through the
initial state and the attention.

What the paper and its code (github.com/kelvinxu/arctic-captions, `capgen.py`, `evaluate_coco.py`) used,
and where this module differs:
- Features: VGG-19 conv5_4 before pooling, 14x14x512 (G=196, D=512), not fine-tuned. Here any (G, D).
- Sizes: `evaluate_coco.py`'s "soft attention on COCO" defaults are 512-d word embeddings, an 1800-unit
  LSTM, 10k words, dropout on, Adam, batch 64, regulariser weight 1. These come from the code; the paper
  text does not, as far as we know, state the embedding or LSTM sizes. Our defaults stay 256 like the seed.
- Output: logits = W_o h by default, as in the seed decoder; `deep_output` is the paper's "deep output",
  logits = L_o tanh(L_h h + L_e E y_{t-1} + L_z z) (its code's `prev2out`, `ctx2out`; the code's
  version, with the tanh, on the gated context, dropout before L_o).
- Initial state: the code puts one ReLU layer (with dropout) before the two tanh heads (`n_layers_init=2`)
  and its attention projection of the annotations is two layers (`n_layers_att=2`); both are one layer here.
- Attention score bias: the code has one (`c_tt`); softmax over cells ignores a shared shift, so it could
  only ever get a zero gradient and is left out. W_h has no bias for the same reason (b_a covers it).
- LSTM: the code's gate order is i, f, o, g with forget bias 0; here i, f, g, o (torch's) with forget
  bias 1, a float32 cell state, and `<START>`'s embedding as first input (the code feeds a zero vector).
- Dropout: the code uses non-inverted dropout (p=0.5, activations halved at test time); here inverted.
- Regulariser: the code sums alpha over every step, padding included; `attention_regularizer` masks it.
"""

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from capjax.models import lstm as lstm_lib

LSTMCarry = lstm_lib.LSTMCarry  # (c float32, h in the compute dtype)


class PreparedAnnotations(NamedTuple):
  """Per-image tensors computed once (`AttentionDecoder.prepare`) and shared by every step and beam.

  annotations: (B, G, D) in the compute dtype; projection: (B, G, A), W_a a + b_a.
  """
  annotations: jax.Array
  projection: jax.Array


def cell_positions(cells: int) -> jax.Array:
  """(cells, 2): the centre (x, y) of each cell of a square grid, row-major, in [-1, 1] (the annotations'
  order: a ResNet map flattened row by row)."""
  side = int(round(cells ** 0.5))
  if side * side != cells:
    raise ValueError(f'{cells} annotations are not a square grid')
  centres = (jnp.arange(side) + 0.5) / side * 2.0 - 1.0
  y, x = jnp.meshgrid(centres, centres, indexing='ij')
  return jnp.stack([x.reshape(-1), y.reshape(-1)], axis=-1)


def attention_regularizer(alphas: jax.Array, mask: jax.Array) -> jax.Array:
  """Doubly stochastic penalty sum_i (1 - sum_t mask_t alpha_ti)^2 per caption: (N, T, G), (N, T) -> (N,).

  Only real (mask 1) steps count, so padding cannot buy coverage. The caller multiplies by lambda and
  averages. The cells' coverages always add up to the number of real steps, so with G > T this does not
  reach 0: it pushes attention to spread over the whole image rather than dwell on a few cells.
  """
  alphas = alphas.astype(jnp.float32)
  coverage = jnp.sum(alphas * mask.astype(jnp.float32)[..., None], axis=1)
  return jnp.sum(jnp.square(1.0 - coverage), axis=-1)


class _AttentionStep(nn.Module):
  """One decoder step: attend with h_{t-1}, gate the context, advance the LSTM (gates i, f, g, o).

  `carry`/`embed_gates` have N = B * K rows and `prepared` has B: row r belongs to image r // K, the
  layout of `decoding.beam_search` (row b * K + k is beam k of image b). The image tensors are broadcast
  over the K rows by reshaping the rows to (B, K), never tiled: only the (B, K, G, A) attention energies
  are per row, and those are inherent to attention.
  """

  hidden_size: int
  attention_dim: int
  location_features: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, carry, word_inputs, prepared: PreparedAnnotations):
    """word_inputs: (embed_gates, word_query or None), the word just read's share of the gates and,
    when the decoder's `attention_query_word`, of the attention query. carry: (c, h), with
    `location_features` (c, h, previous alpha (N, G), coverage (N, G))."""
    embed_gates, word_query = word_inputs
    c, h = carry[:2]
    location = carry[2:] if self.location_features else None
    alpha, context = self._attend(h, prepared, word_query, location)
    beta = nn.sigmoid(nn.Dense(1, dtype=self.dtype, name='gate')(h))
    # The embedding's share of the gates (and the bias) comes in precomputed: only what depends on
    # h_{t-1} is computed inside the recurrence.
    gates = (embed_gates
             + nn.Dense(4 * self.hidden_size, use_bias=False, dtype=self.dtype,
                        name='context_gates')(beta * context)
             + nn.Dense(4 * self.hidden_size, use_bias=False, dtype=self.dtype, name='recurrent')(h))
    i, f, g, o = jnp.split(gates.astype(jnp.float32), 4, axis=-1)
    # Float32 cell state under bf16, as in the seed LSTM: it integrates over the whole caption.
    c = nn.sigmoid(f) * c + nn.sigmoid(i) * jnp.tanh(g)
    h = (nn.sigmoid(o) * jnp.tanh(c)).astype(self.dtype)
    new_carry = (c, h, alpha, location[1] + alpha) if self.location_features else (c, h)
    return new_carry, (h, alpha, beta * context)

  def _attend(self, h, prepared: PreparedAnnotations, word_query=None, location=None):
    """h (N, H) (and word_query (N, A) or None, location (previous alpha, coverage) (N, G) each or
    None) -> alpha (N, G) float32, context (N, D) in the compute dtype."""
    images, grid, features = prepared.annotations.shape
    rows = h.shape[0]
    if rows % images:
      raise ValueError(f'{rows} decoder rows do not split evenly over {images} images')
    per_image = rows // images
    query = nn.Dense(self.attention_dim, use_bias=False, dtype=self.dtype, name='hidden_proj')(h)
    if word_query is not None:
      query = query + word_query
    energy = prepared.projection[:, None] + query.reshape(images, per_image, 1, -1)
    if location is not None:  # each cell's own (previous weight, coverage): a per-row term (N, G, A)
      cell_history = jnp.stack(location, axis=-1).astype(self.dtype)
      energy = energy + nn.Dense(self.attention_dim, use_bias=False, dtype=self.dtype,
                                 name='location')(cell_history).reshape(images, per_image, grid, -1)
    energy = jnp.tanh(energy)
    scores = nn.Dense(1, use_bias=False, dtype=self.dtype, name='score')(energy)[..., 0]
    alpha = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)  # (B, K, G)
    context = jnp.einsum('bkg,bgd->bkd', alpha.astype(self.dtype), prepared.annotations)
    return alpha.reshape(rows, grid), context.reshape(rows, features)


class AttentionDecoder(nn.Module):
  """Show, Attend and Tell decoder over annotations (N, G, D); see the module docstring.

  Training: `__call__` (teacher forcing, one `nn.scan` over time). Decoding with `capjax.decoding`:
  `prepare` once per image, `start` for the initial carry, then `step` as the step function.
  """

  vocab_size: int
  embed_dim: int = 256
  hidden_size: int = 256
  attention_dim: int = 256
  dropout_rate: float = 0.5
  forget_bias: float = 1.0
  lstm_unroll: int = 1
  # Each annotation also carries its cell's centre (x, y in [-1, 1]): the context of a step then says
  # where the decoder looked, so a caption can say where what it names is (see `cell_positions`).
  cell_positions: bool = False
  # The attention's query also reads the word just fed (W_h h_{t-1} + W_e E y_{t-1}): after "a red" the
  # decoder can look for what is red before naming its shape. Without it the query is h_{t-1} alone, the
  # state from before that word was read (Show, Attend and Tell).
  attention_query_word: bool = False
  # Show, Attend and Tell's "deep output" (eq. 7; its code's prev2out and ctx2out):
  # logits = W_o dropout(tanh(L_h h_t + L_e E y_{t-1} + L_z z_t)), z_t the gated context of this step.
  # The word then reads what was looked at directly, not only through the LSTM's state; with
  # `cell_positions`, where it was ("on the left" from the attended cell's x). Off: logits = W_o h_t.
  deep_output: bool = False
  # Location-aware attention (Chorowski et al. 2015; coverage as Tu et al. 2016): each cell's score also
  # reads the weight it had at the previous word and its coverage, the weights summed over the words so
  # far. A caption can then stay on what it is describing ("a red square on the left": the position
  # word on the square) and move on to what it has not described yet ("and a blue circle").
  attention_location: bool = False
  dtype: Any = jnp.float32

  def setup(self):
    self.embed = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype, name='embed')
    self.init_h = nn.Dense(self.hidden_size, dtype=self.dtype, name='init_h')
    self.init_c = nn.Dense(self.hidden_size, dtype=self.dtype, name='init_c')
    self.annotation_proj = nn.Dense(self.attention_dim, dtype=self.dtype, name='annotation_proj')
    # Holds the LSTM's whole gate bias (torch: bias_ih + bias_hh); the seed LSTM's forget-bias init.
    forget_bias_init = lstm_lib.forget_gate_bias_init(self.forget_bias)
    self.embed_gates = nn.Dense(4 * self.hidden_size, dtype=self.dtype, name='embed_gates',
                                bias_init=forget_bias_init)
    if self.attention_query_word:
      self.word_query = nn.Dense(self.attention_dim, use_bias=False, dtype=self.dtype, name='word_query')
    self.cell = _AttentionStep(self.hidden_size, self.attention_dim, self.attention_location, self.dtype,
                               name='cell')
    self.dropout = nn.Dropout(self.dropout_rate)
    if self.deep_output:
      self.out_hidden = nn.Dense(self.embed_dim, dtype=self.dtype, name='out_hidden')
      self.out_word = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype, name='out_word')
      self.out_context = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype, name='out_context')
    self.readout = nn.Dense(self.vocab_size, dtype=self.dtype, name='readout')

  def __call__(self, annotations, input_tokens, *, train: bool):
    """Teacher forcing: annotations (B, G, D), input_tokens (N, T) with N = B * K (K captions per image,
    rows image-major: row r belongs to image r // K) -> (logits (N, T, vocab) float32, alphas (N, T, G)
    float32); logits[:, t] predicts the token after input_tokens[:, t]. The per-image work (annotation
    projection, initial state) is done once per image, not once per caption."""
    prepared = self.prepare(annotations)
    per_image = input_tokens.shape[0] // annotations.shape[0]
    carry = jax.tree.map(lambda x: jnp.repeat(x, per_image, axis=0), self.start(annotations))
    recurrence = nn.scan(
        lambda cell, carry, word_inputs, prepared: cell(carry, word_inputs, prepared),
        variable_broadcast='params', split_rngs={'params': False, 'dropout': True},
        in_axes=(1, nn.broadcast), out_axes=1, unroll=self.lstm_unroll)
    _, (hidden, alphas, contexts) = recurrence(self.cell, carry, self._word_inputs(input_tokens), prepared)
    # One matmul for every position's vocabulary projection, after the recurrence.
    return self._logits(hidden, input_tokens, contexts, train=train), alphas

  def _logits(self, hidden, tokens, contexts, *, train: bool):
    """The readout of states (..., H), with the deep output also of the tokens fed (...) and the gated
    contexts (..., D) -> logits (..., vocab) float32."""
    if self.deep_output:
      hidden = jnp.tanh(self.out_hidden(hidden) + self.out_word(self.embed(tokens))
                        + self.out_context(contexts))
    hidden = self.dropout(hidden, deterministic=not train)
    return self.readout(hidden).astype(jnp.float32)

  def _word_inputs(self, tokens):
    """What the recurrence needs of each token fed, computed for all positions at once (outside the
    scan): its share of the LSTM gates (with the gate bias), and of the attention query or None."""
    embedded = self.embed(tokens)
    return self.embed_gates(embedded), (self.word_query(embedded) if self.attention_query_word else None)

  def prepare(self, annotations) -> PreparedAnnotations:
    """What depends only on the image, computed once: cast annotations (with their cells' positions when
    `cell_positions`) and their projection W_a a + b_a."""
    annotations = annotations.astype(self.dtype)
    if self.cell_positions:
      positions = jnp.broadcast_to(cell_positions(annotations.shape[1]).astype(self.dtype),
                                   (annotations.shape[0], annotations.shape[1], 2))
      annotations = jnp.concatenate([annotations, positions], axis=-1)
    return PreparedAnnotations(annotations, self.annotation_proj(annotations))

  def start(self, annotations):
    """Initial (c float32, h compute dtype) from the mean annotation, with `attention_location` also
    the previous alpha and the coverage, zero (N, G) float32; the first token fed is <START>."""
    mean = jnp.mean(annotations.astype(jnp.float32), axis=1)
    c = jnp.tanh(self.init_c(mean)).astype(jnp.float32)
    h = jnp.tanh(self.init_h(mean)).astype(self.dtype)
    if self.attention_location:
      nothing_yet = jnp.zeros(annotations.shape[:2], jnp.float32)
      return c, h, nothing_yet, nothing_yet
    return c, h

  def step_with_attention(self, carry, tokens, prepared: PreparedAnnotations):
    """One token per row (N = B * K rows, row r of image r // K) -> (carry, logits (N, vocab) float32,
    alpha (N, G) float32). No dropout: decoding is inference."""
    carry, (hidden, alpha, context) = self.cell(carry, self._word_inputs(tokens), prepared)
    return carry, self._logits(hidden, tokens, context, train=False), alpha

  def step(self, carry, tokens, prepared: PreparedAnnotations):
    """The `capjax.decoding` step: (carry, tokens (N,)) -> (carry, logits (N, vocab) float32)."""
    carry, logits, _ = self.step_with_attention(carry, tokens, prepared)
    return carry, logits
