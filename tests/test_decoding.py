"""Tests for capjax.decoding on toy step functions whose optimum can be checked by hand or brute force."""

import functools
import itertools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capjax import decoding

PAD, START, END = 0, 1, 2
NEVER = -1e9  # logit for tokens a toy model never emits (PAD, START): finite, so no inf arithmetic

# ----------------------------------------------------------------------------- toy models


def random_table(seed, vocab, scale=2.0):
  """Second-order Markov logits table[prev_prev, prev] -> (vocab,), PAD/START never emitted."""
  table = scale * np.random.default_rng(seed).normal(size=(vocab, vocab, vocab))
  table[..., [PAD, START]] = NEVER
  return table.astype(np.float32)


def table_apply(table, prev_prev, tokens):
  """Step whose carry is the previous token, so a wrong carry reorder in beam search changes results."""
  return tokens, table[prev_prev, tokens]


def table_step(table):
  return functools.partial(table_apply, jnp.asarray(table))


def table_contexts(batch_size, vocab):
  # Distinct "token before START" per row, so that rows decode differently.
  return jnp.arange(batch_size, dtype=jnp.int32) % vocab


def first_order_table(rows):
  """Logits table that ignores prev_prev, from {prev: {token: prob}}."""
  vocab = 1 + max(max(rows), max(t for row in rows.values() for t in row))
  table = np.full((vocab, vocab), NEVER, np.float32)
  table[:, END] = 0.0  # rows not listed end at once
  for prev, probs in rows.items():
    table[prev] = NEVER
    for token, prob in probs.items():
      table[prev, token] = np.log(prob)
  return np.broadcast_to(table, (vocab,) + table.shape).copy()


class TinyDecoder(nn.Module):
  vocab: int
  hidden: int = 16

  @nn.compact
  def __call__(self, carry, tokens):
    carry, h = nn.OptimizedLSTMCell(self.hidden)(carry, nn.Embed(self.vocab, 8)(tokens))
    logits = 3.0 * nn.Dense(self.vocab)(h)  # x3: peakier than at init, fewer near-ties
    return carry, logits.at[:, jnp.array([PAD, START])].set(NEVER)


TINY_DECODER = TinyDecoder(vocab=12)


def lstm_apply(params, carry, tokens):
  lstm_carry, steps = carry
  lstm_carry, logits = TINY_DECODER.apply(params, lstm_carry, tokens)
  # A random LSTM rarely picks END; making END likelier each step ends rows at varied lengths (~7).
  return (lstm_carry, steps + 1), logits.at[:, END].add(0.5 * (steps - 5.0))


class Toy(NamedTuple):
  """A toy model: ``apply_fn(params, carry, tokens)`` is a stable module-level function, so the
    jitted helpers below compile once per model kind and configuration, not once per seed."""
  name: str
  apply_fn: Callable
  params: Any
  carry: Any

  @property
  def step(self):
    return functools.partial(self.apply_fn, self.params)


def lstm_model(seed, batch_size=4):
  k_carry_c, k_carry_h, k_params = jax.random.split(jax.random.key(seed), 3)
  lstm_carry = (jax.random.normal(k_carry_c,
                                  (batch_size, 16)), jax.random.normal(k_carry_h, (batch_size, 16)))
  params = TINY_DECODER.init(k_params, lstm_carry, jnp.zeros((batch_size,), jnp.int32))
  return Toy('lstm', lstm_apply, params, (lstm_carry, jnp.zeros((batch_size,))))


def toy_models(seed, batch_size=4):
  vocab = 7
  yield Toy('table', table_apply, jnp.asarray(random_table(seed, vocab)), table_contexts(batch_size, vocab))
  yield lstm_model(seed, batch_size)


@functools.partial(
    jax.jit, static_argnums=(0, 1),
    static_argnames=('batch_size', 'beam_size', 'start_id', 'end_id', 'pad_id', 'max_len', 'length_penalty',
                     'temperature', 'top_k', 'no_repeat_ngram'))
