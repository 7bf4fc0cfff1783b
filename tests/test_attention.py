"""Show, Attend and Tell decoder: teacher forcing vs stepping, the per-image broadcast over beam rows,
parity with an independent PyTorch implementation, the regulariser, bf16, and jitted decoding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch

from capjax import decoding
from capjax.models import attention

VOCAB, EMBED, HIDDEN, ATTENTION, GRID, FEATURES = 20, 10, 12, 8, 9, 16  # distinct, to catch transposes
PAD, START, END = 0, 1, 2


def _model(**kwargs):
  return attention.AttentionDecoder(vocab_size=VOCAB, embed_dim=EMBED, hidden_size=HIDDEN,
                                    attention_dim=ATTENTION, **kwargs)


def _captions(rng, batch, length):
  """Project layout [<START>, w_1..w_n, <END>, <PAD>...], rows of different lengths."""
  tokens = np.full((batch, length), PAD, np.int32)
  for row in range(batch):
    n = rng.integers(1, length - 1)
    tokens[row, 0] = START
    tokens[row, 1:n + 1] = rng.integers(3, VOCAB, n)
    tokens[row, n + 1] = END
  return jnp.asarray(tokens)


def _setup(seed=0, batch=3, length=7, **kwargs):
  """Model, variables with every param random (non-zero biases, non-uniform attention), inputs."""
  rng = np.random.default_rng(seed)
  annotations = jnp.asarray(rng.standard_normal((batch, GRID, FEATURES)), jnp.float32)
  tokens = _captions(rng, batch, length)
  model = _model(**kwargs)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(seed),
                          annotations, tokens[:, :-1])
  params = jax.tree.map(lambda x: jnp.asarray(0.4 * rng.standard_normal(x.shape), x.dtype),
                        shapes['params'])
  return model, {'params': params}, annotations, tokens


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(model, method, variables, *args):
  """`model.apply(variables, *args, method=method)` (method None: `__call__` with train=False), compiled:
  op-by-op dispatch of the unjitted module is what would make these tests slow."""
  if method is None:
    return model.apply(variables, *args, train=False)
  return model.apply(variables, *args, method=getattr(model, method))


def _step_through(model, variables, annotations, input_tokens):
  """Feed input_tokens one step at a time: (logits (N, T, V), alphas (N, T, G))."""
  prepared = _apply(model, 'prepare', variables, annotations)
  carry = _apply(model, 'start', variables, annotations)
  logits, alphas = [], []
  for t in range(input_tokens.shape[1]):
    carry, step_logits, alpha = _apply(model, 'step_with_attention', variables, carry, input_tokens[:, t],
                                       prepared)
    logits.append(step_logits)
    alphas.append(alpha)
  return jnp.stack(logits, axis=1), jnp.stack(alphas, axis=1)


def _teacher_forced_as_stepped(model, variables, annotations, inputs):
  """The teacher-forced (logits, alphas) of `inputs`, checked equal to feeding them one step at a time."""
  logits, alphas = _apply(model, None, variables, annotations, inputs)
  step_logits, step_alphas = _step_through(model, variables, annotations, inputs)
  np.testing.assert_allclose(logits, step_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(alphas, step_alphas, rtol=1e-5, atol=1e-5)
  return logits, alphas


def test_teacher_forcing_matches_step_by_step_decoding():
  model, variables, annotations, tokens = _setup()
  inputs = tokens[:, :-1]
  logits, alphas = _apply(model, None, variables, annotations, inputs)
  assert logits.shape == (3, 6, VOCAB) and alphas.shape == (3, 6, GRID)
  assert logits.dtype == alphas.dtype == jnp.float32
  step_logits, step_alphas = _step_through(model, variables, annotations, inputs)
  np.testing.assert_allclose(step_logits, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(step_alphas, alphas, rtol=1e-5, atol=1e-6)


def test_attention_weights_are_a_distribution_over_the_grid():
  model, variables, annotations, tokens = _setup(seed=1)
  _, alphas = _apply(model, None, variables, annotations, tokens[:, :-1])
  assert np.all(np.asarray(alphas) >= 0)
  np.testing.assert_allclose(np.sum(alphas, axis=-1), 1.0, atol=1e-6)
  # Not uniform: the attention actually depends on the image and the state.
  assert np.max(np.abs(np.asarray(alphas) - 1 / GRID)) > 0.05


def test_dropout_only_in_training():
  model, variables, annotations, tokens = _setup(seed=2)
  inputs = tokens[:, :-1]
  evaluation, _ = _apply(model, None, variables, annotations, inputs)
  apply_train = jax.jit(lambda seed: model.apply(variables, annotations, inputs, train=True,
                                                 rngs={'dropout': jax.random.PRNGKey(seed)})[0])
  np.testing.assert_array_equal(apply_train(0), apply_train(0))
  assert not np.allclose(apply_train(0), evaluation) and not np.allclose(apply_train(0), apply_train(1))


def test_beam_rows_share_their_image_without_tiling():
  """A step with B images and K rows per image (row r -> image r // K) == the step on annotations tiled
  K times, and the step never materialises per-row annotations or projections."""
  batch, beams = 2, 3
  model, variables, annotations, _ = _setup(seed=3, batch=batch)
  tiled_annotations = jnp.repeat(annotations, beams, axis=0)
  prepared = _apply(model, 'prepare', variables, annotations)
  tiled = _apply(model, 'prepare', variables, tiled_annotations)
  carry = _apply(model, 'start', variables, tiled_annotations)
  tiled_carry = carry
  rng = np.random.default_rng(3)
  for _ in range(3):  # different tokens per row, so the K rows of one image diverge
    tokens = jnp.asarray(rng.integers(3, VOCAB, batch * beams), jnp.int32)
    carry, logits, alpha = _apply(model, 'step_with_attention', variables, carry, tokens, prepared)
    tiled_carry, tiled_logits, tiled_alpha = _apply(model, 'step_with_attention', variables, tiled_carry,
                                                    tokens, tiled)
    np.testing.assert_allclose(logits, tiled_logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(alpha, tiled_alpha, rtol=1e-5, atol=1e-7)
    for ours, reference in zip(carry, tiled_carry):
      np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)

  step = lambda c, t: model.apply(variables, c, t, prepared, method=model.step)
  jaxpr = jax.make_jaxpr(step)(carry, tokens)
  shapes = {tuple(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars}
  rows = batch * beams
  for per_row in [(rows, GRID, FEATURES), (batch, beams, GRID, FEATURES), (rows, GRID, ATTENTION)]:
    assert per_row not in shapes, per_row


class _TorchAttentionDecoder(torch.nn.Module):
  """The same equations, written independently with torch layers and a Python loop over time."""

  def __init__(self):
    super().__init__()
    self.embed = torch.nn.Embedding(VOCAB, EMBED)
    self.init_h = torch.nn.Linear(FEATURES, HIDDEN)
    self.init_c = torch.nn.Linear(FEATURES, HIDDEN)
    self.annotation_proj = torch.nn.Linear(FEATURES, ATTENTION)
    self.hidden_proj = torch.nn.Linear(HIDDEN, ATTENTION, bias=False)
    self.score = torch.nn.Linear(ATTENTION, 1)  # Its bias is left random: softmax must ignore it.
    self.gate = torch.nn.Linear(HIDDEN, 1)
    self.lstm = torch.nn.LSTMCell(EMBED + FEATURES, HIDDEN)
    self.readout = torch.nn.Linear(HIDDEN, VOCAB)

  def forward(self, annotations, input_tokens):
    mean = annotations.mean(dim=1)
    h, c = torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))
    projection = self.annotation_proj(annotations)
    logits, alphas = [], []
    for t in range(input_tokens.shape[1]):
      scores = self.score(torch.tanh(projection + self.hidden_proj(h)[:, None, :]))[..., 0]
      alpha = torch.softmax(scores, dim=1)
      context = (alpha[:, :, None] * annotations).sum(dim=1)
      beta = torch.sigmoid(self.gate(h))
      h, c = self.lstm(torch.cat([self.embed(input_tokens[:, t]), beta * context], dim=1), (h, c))
      logits.append(self.readout(h))
      alphas.append(alpha)
    return torch.stack(logits, dim=1), torch.stack(alphas, dim=1)


def _torch_copy(params):
  """Flax params -> the torch module. torch Linear/LSTMCell weights are (out, in); LSTMCell has two
  biases that are summed, so ours is split between them at random."""
  t = lambda x: torch.from_numpy(np.array(x, np.float32))
  reference = _TorchAttentionDecoder()
  cell = params['cell']
  gates_bias = np.asarray(params['embed_gates']['bias'])
  share = np.random.default_rng(4).standard_normal(gates_bias.shape).astype(np.float32)
  with torch.no_grad():
    reference.embed.weight.copy_(t(params['embed']['embedding']))
    for name in ['init_h', 'init_c', 'annotation_proj', 'readout']:
      getattr(reference, name).weight.copy_(t(params[name]['kernel']).T)
      getattr(reference, name).bias.copy_(t(params[name]['bias']))
    reference.hidden_proj.weight.copy_(t(cell['hidden_proj']['kernel']).T)
    reference.score.weight.copy_(t(cell['score']['kernel']).T)
    reference.gate.weight.copy_(t(cell['gate']['kernel']).T)
    reference.gate.bias.copy_(t(cell['gate']['bias']))
    # LSTM input is [embedding; beta * context]: stack the two input kernels in that order.
    weight_ih = np.concatenate([params['embed_gates']['kernel'], cell['context_gates']['kernel']])
    reference.lstm.weight_ih.copy_(t(weight_ih).T)
    reference.lstm.weight_hh.copy_(t(cell['recurrent']['kernel']).T)
    reference.lstm.bias_ih.copy_(t(gates_bias - share))
    reference.lstm.bias_hh.copy_(t(share))
  return reference


def test_param_tree_and_parity_with_torch():
  torch.manual_seed(0)
  model, variables, annotations, tokens = _setup(seed=4)
  expected = {
      'embed': {'embedding': (VOCAB, EMBED)},
      'init_h': {'kernel': (FEATURES, HIDDEN), 'bias': (HIDDEN,)},
      'init_c': {'kernel': (FEATURES, HIDDEN), 'bias': (HIDDEN,)},
      'annotation_proj': {'kernel': (FEATURES, ATTENTION), 'bias': (ATTENTION,)},
      'embed_gates': {'kernel': (EMBED, 4 * HIDDEN), 'bias': (4 * HIDDEN,)},
      'cell': {'hidden_proj': {'kernel': (HIDDEN, ATTENTION)},
               'score': {'kernel': (ATTENTION, 1)},
               'gate': {'kernel': (HIDDEN, 1), 'bias': (1,)},
               'context_gates': {'kernel': (FEATURES, 4 * HIDDEN)},
               'recurrent': {'kernel': (HIDDEN, 4 * HIDDEN)}},
      'readout': {'kernel': (HIDDEN, VOCAB), 'bias': (VOCAB,)},
  }
  assert jax.tree.map(np.shape, variables['params']) == expected

  inputs = tokens[:, :-1]
  with jax.default_matmul_precision('highest'):
    logits, alphas = _apply(model, None, variables, annotations, inputs)
  with torch.no_grad():
    torch_logits, torch_alphas = _torch_copy(variables['params'])(
        torch.from_numpy(np.array(annotations)), torch.from_numpy(np.array(inputs)).long())
  for what, ours, reference in [('logits', logits, torch_logits), ('alphas', alphas, torch_alphas)]:
    error = np.max(np.abs(np.asarray(ours) - reference.numpy()))
    print(f'attention decoder {what}: max abs error {error:.3g}')
    assert error <= 1e-5, (what, error)


def test_forget_gate_bias_starts_at_one():
  model = _model()
  # Compiled, keeping only the bias: XLA then drops the rest of the init (eager init is slow).
  init_bias = jax.jit(lambda key: model.init(key, jnp.zeros((1, GRID, FEATURES)), jnp.ones((1, 2), jnp.int32),
                                             train=False)['params']['embed_gates']['bias'])
  bias = np.asarray(init_bias(jax.random.PRNGKey(0)))
  np.testing.assert_array_equal(bias, np.repeat([0.0, 1.0, 0.0, 0.0], HIDDEN))


def test_attention_regularizer_by_hand():
  alphas = jnp.asarray([[[0.25, 0.75], [0.5, 0.5], [0.9, 0.1]],
                        [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]], jnp.float32)
  mask = jnp.asarray([[1, 1, 0], [1, 1, 1]])
  # Row 0, pad step ignored: coverage (0.75, 1.25) -> 0.25^2 + 0.25^2. Row 1: (2, 1) -> 1.
  np.testing.assert_allclose(attention.attention_regularizer(alphas, mask), [0.125, 1.0], rtol=1e-6)
  moved = alphas.at[0, 2].set(jnp.asarray([0.0, 1.0]))
  np.testing.assert_allclose(attention.attention_regularizer(moved, mask.astype(bool)), [0.125, 1.0],
                             rtol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  model, variables, annotations, tokens = _setup(seed=5)
  bf16 = _model(dtype=jnp.bfloat16)
  fresh = jax.eval_shape(functools.partial(bf16.init, train=False), jax.random.PRNGKey(0), annotations,
                         tokens[:, :-1])
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(fresh['params']))

  logits, alphas = _apply(model, None, variables, annotations, tokens[:, :-1])
  bf16_logits, bf16_alphas = _apply(bf16, None, variables, annotations, tokens[:, :-1])
  assert bf16_logits.dtype == bf16_alphas.dtype == jnp.float32
  np.testing.assert_allclose(bf16_logits, logits, atol=0.1 * float(np.max(np.abs(logits))))
  np.testing.assert_allclose(bf16_alphas, alphas, atol=0.05)
  np.testing.assert_allclose(np.sum(bf16_alphas, axis=-1), 1.0, atol=1e-5)

  # A step keeps the carry's dtypes (c float32, h bf16): decoding's while_loop needs that.
  prepared = _apply(bf16, 'prepare', variables, annotations)
  carry = _apply(bf16, 'start', variables, annotations)
  new_carry, step_logits = _apply(bf16, 'step', variables, carry, tokens[:, 0], prepared)
  assert [x.dtype for x in carry] == [x.dtype for x in new_carry] == [jnp.float32, jnp.bfloat16]
  assert step_logits.dtype == jnp.float32


@functools.partial(jax.jit, static_argnames=('model',))
def _decode(model, variables, annotations):
  """Greedy, beam 1 and beam 3, with the image tensors prepared once, outside the decoding loops."""
  prepared = model.apply(variables, annotations, method=model.prepare)
  carry = model.apply(variables, annotations, method=model.start)
  step_fn = lambda c, t: model.apply(variables, c, t, prepared, method=model.step)
  args = dict(batch_size=annotations.shape[0], start_id=START, end_id=END, pad_id=PAD, max_len=8)
  greedy = decoding.greedy_decode(step_fn, carry, **args)
  beam_1 = decoding.beam_search(step_fn, carry, beam_size=1, **args)
  beams = decoding.beam_search(step_fn, carry, beam_size=3, **args)
  best = beams.tokens[:, 0]
  return greedy, beam_1, beams, best, decoding.sequence_log_prob(step_fn, carry, best, END, start_id=START)


def test_jitted_greedy_and_beam_search():
  model, variables, annotations, _ = _setup(seed=6, batch=3)
  greedy, beam_1, beams, best, best_log_prob = _decode(model, variables, annotations)
  np.testing.assert_array_equal(beam_1.tokens[:, 0], greedy)
  assert beams.tokens.shape == (3, 3, 8)
  assert np.all(np.diff(np.asarray(beams.scores), axis=1) <= 0)
  assert len({tuple(row) for row in np.asarray(beams.tokens).reshape(-1, 8)}) > 3  # beams differ
  # The beam's score of its best caption == that caption re-scored by teacher-forced stepping.
  np.testing.assert_allclose(beams.log_probs[:, 0], best_log_prob, rtol=1e-5, atol=1e-5)
  assert best.shape == (3, 8)


def test_cell_positions_are_the_cell_centres_row_by_row_and_join_the_annotations():
  np.testing.assert_allclose(attention.cell_positions(4),
                             [[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]])
  assert np.asarray(attention.cell_positions(16))[6].tolist() == [0.25, -0.25]  # row 1, column 2
  with np.testing.assert_raises_regex(ValueError, 'not a square grid'):
    attention.cell_positions(6)
  model, variables, annotations, tokens = _setup(cell_positions=True)
  prepared = _apply(model, 'prepare', variables, annotations)
  assert prepared.annotations.shape == (*annotations.shape[:2], FEATURES + 2)
  np.testing.assert_allclose(prepared.annotations[..., :FEATURES], annotations)
  np.testing.assert_allclose(prepared.annotations[1, :, FEATURES:], attention.cell_positions(GRID))
  # Teacher forcing still equals stepping with the positions in.
  logits, alphas = _teacher_forced_as_stepped(model, variables, annotations, tokens[:, :-1])


def test_a_query_that_reads_the_word_steps_like_teacher_forcing_and_starts_where_the_paper_does():
  """attention_query_word: teacher forcing equals stepping; with W_e at zero it is the paper's decoder."""
  model, variables, annotations, tokens = _setup(attention_query_word=True)
  assert variables['params']['word_query']['kernel'].shape == (EMBED, ATTENTION)
  logits, alphas = _teacher_forced_as_stepped(model, variables, annotations, tokens[:, :-1])
  plain = _model()
  plain_params = {k: v for k, v in variables['params'].items() if k != 'word_query'}
  zeroed = {**variables['params'], 'word_query': {'kernel': jnp.zeros((EMBED, ATTENTION))}}
  np.testing.assert_allclose(_apply(model, None, {'params': zeroed}, annotations, tokens[:, :-1])[1],
                             _apply(plain, None, {'params': plain_params}, annotations, tokens[:, :-1])[1],
                             rtol=1e-6, atol=1e-6)
  # The word read moves the attention: the same state, two different words, two different maps.
  other_word = tokens[:, :-1].at[:, 1].set((tokens[:, 1] + 1) % VOCAB)
  assert not np.allclose(alphas[:, 1], _apply(model, None, variables, annotations, other_word)[1][:, 1])


def test_the_deep_output_reads_the_state_the_word_fed_and_the_gated_context():
  """attention_deep_output: teacher forcing equals stepping, and the logits are the paper's
  L_o tanh(L_h h + L_e E y_{t-1} + L_z beta z) computed by hand from the step's own state and context."""
  model, variables, annotations, tokens = _setup(deep_output=True, cell_positions=True)
  params = variables['params']
  assert params['out_context']['kernel'].shape == (FEATURES + 2, EMBED)
  inputs = tokens[:, :-1]
  logits, alphas = _teacher_forced_as_stepped(model, variables, annotations, inputs)

  # By hand at step 2, from the carry after two steps and the gate of that state.
  prepared = _apply(model, 'prepare', variables, annotations)
  carry = _apply(model, 'start', variables, annotations)
  for t in range(2):
    carry, _, _ = _apply(model, 'step_with_attention', variables, carry, inputs[:, t], prepared)
  h_before = carry[1]
  carry, _, alpha = _apply(model, 'step_with_attention', variables, carry, inputs[:, 2], prepared)
  gate = jax.nn.sigmoid(h_before @ params['cell']['gate']['kernel'] + params['cell']['gate']['bias'])
  context = gate * jnp.einsum('ng,ngd->nd', alpha, prepared.annotations)
  word = params['embed']['embedding'][inputs[:, 2]]
  deep = jnp.tanh(carry[1] @ params['out_hidden']['kernel'] + params['out_hidden']['bias']
                  + word @ params['out_word']['kernel'] + context @ params['out_context']['kernel'])
  by_hand = deep @ params['readout']['kernel'] + params['readout']['bias']
  np.testing.assert_allclose(logits[:, 2], by_hand, rtol=1e-4, atol=1e-4)
  # The context moves the logits directly: zero L_z and they change, with the states left as they were.
  no_context = {**params, 'out_context': {'kernel': jnp.zeros_like(params['out_context']['kernel'])}}
  assert not np.allclose(_apply(model, None, {'params': no_context}, annotations, inputs)[0], logits)


def test_location_aware_attention_carries_the_previous_map_and_the_coverage():
  """attention_location: teacher forcing equals stepping, the carry holds the last alpha and the sum of
  all alphas so far, and with W_loc at zero the maps are the plain decoder's."""
  model, variables, annotations, tokens = _setup(attention_location=True)
  params = variables['params']
  assert params['cell']['location']['kernel'].shape == (2, ATTENTION)
  inputs = tokens[:, :-1]
  logits, alphas = _teacher_forced_as_stepped(model, variables, annotations, inputs)

  prepared = _apply(model, 'prepare', variables, annotations)
  carry = _apply(model, 'start', variables, annotations)
  assert len(carry) == 4 and not np.any(carry[2]) and not np.any(carry[3])
  for t in range(3):
    carry, _, _ = _apply(model, 'step_with_attention', variables, carry, inputs[:, t], prepared)
  np.testing.assert_allclose(carry[2], alphas[:, 2], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(carry[3], alphas[:, :3].sum(axis=1), rtol=1e-5, atol=1e-5)

  plain = _model()
  zeroed = {**params, 'cell': {**params['cell'], 'location': {'kernel': jnp.zeros((2, ATTENTION))}}}
  plain_params = {**params, 'cell': {k: v for k, v in params['cell'].items() if k != 'location'}}
  plain_alphas = _apply(plain, None, {'params': plain_params}, annotations, inputs)[1]
  np.testing.assert_allclose(_apply(model, None, {'params': zeroed}, annotations, inputs)[1], plain_alphas,
                             rtol=1e-6, atol=1e-6)
  # Where it looked before moves where it looks next: the same words, maps unlike the plain decoder's.
  assert not np.allclose(alphas[:, 2], plain_alphas[:, 2])
