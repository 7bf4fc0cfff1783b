"""Batched, jittable caption decoding: greedy, beam search and sampling.

Everything here is model-agnostic. The captioner exposes one decoder step as a pure function

    step_fn(carry, tokens[int32, (N,)]) -> (new_carry, logits[float, (N, vocab)])

where ``carry`` is any pytree whose leaves have leading dimension N (for the LSTM: ``(c, h)``). The
initial carry is the one after the image vector has been fed; the first token fed is ``<START>``.
The new carry must match the initial one in structure, shapes and dtypes (a ``while_loop`` rule):
cast the initial carry to the compute dtype first if the model runs in bf16.

Each search runs as a single ``jax.lax.while_loop`` over time that stops early once every row has
emitted ``<END>``; the output is the same as running all ``max_len`` steps. Output position ``t``
holds the token generated at step ``t`` (``<START>`` is never in the output). A row keeps its
``<END>`` token; every position after it is ``pad_id``.

``no_repeat_ngram=n > 0`` (fairseq's ``no_repeat_ngram_size``) keeps any n-gram from occurring twice
in a row's generated tokens (``<START>`` is not part of them): at step t, every token that earlier
followed the row's last n-1 tokens is banned (n=1: every token already generated; n=3: trigram
blocking). Beam search bans per hypothesis, from that beam's own history. ``<END>`` is never banned
in practice: it is never in an unfinished row's history. A row whose every remaining logit is -inf
after the ban (the model gave -inf to all allowed tokens) takes ``<END>``; in beam search that
hypothesis scores -inf. ``n`` must be a static Python int.

To use under ``jax.jit``, close over the parameters and keep the keyword arguments static::

    @functools.partial(jax.jit, static_argnames=('max_len',))
    def caption(params, carry, max_len):
        step = lambda c, tok: model.apply(params, c, tok, method=model.decode_step)
        return greedy_decode(step, carry, batch_size=carry[0].shape[0], start_id=1,
                             end_id=2, pad_id=0, max_len=max_len)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

Carry = Any
StepFn = Callable[[Carry, jax.Array], tuple[Carry, jax.Array]]


class BeamResult(NamedTuple):
  """Beam search output for B images and K beams, best beam first.

  tokens:    int32 (B, K, max_len); END kept, pad after it.
  scores:    float32 (B, K); length-normalised log-prob (equal to ``log_probs`` when alpha=0).
  log_probs: float32 (B, K); raw sum of token log-probs, END included.
  """
  tokens: jax.Array
  scores: jax.Array
  log_probs: jax.Array


# ----------------------------------------------------------------------------- shared helpers

def _check_args(init_carry: Carry, batch_size: int, max_len: int) -> None:
  if max_len < 1:
    raise ValueError(f'max_len must be >= 1, got {max_len}')
  for leaf in jax.tree_util.tree_leaves(init_carry):
    if leaf.shape[:1] != (batch_size,):
      raise ValueError(f'carry leaf of shape {leaf.shape} does not lead with batch_size={batch_size}')


def _check_ngram(no_repeat_ngram: int) -> None:
  if no_repeat_ngram < 0:
    raise ValueError(f'no_repeat_ngram must be >= 0 (0: no blocking), got {no_repeat_ngram}')


def _ngram_ban(history: jax.Array, t: jax.Array, n: int, vocab: int) -> jax.Array:
  """bool (N, vocab): the tokens that would complete, at step t, an n-gram already in history[:, :t].

  history is int32 (N, max_len) with the tokens generated so far in positions < t. The window
  starting at j is the n-gram history[:, j:j+n]; it bans its last token when its first n-1 tokens
  equal the row's last n-1 tokens. Cost per step: n compares of (N, max_len - n) windows and one
  scatter of those N * (max_len - n) followers into the (N, vocab) mask, which is no bigger than the
  logits; a one-hot (N, max_len, vocab) is avoided on purpose (77 MB per step at N=192, 40, 10k).
  """
  rows, max_len = history.shape
  # A window must end before step t, so j <= t - n <= max_len - 1 - n: max_len - n windows at most.
  num_windows = max_len - n
  if num_windows <= 0:  # a ban at step t needs t >= n earlier tokens, and t < max_len
    return jnp.zeros((rows, vocab), bool)
  starts = jnp.arange(num_windows)
  match = jnp.broadcast_to(starts <= t - n, (rows, num_windows))
  for i in range(n - 1):  # over the n-gram's positions, a small static n, not over time
    # Clamped so that t < n - 1 reads a real column; no window is valid then anyway.
    prefix_i = jnp.take(history, jnp.maximum(t - n + 1 + i, 0), axis=1)
    match = match & (history[:, i:i + num_windows] == prefix_i[:, None])
  followers = history[:, n - 1:n - 1 + num_windows]
  # Non-matching windows scatter out of bounds, which mode='drop' ignores.
  followers = jnp.where(match, followers, vocab)
  return jnp.zeros((rows, vocab), bool).at[jnp.arange(rows)[:, None], followers].set(True, mode='drop')


def _mask_banned(logits: jax.Array, ban: jax.Array, end_id: int) -> jax.Array:
  """logits with banned tokens at -inf; a row left without any finite logit gets only END (logit 0)
  so that argmax, top_k and categorical still return END instead of token 0 (or NaN)."""
  logits = jnp.where(ban, -jnp.inf, logits)
  stuck = jnp.all(logits == -jnp.inf, axis=-1, keepdims=True)
  only_end = jnp.where(jnp.arange(logits.shape[-1]) == end_id, 0.0, -jnp.inf).astype(logits.dtype)
  return jnp.where(stuck, only_end, logits)


def _keep_going(t: jax.Array, finished: jax.Array, max_len: int) -> jax.Array:
  # Once every row is finished nothing can change any more, so stopping early is exact.
  return (t < max_len) & ~jnp.all(finished)


def _token_by_token_decode(step_fn: StepFn, init_carry: Carry, choose_token: Callable, *, batch_size: int,
                           start_id: int, end_id: int, pad_id: int, max_len: int,
                           no_repeat_ngram: int = 0) -> jax.Array:
  """Shared loop of greedy and sampling: ``choose_token(logits, t) -> tokens (B,)``."""
  _check_args(init_carry, batch_size, max_len)
  _check_ngram(no_repeat_ngram)

  def body(state):
    t, carry, last_tokens, finished, out = state
    carry, logits = step_fn(carry, last_tokens)
    if no_repeat_ngram:
      ban = _ngram_ban(out, t, no_repeat_ngram, logits.shape[-1])
      logits = _mask_banned(logits, ban, end_id)
    chosen = choose_token(logits, t).astype(jnp.int32)
    chosen = jnp.where(finished, pad_id, chosen)
    out = out.at[:, t].set(chosen)
    return t + 1, carry, chosen, finished | (chosen == end_id), out

  init = (jnp.int32(0), init_carry,
          jnp.full((batch_size,), start_id, jnp.int32),
          jnp.zeros((batch_size,), bool),
          jnp.full((batch_size, max_len), pad_id, jnp.int32))
  final = jax.lax.while_loop(lambda s: _keep_going(s[0], s[3], max_len), body, init)
  return final[4]


# ----------------------------------------------------------------------------- greedy and sampling

def greedy_decode(step_fn: StepFn, init_carry: Carry, *, batch_size: int, start_id: int, end_id: int,
                  pad_id: int, max_len: int, no_repeat_ngram: int = 0) -> jax.Array:
  """Argmax decoding (optionally n-gram blocked, see the module doc). Returns int32 (batch_size, max_len)."""
  return _token_by_token_decode(
      step_fn, init_carry, lambda logits, _: jnp.argmax(logits, axis=-1),
      batch_size=batch_size, start_id=start_id, end_id=end_id, pad_id=pad_id, max_len=max_len,
      no_repeat_ngram=no_repeat_ngram)


def sample_decode(step_fn: StepFn, init_carry: Carry, rng: jax.Array, *, batch_size: int, start_id: int,
                  end_id: int, pad_id: int, max_len: int, temperature: float = 1.0,
                  top_k: int = 0, no_repeat_ngram: int = 0) -> jax.Array:
  """Ancestral sampling from softmax(logits / temperature), optionally restricted to the top_k tokens.

  temperature=0 or top_k=1 is greedy decoding (same tie-breaking: lowest token id wins).
  With no_repeat_ngram, banned tokens have probability 0 (also among the top_k, which are taken
  from the allowed tokens). Returns int32 (batch_size, max_len).
  """
  if temperature < 0:
    raise ValueError(f'temperature must be >= 0, got {temperature}')
  _check_ngram(no_repeat_ngram)
  if temperature == 0:
    return greedy_decode(step_fn, init_carry, batch_size=batch_size, start_id=start_id,
                         end_id=end_id, pad_id=pad_id, max_len=max_len, no_repeat_ngram=no_repeat_ngram)

  def choose_token(logits, t):
    rng_t = jax.random.fold_in(rng, t)
    logits = logits.astype(jnp.float32) / temperature
    if top_k <= 0:
      return jax.random.categorical(rng_t, logits, axis=-1)
    # Sample among the k best directly, rather than masking below a threshold, so that ties at
    # the threshold cannot let in more than k tokens (top_k=1 then matches argmax exactly).
    best_logits, best_ids = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))
    pick = jax.random.categorical(rng_t, best_logits, axis=-1)
    return jnp.take_along_axis(best_ids, pick[:, None], axis=-1)[:, 0]

  return _token_by_token_decode(step_fn, init_carry, choose_token, batch_size=batch_size,
                                start_id=start_id, end_id=end_id, pad_id=pad_id, max_len=max_len,
                                no_repeat_ngram=no_repeat_ngram)


# ----------------------------------------------------------------------------- beam search

def length_penalty_factor(lengths: jax.Array, alpha: float) -> jax.Array:
  """GNMT length penalty ((5 + len) / 6) ** alpha; ``len`` counts generated tokens including END."""
  return ((5.0 + lengths.astype(jnp.float32)) / 6.0) ** alpha


def _normalised(log_probs: jax.Array, lengths: jax.Array, alpha: float) -> jax.Array:
  if alpha == 0:  # exactly the raw log-prob, no rounding from a division by 1
    return log_probs
  return log_probs / length_penalty_factor(lengths, alpha)


def _tile_beams(tree: Carry, beam_size: int) -> Carry:
  """(B, ...) -> (B*K, ...), row b*K + k is beam k of image b."""
  return jax.tree_util.tree_map(lambda x: jnp.repeat(x, beam_size, axis=0), tree)


def _gather_beams(tree: Carry, parents: jax.Array, batch_size: int, beam_size: int) -> Carry:
  """Reorder the (B*K, ...) leaves so that new beam k of image b is old beam parents[b, k]."""
  def gather(x):
    x = x.reshape((batch_size, beam_size) + x.shape[1:])
    idx = parents.reshape(parents.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1).reshape((batch_size * beam_size,) + x.shape[2:])
  return jax.tree_util.tree_map(gather, tree)


class _BeamState(NamedTuple):
  t: jax.Array            # int32 scalar, the step about to run
  carry: Carry            # leaves (B*K, ...)
  last_tokens: jax.Array  # int32 (B, K), fed at step t
  log_probs: jax.Array    # float32 (B, K), raw sum
  lengths: jax.Array      # int32 (B, K), tokens generated, END included
  finished: jax.Array     # bool (B, K)
  tokens: jax.Array       # int32 (B, K, max_len)


def _beam_candidates(state: _BeamState, logits: jax.Array, *, pad_id: int, end_id: int,
                     ban: jax.Array | None = None):
  """The K * k_tok candidate extensions of each image's K beams, each as (B, K, k_tok) arrays.

  Only the k_tok = min(K, V) best tokens of each beam can be in the next beam (the global top K
  takes at most K from one parent), so this equals a top K over all K * V extensions. Choosing
  them by raw logits uses exactly argmax's tie-breaking, which makes K=1 identical to greedy.

  ban (bool (B, K, V), optional): tokens no beam may take next. They are masked in the logits the
  top k_tok is chosen from, with greedy's masking, so K=1 stays greedy; their log-prob is -inf.
  The log-probs of allowed tokens are the model's own (not renormalised over the allowed tokens,
  as in fairseq), so scores stay the teacher-forced log-prob of the caption.
  """
  beam_size, vocab = logits.shape[-2:]
  k_tok = min(beam_size, vocab)
  all_log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  if ban is not None:
    logits = _mask_banned(logits, ban, end_id)
  _, token_ids = jax.lax.top_k(logits, k_tok)
  token_log_probs = jnp.take_along_axis(all_log_probs, token_ids, axis=-1)
  if ban is not None:  # banned tokens still get picked when fewer than k_tok are allowed
    token_log_probs = jnp.where(jnp.take_along_axis(ban, token_ids, axis=-1), -jnp.inf, token_log_probs)

  frozen = state.finished[..., None]
  # A finished beam is frozen: its only candidate is itself (first slot, pad appended, same score).
  only_first = jnp.arange(k_tok) == 0
  log_probs = jnp.where(frozen, jnp.where(only_first, state.log_probs[..., None], -jnp.inf),
                        state.log_probs[..., None] + token_log_probs)
  tokens = jnp.where(frozen, pad_id, token_ids).astype(jnp.int32)
  lengths = jnp.where(frozen, state.lengths[..., None], state.t + 1).astype(jnp.int32)
  lengths = jnp.broadcast_to(lengths, tokens.shape)
  finished = frozen | (tokens == end_id)
  return log_probs, tokens, lengths, finished


def _beam_step(state: _BeamState, step_fn: StepFn, *, batch_size: int, beam_size: int,
               pad_id: int, end_id: int, alpha: float, no_repeat_ngram: int) -> _BeamState:
  carry, logits = step_fn(state.carry, state.last_tokens.reshape(-1))
  logits = logits.reshape(batch_size, beam_size, -1)
  ban = None
  if no_repeat_ngram:
    # state.tokens already holds each beam's own history: it was reordered with its parents.
    max_len, vocab = state.tokens.shape[-1], logits.shape[-1]
    ban = _ngram_ban(state.tokens.reshape(-1, max_len), state.t, no_repeat_ngram, vocab)
    ban = ban.reshape(batch_size, beam_size, vocab)
  cand_log_probs, cand_tokens, cand_lengths, cand_finished = _beam_candidates(
      state, logits, pad_id=pad_id, end_id=end_id, ban=ban)

  # Finished and live hypotheses compete for the K slots on the same score the final ranking uses.
  flat = lambda x: x.reshape(batch_size, -1)
  _, best = jax.lax.top_k(_normalised(flat(cand_log_probs), flat(cand_lengths), alpha), beam_size)
  pick = lambda x: jnp.take_along_axis(flat(x), best, axis=1)
  parents = best // cand_tokens.shape[-1]
  new_tokens = pick(cand_tokens)

  history = jnp.take_along_axis(state.tokens, parents[..., None], axis=1)
  return _BeamState(
      t=state.t + 1,
      carry=_gather_beams(carry, parents, batch_size, beam_size),
      last_tokens=new_tokens,
      log_probs=pick(cand_log_probs),
      lengths=pick(cand_lengths),
      finished=pick(cand_finished),
      tokens=history.at[:, :, state.t].set(new_tokens))


def beam_search(step_fn: StepFn, init_carry: Carry, *, batch_size: int, beam_size: int, start_id: int,
                end_id: int, pad_id: int, max_len: int, length_penalty: float = 0.0,
                no_repeat_ngram: int = 0) -> BeamResult:
  """Beam search over the whole batch x beam in one compiled loop.

  Scores are sums of log-softmax token log-probs. A beam that emits END is frozen (its score no
  longer changes, pads follow) and keeps competing for its slot; a hypothesis that reaches
  max_len without END is a candidate too. Hypotheses are ranked, during the search and at the
  end, by log_prob / lp(len) with the GNMT penalty lp(len) = ((5 + len) / 6) ** length_penalty,
  where len counts generated tokens including END (alpha = 0: raw log-prob sum). Beam size 1 is
  exactly greedy decoding, also with no_repeat_ngram (bans per beam, see the module doc). Slots
  that never held a valid hypothesis (only if fewer than beam_size continuations are allowed:
  vocab < beam_size, or most tokens banned) have score -inf and arbitrary tokens.

  Returns a ``BeamResult`` (tokens (B, K, max_len), scores (B, K), log_probs (B, K)), best first.
  """
  _check_args(init_carry, batch_size, max_len)
  _check_ngram(no_repeat_ngram)
  if beam_size < 1:
    raise ValueError(f'beam_size must be >= 1, got {beam_size}')
  shape = (batch_size, beam_size)
  # All K beams start identical: only beam 0 is live, so the first step does not fill the beam
  # with K copies of the same hypothesis.
  first_beam_only = jnp.where(jnp.arange(beam_size) == 0, 0.0, -jnp.inf)
  init = _BeamState(
      t=jnp.int32(0),
      carry=_tile_beams(init_carry, beam_size),
      last_tokens=jnp.full(shape, start_id, jnp.int32),
      log_probs=jnp.broadcast_to(first_beam_only, shape).astype(jnp.float32),
      lengths=jnp.zeros(shape, jnp.int32),
      finished=jnp.zeros(shape, bool),
      tokens=jnp.full(shape + (max_len,), pad_id, jnp.int32))

  body = lambda s: _beam_step(s, step_fn, batch_size=batch_size, beam_size=beam_size,
                              pad_id=pad_id, end_id=end_id, alpha=length_penalty,
                              no_repeat_ngram=no_repeat_ngram)
  final = jax.lax.while_loop(lambda s: _keep_going(s.t, s.finished, max_len), body, init)

  scores = _normalised(final.log_probs, final.lengths, length_penalty)
  scores, order = jax.lax.top_k(scores, beam_size)  # already in order after the last step; cheap
  return BeamResult(tokens=jnp.take_along_axis(final.tokens, order[..., None], axis=1),
                    scores=scores,
                    log_probs=jnp.take_along_axis(final.log_probs, order, axis=1))


# ----------------------------------------------------------------------------- scoring and post-processing

def sequence_log_prob(step_fn: StepFn, init_carry: Carry, tokens: jax.Array, end_id: int, *,
                      start_id: int) -> jax.Array:
  """Teacher-forced log-prob of each row of ``tokens`` (B, L), up to and including the first END.

  Positions after the first END contribute nothing; a row without END is scored over all L tokens.
  Returns float32 (B,).
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  batch_size = tokens.shape[0]
  inputs = jnp.concatenate([jnp.full((batch_size, 1), start_id, jnp.int32), tokens[:, :-1]], axis=1)

  def body(state, xs):
    carry, total, finished = state
    fed, target = xs
    carry, logits = step_fn(carry, fed)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    token_log_prob = jnp.take_along_axis(log_probs, target[:, None], axis=-1)[:, 0]
    total = total + jnp.where(finished, 0.0, token_log_prob)
    return (carry, total, finished | (target == end_id)), None

  init = (init_carry, jnp.zeros((batch_size,), jnp.float32), jnp.zeros((batch_size,), bool))
  (_, total, _), _ = jax.lax.scan(body, init, (inputs.T, tokens.T))
  return total