def run(decoder, apply_fn, params, carry, *args, **kwargs):
  """Jitted ``decoder(step_fn, carry, *args, **kwargs)`` with step_fn closing over traced params."""
  return decoder(functools.partial(apply_fn, params), carry, *args, **kwargs)


def greedy(toy, max_len=10, **kwargs):
  return run(decoding.greedy_decode, toy.apply_fn, toy.params, toy.carry, batch_size=batch_of(toy),
             max_len=max_len, **kwargs, **IDS)


def beam(toy, beam_size, max_len=10, alpha=0.0, **kwargs):
  return run(decoding.beam_search, toy.apply_fn, toy.params, toy.carry, batch_size=batch_of(toy),
             beam_size=beam_size, max_len=max_len, length_penalty=alpha, **kwargs, **IDS)


def sample(toy, rng, max_len=10, **kwargs):
  return run(decoding.sample_decode, toy.apply_fn, toy.params, toy.carry, rng, batch_size=batch_of(toy),
             max_len=max_len, **kwargs, **IDS)


def log_prob(toy, tokens):
  return run(decoding.sequence_log_prob, toy.apply_fn, toy.params, toy.carry, tokens, END, start_id=START)


def batch_of(toy):
  return jax.tree_util.tree_leaves(toy.carry)[0].shape[0]


IDS = dict(start_id=START, end_id=END, pad_id=PAD)

# ----------------------------------------------------------------------------- brute force reference


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  return x - x.max() - np.log(np.exp(x - x.max()).sum())


def all_hypotheses(table, context, max_len, tokens):
  """Every sequence over ``tokens`` that ends at its first END or reaches max_len, with its log-prob."""
  out = []
  for length in range(1, max_len + 1):
    for body in itertools.product([t for t in tokens if t != END], repeat=length - 1):
      for last in tokens:
        seq = body + (last,)
        if last != END and length < max_len:
          continue
        prev2, prev, total = context, START, 0.0
        for tok in seq:
          total += np_log_softmax(table[prev2, prev])[tok]
          prev2, prev = prev, tok
        out.append((seq, total))
  return out


def generated_length(row):
  """Tokens generated including END (the length the beam normalises by)."""
  ends = np.flatnonzero(row == END)
  return ends[0] + 1 if len(ends) else len(row)


def gnmt_lp(length, alpha):
  return ((5 + length) / 6)**alpha


def has_repeated_ngram(seq, n):
  grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
  return len(grams) != len(set(grams))


# ----------------------------------------------------------------------------- greedy


def test_greedy_stops_at_end_and_pads_after():
  a, b = 3, 4
  table = first_order_table({START: {a: 0.9, b: 0.1}, a: {b: 0.8, END: 0.2}, b: {END: 0.7, a: 0.3}})
  out = decoding.greedy_decode(table_step(table), jnp.zeros((2,), jnp.int32), batch_size=2, max_len=6, **IDS)
  assert out.dtype == jnp.int32 and out.shape == (2, 6)
  np.testing.assert_array_equal(out, [[a, b, END, PAD, PAD, PAD]] * 2)


@pytest.mark.parametrize('seed', [0, 1])
def test_greedy_rows_pad_after_their_end(seed):
  for toy in toy_models(seed, batch_size=6):
    out = np.asarray(greedy(toy, max_len=12))
    assert out.shape == (6, 12) and out.dtype == np.int32
    assert (out == END).any(), f'{toy.name}: the toy model should end some rows'
    for row in out:
      stop = generated_length(row)
      assert not np.isin(row[:stop - 1], [PAD, END]).any(), toy.name
      assert (row[stop:] == PAD).all(), toy.name


def test_greedy_respects_max_len_without_end():
  table = first_order_table({t: {3: 0.6, 4: 0.4} for t in (START, 3, 4)})  # END never likely
  out = decoding.greedy_decode(table_step(table), jnp.zeros((3,), jnp.int32), batch_size=3, max_len=5, **IDS)
  np.testing.assert_array_equal(out, np.full((3, 5), 3))


def test_batch_size_must_match_carry():
  with pytest.raises(ValueError, match='batch_size'):
    decoding.greedy_decode(
        table_step(random_table(0, 5)), jnp.zeros((3,), jnp.int32), batch_size=4, max_len=5, **IDS)


# ----------------------------------------------------------------------------- beam search


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('alpha', [0.0, 0.7])
def test_beam_size_one_equals_greedy(seed, alpha):
  for toy in toy_models(seed):
    np.testing.assert_array_equal(beam(toy, 1, alpha=alpha).tokens[:, 0], greedy(toy), err_msg=toy.name)


@pytest.mark.parametrize('beam_size', [3, 5])
def test_beam_not_worse_than_greedy_in_log_prob(beam_size):
  # Not a theorem for beam search in general (pruning can drop the greedy prefix); it holds for
  # these fixed toy models, and a failure here is worth a look.
  for seed in range(3):
    for toy in toy_models(seed):
      greedy_lp = log_prob(toy, greedy(toy))
      beam_lp = log_prob(toy, beam(toy, beam_size).tokens[:, 0])
      assert np.all(beam_lp >= greedy_lp - 1e-5), (toy.name, seed, beam_lp, greedy_lp)


@pytest.mark.parametrize('alpha', [0.0, 1.0])
def test_beam_scores_sorted_and_consistent_with_teacher_forcing(alpha):
  toy = lstm_model(3)
  result = beam(toy, 5, alpha=alpha)
  assert result.tokens.shape == (4, 5, 10) and result.scores.shape == result.log_probs.shape == (4, 5)
  assert result.tokens.dtype == jnp.int32 and result.scores.dtype == jnp.float32
  assert np.all(np.diff(np.asarray(result.scores), axis=1) <= 0)
  for k in range(5):
    tokens = np.asarray(result.tokens[:, k])
    np.testing.assert_allclose(result.log_probs[:, k], log_prob(toy, tokens), rtol=1e-5, atol=1e-5)
    lengths = np.array([generated_length(row) for row in tokens])
    np.testing.assert_allclose(result.scores[:, k], result.log_probs[:, k] / gnmt_lp(lengths, alpha),
                               rtol=1e-5)
    for row, length in zip(tokens, lengths):  # frozen after END: pads only
      assert (row[length:] == PAD).all()


def test_beam_finds_sequence_greedy_misses():
  # Greedy takes A (0.6) then END (0.4): p = 0.24. Beam keeps B (0.4) then END (0.9): p = 0.36.
  a, b = 3, 4
  table = first_order_table({START: {a: 0.6, b: 0.4}, a: {END: 0.4, a: 0.3, b: 0.3}, b: {END: 0.9, a: 0.1}})
  step, carry = table_step(table), jnp.zeros((1,), jnp.int32)
  greedy = decoding.greedy_decode(step, carry, batch_size=1, max_len=4, **IDS)
  beam = decoding.beam_search(step, carry, batch_size=1, beam_size=2, max_len=4, **IDS)
  np.testing.assert_array_equal(greedy[0], [a, END, PAD, PAD])
  np.testing.assert_array_equal(beam.tokens[0, 0], [b, END, PAD, PAD])
  np.testing.assert_array_equal(beam.tokens[0, 1], [a, END, PAD, PAD])
  np.testing.assert_allclose(beam.scores[0], np.log([0.36, 0.24]), rtol=1e-6)


@pytest.mark.parametrize('alpha', [0.0, 1.0])
def test_wide_beam_equals_brute_force(alpha):
  # With more beams than hypotheses at any depth nothing is pruned: beam search is exhaustive.
  vocab, max_len, batch_size, top = 6, 4, 2, 10
  table = random_table(7, vocab)
  contexts = table_contexts(batch_size, vocab)
  beam = decoding.beam_search(
      table_step(table), contexts, batch_size=batch_size, beam_size=128, max_len=max_len,
      length_penalty=alpha, **IDS)
  for row, context in enumerate(np.asarray(contexts)):
    ranked = sorted(((lp / gnmt_lp(len(seq), alpha), seq)
                     for seq, lp in all_hypotheses(table, context, max_len, tokens=range(END, vocab))),
                    reverse=True)[:top]
    np.testing.assert_allclose(beam.scores[row, :top], [s for s, _ in ranked], rtol=1e-5)
    for k, (_, seq) in enumerate(ranked):
      np.testing.assert_array_equal(beam.tokens[row, k, :len(seq)], seq)


def test_hypothesis_without_end_is_a_candidate():
  table = first_order_table({t: {3: 0.6, 4: 0.4} for t in (START, 3, 4)})
  beam = decoding.beam_search(
      table_step(table), jnp.zeros((1,), jnp.int32), batch_size=1, beam_size=2, max_len=3, **IDS)
  np.testing.assert_array_equal(beam.tokens[0], [[3, 3, 3], [3, 3, 4]])
  np.testing.assert_allclose(beam.log_probs[0], np.log([0.6**3, 0.6**2 * 0.4]), rtol=1e-6)


# ----------------------------------------------------------------------------- jit, sampling, helpers


def test_decoders_work_under_jit_and_match_eager():
  toy = lstm_model(4)

  @functools.partial(jax.jit, static_argnames=('beam_size',))
  def decode(params, carry, beam_size):  # the documented pattern: step_fn closes over traced params
    step_fn = lambda c, tokens: lstm_apply(params, c, tokens)
    return (decoding.greedy_decode(step_fn, carry, batch_size=4, max_len=8, **IDS),
            decoding.beam_search(step_fn, carry, batch_size=4, beam_size=beam_size, max_len=8, **IDS))

  jit_greedy, jit_beam = decode(toy.params, toy.carry, beam_size=3)
  eager_greedy = decoding.greedy_decode(toy.step, toy.carry, batch_size=4, max_len=8, **IDS)
  eager_beam = decoding.beam_search(toy.step, toy.carry, batch_size=4, beam_size=3, max_len=8, **IDS)
  np.testing.assert_array_equal(jit_greedy, eager_greedy)
  np.testing.assert_array_equal(jit_beam.tokens, eager_beam.tokens)
  np.testing.assert_allclose(jit_beam.scores, eager_beam.scores, rtol=1e-5)


def test_sampling_limits_equal_greedy():
  for toy in toy_models(5):
    for kwargs in (dict(top_k=1), dict(temperature=0.0), dict(temperature=1e-4)):
      sampled = run(decoding.sample_decode, toy.apply_fn, toy.params, toy.carry, jax.random.key(0),
                    batch_size=4, max_len=10, **kwargs, **IDS)
      np.testing.assert_array_equal(sampled, greedy(toy), err_msg=f'{toy.name} {kwargs}')


def test_sampling_is_reproducible_and_pads_after_end():
  step, carry = table_step(random_table(6, 7, scale=0.5)), table_contexts(8, 7)
  sample = functools.partial(decoding.sample_decode, step, carry, batch_size=8, max_len=12, top_k=4, **IDS)
  first, again, other = sample(jax.random.key(1)), sample(jax.random.key(1)), sample(jax.random.key(2))
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  for row in np.asarray(first):
    ends = np.flatnonzero(row == END)
    if len(ends):
      assert (row[ends[0] + 1:] == PAD).all()


def test_sequence_log_prob_matches_numpy():
  vocab = 6
  table = random_table(8, vocab)
  tokens = np.array([[3, 4, END, PAD], [5, 5, 4, 3]], np.int32)  # the 2nd row has no END
  got = decoding.sequence_log_prob(table_step(table), table_contexts(2, vocab), tokens, END, start_id=START)
  hyps = {seq: lp for seq, lp in all_hypotheses(table, 0, 4, range(END, vocab))}
  hyps_row1 = {seq: lp for seq, lp in all_hypotheses(table, 1, 4, range(END, vocab))}
  np.testing.assert_allclose(got, [hyps[(3, 4, END)], hyps_row1[(5, 5, 4, 3)]], rtol=1e-5)


# ----------------------------------------------------------------------------- n-gram blocking
# Every decoder call through `run` is jitted with no_repeat_ngram static. The toys here share the
# shapes of `toy_models` (vocab 7, batch 4, max_len 10) so that compilations are reused: each new
# (decoder, n) pair costs seconds of compile time, the toy's seed costs nothing.

A, B, C = 3, 4, 5


def looping_toy():
  """Greedy loops "a b a b ..."; every token also has a runner-up, so blocking has somewhere to go."""
  table = first_order_table({START: {A: 0.9, B: 0.1}, A: {B: 0.5, C: 0.3, END: 0.2},
                             B: {A: 0.6, C: 0.3, END: 0.1}, C: {A: 0.5, B: 0.3, END: 0.2}, 6: {}})
  return Toy('looping', table_apply, jnp.asarray(table), jnp.zeros((4,), jnp.int32))


def repetitive_toy(seed):
  """A random second-order table whose rows run long, so that unblocked outputs repeat n-grams."""
  table = random_table(seed, 7, scale=3.0)
  table[..., END] -= 2.0
  return Toy('table', table_apply, jnp.asarray(table), table_contexts(4, 7))


@pytest.mark.parametrize('n, expected', [
    (0, [A, B] * 5),
    # n=1: after a b, a is banned (c); after a b c, a and b are: END.
    (1, [A, B, C, END] + [PAD] * 6),
    # n=2: at step 3 "a b" is banned after a (c); at step 5 "a b" and "a c" are: END.
    (2, [A, B, A, C, A, END] + [PAD] * 4),
    # n=3: at step 4 "a b a" is banned after "a b" (c); at step 7 "a b a" and "a b c" are: END.
    (3, [A, B, A, B, C, A, B, END] + [PAD] * 2),
])
def test_blocking_on_hand_built_loop(n, expected):
  toy = looping_toy()
  np.testing.assert_array_equal(greedy(toy, no_repeat_ngram=n), [expected] * 4)
  np.testing.assert_array_equal(beam(toy, 1, no_repeat_ngram=n).tokens[:, 0], [expected] * 4)


@pytest.mark.parametrize('n', [1, 2, 3])
def test_beam_size_one_equals_greedy_with_blocking(n):
  for seed in range(4):
    toy = repetitive_toy(seed)
    beam_tokens = beam(toy, 1, no_repeat_ngram=n).tokens[:, 0]
    np.testing.assert_array_equal(beam_tokens, greedy(toy, no_repeat_ngram=n), err_msg=f'seed {seed}')


def test_top_k_sampling_bans_before_choosing_the_k():
  # Banning after picking the k best would leave top_k=1 only banned tokens (then END).
  for toy in (looping_toy(), repetitive_toy(0)):
    np.testing.assert_array_equal(sample(toy, jax.random.key(0), top_k=1, no_repeat_ngram=2),
                                  greedy(toy, no_repeat_ngram=2), err_msg=toy.name)


def test_no_output_repeats_an_ngram():
  repeats_unblocked = {n: 0 for n in (1, 2, 3)}
  for seed in range(6):
    toy = repetitive_toy(seed)
    unblocked = np.asarray(greedy(toy, no_repeat_ngram=0))
    for n in (1, 2, 3):
      repeats_unblocked[n] += sum(has_repeated_ngram(row[:generated_length(row)], n) for row in unblocked)
      outputs = {'greedy': greedy(toy, no_repeat_ngram=n),
                 # Plain sampling for n=2 only, top_k otherwise: each one is a compilation.
                 'sample': sample(toy, jax.random.key(seed), top_k=0 if n == 2 else 3, no_repeat_ngram=n)}
      result = beam(toy, 3, no_repeat_ngram=n)
      # Slots with score -inf hold no valid hypothesis (documented); the best one is always valid.
      assert np.isfinite(result.scores[:, 0]).all()
      for k in range(3):
        valid = np.isfinite(result.scores[:, k])
        outputs[f'beam {k}'] = np.asarray(result.tokens[:, k])[valid]
        # Scores stay the model's own log-probs, not renormalised over the allowed tokens.
        np.testing.assert_allclose(result.log_probs[valid, k], log_prob(toy, result.tokens[:, k])[valid],
                                   rtol=1e-5, atol=1e-5)
      for name, out in outputs.items():
        for row in np.asarray(out):
          stop = generated_length(row)
          assert not has_repeated_ngram(row[:stop], n), (seed, n, name, row)
          assert not np.isin(row[:stop - 1], [PAD, START, END]).any(), (seed, n, name, row)
          assert (row[stop:] == PAD).all(), (seed, n, name, row)
  assert all(repeats_unblocked.values()), repeats_unblocked  # else this test checks nothing


def test_wide_beam_with_blocking_equals_brute_force():
  # Nothing is pruned, so the beam holds exactly the hypotheses without a repeated bigram, scored
  # by the model's log-probs. A beam banning from another beam's history would differ.
  vocab, max_len, batch_size, top = 6, 4, 2, 10
  table = random_table(9, vocab)
  contexts = table_contexts(batch_size, vocab)
  beam = decoding.beam_search(table_step(table), contexts, batch_size=batch_size, beam_size=128,
                              max_len=max_len, no_repeat_ngram=2, **IDS)
  for row, context in enumerate(np.asarray(contexts)):
    hyps = all_hypotheses(table, context, max_len, tokens=range(END, vocab))
    ranked = sorted(((lp, seq) for seq, lp in hyps if not has_repeated_ngram(seq, 2)), reverse=True)[:top]
    np.testing.assert_allclose(beam.scores[row, :top], [s for s, _ in ranked], rtol=1e-5)
    for k, (_, seq) in enumerate(ranked):
      np.testing.assert_array_equal(beam.tokens[row, k, :len(seq)], seq)


def test_blocking_falls_back_to_end_when_every_token_is_banned():
  # The model only ever allows A (END included at -inf); with n=1 A is banned at step 1.
  table = np.full((7, 7, 7), -np.inf, np.float32)
  table[..., A] = 0.0
  toy = Toy('only a', table_apply, jnp.asarray(table), jnp.zeros((4,), jnp.int32))
  expected = [[A, END] + [PAD] * 8] * 4
  np.testing.assert_array_equal(greedy(toy, no_repeat_ngram=1), expected)
  np.testing.assert_array_equal(sample(toy, jax.random.key(0), top_k=3, no_repeat_ngram=1), expected)
  result = beam(toy, 3, no_repeat_ngram=1)
  np.testing.assert_array_equal(result.tokens[:, 0], expected)
  assert not np.isnan(result.scores).any() and np.isneginf(result.log_probs[:, 0]).all()


def test_blocking_off_or_longer_than_possible_changes_nothing():
  for seed in range(2):
    toy = repetitive_toy(seed)
    np.testing.assert_array_equal(greedy(toy, no_repeat_ngram=0), greedy(toy))
    # 10 tokens cannot hold a 10-gram twice: nothing is ever banned.
    unblocked = beam(toy, 3)
    for got, want in zip(beam(toy, 3, no_repeat_ngram=10), unblocked):
      np.testing.assert_array_equal(got, want)


def test_negative_no_repeat_ngram_is_rejected():
  step, carry = table_step(random_table(0, 5)), jnp.zeros((2,), jnp.int32)
  kwargs = dict(batch_size=2, max_len=4, no_repeat_ngram=-1, **IDS)
  for decode in (decoding.greedy_decode, functools.partial(decoding.beam_search, beam_size=2),
                 functools.partial(decoding.sample_decode, rng=jax.random.key(0)),
                 functools.partial(decoding.sample_decode, rng=jax.random.key(0), temperature=0.0)):
    with pytest.raises(ValueError, match='no_repeat_ngram must be >= 0'):
      decode(step, carry, **kwargs)
