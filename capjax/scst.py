"""Self-critical sequence training (SCST, Rennie et al. 2017): optimise the CIDEr-D of sampled captions.

The training stage after cross-entropy (`config.train.objective='scst'`, usually with
`config.train.init_from` naming the cross-entropy workdir). Each step, with the train loop, sharding,
checkpointing and resume of `train.py` unchanged:

1. Sampling, one jitted call (`sample_step`): the encoder runs once per image; its decoder carry is
   tiled to B * K rows (row b * K + k is sample k of image b, the layout of beam search; the attention
   context stays B rows and broadcasts), and K captions per image are drawn from softmax(logits / T)
   in one `decoding.sample_decode` loop, plus the B greedy captions when the baseline is greedy. The
   network runs in inference mode (BatchNorm running averages, no dropout): the policy being optimised
   is the network that captions at test time, not a noisier training-mode variant of it. The key is
   `fold_in(fold_in(state.rng, state.step), 2)`, a function of the saved state, so a resumed run draws
   the samples an unbroken run would.
2. Reward, on the host (`CaptionReward`): CIDEr-D (capjax/evaluation/cider.py, the coco-caption
   definition) of each sample against all of its image's training references, document frequencies from
   the whole training split; the references are prepared once per run, a step only cooks its candidates
   (milliseconds).
3. Update, one jitted call (`update_step`): teacher-forced log-probs of the samples under the same
   inference-mode network, the gradient going through it (the trunk too, when it trains), then the
   optimiser. BatchNorm statistics are left as they are: nothing here is a training-mode pass.

The loss, for N = B * K samples s_i with rewards r_i and baselines b_i:

    loss = -(1 / N) * sum_i (r_i - b_i) * sum_t m_it * log pi(s_it | s_i<t, image)

pi = softmax(logits / T) (the distribution the samples were drawn from), m_it = 1 up to and including
the sample's first <END> (stopping is an action too), 0 after it. The normalisation is per sample, not
per token: each caption contributes the gradient of its whole log-probability, which is the
REINFORCE estimate of the gradient of the mean reward; a per-token mean (self-critical.pytorch's
`RewardCriterion`) would make the step size depend on how long the batch's captions happen to be.
(r - b) is a constant (no gradient). Baselines (`config.train.scst_baseline`):
- 'greedy' (the paper): b_i = CIDEr-D of the greedy caption of the sample's image.
- 'mean' ("new self-critical", Luo 2020): b_i = mean reward of the other K - 1 samples of its image.

How the known pitfalls are handled:
- Samples that never emit <END> are scored as the truncated caption they are (all `max_len` tokens) and
  all their tokens enter the log-prob. With `scst_reward_end` (the default) they also miss the <END>
  n-grams every reference has, so the reward itself discourages running out of room.
- Tokens after the first <END> are <PAD> (the decoder emits pads) and masked out of the log-prob.
- Empty captions (<END> first) score 0: no n-grams, zero norms (CIDEr-D's 0/0 is 0). Their log-prob
  is that of <END> alone, so a negative advantage pushes the model away from stopping at once.
- <UNK> in samples is scored as is, as a word that matches nothing: the references are tokenised from
  the raw caption text, every word with an id of its own (vocabulary words their vocabulary id, the
  others ids past the vocabulary), never <UNK>. So an <UNK> earns no n-gram credit but counts in the
  caption's length and tf-idf norm, exactly as '<UNK>' in a decoded caption fares against the text
  references at evaluation. <PAD> and <START> sampled inside a caption are dropped before scoring, as
  `Vocabulary.decode` drops them: the reward scores the words the caption shows.
- CIDEr-D's length bias: its Gaussian penalty exp(-(l_c - l_r)^2 / 72) against each reference and the
  clipped n-gram counts keep the sample length near the references', but without <END> a caption that
  stops mid-phrase ("a man riding a horse with a") loses nothing for it, and SCST learns such endings
  (self-critical.pytorch, issue #8). `scst_reward_end=True` scores <END> as a word, as that
  implementation does: <END> is appended to every reference (corpus df included; as every reference has
  it its unigram weight is 0) and each sample keeps its first <END>, so a caption is rewarded for the
  (last word, <END>) n-grams of a proper ending. The mean sample length is logged to watch for drift.
- References with different counts per image: CIDEr-D averages over each image's own references
  (`CiderD.prepare` pads the missing slots with zero weight and divides by the true count).

Logged per step (progress line and TensorBoard): 'loss' (the surrogate above), 'reward' (mean sample
CIDEr-D), 'baseline' (mean baseline; with 'mean' it equals the mean reward by construction), 'ended'
(fraction of samples that emitted <END>), 'sample_len' (mean tokens before the first <END>, max_len
when none).

Not supported: the 'cached' encoder mode (sampling needs the decoder's start from cached features,
which the models do not expose), and horizontal flips in the training augmentation (a flipped image's
'left'/'right' would be scored against unflipped references); `check_config` says so.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from capjax.evaluation import cider
from capjax import decoding
from capjax import mesh as mesh_lib
from capjax import progress
from capjax import state as state_lib
from capjax import vocab as vocab_lib
from capjax.data import records as records_lib

OBJECTIVES = ('xent', 'scst')
BASELINES = ('greedy', 'mean')
_SAMPLE_KEY, _AUGMENT_KEY = 2, 1  # fold_in tags of the step key (train_step augments with 1 as well)


@dataclasses.dataclass(frozen=True)
class ScstConfig:
  """What the SCST steps need from `config.train` (and the caption length from `config.data`)."""
  num_samples: int = 5
  baseline: str = 'greedy'
  temperature: float = 1.0
  max_len: int = 19  # generated tokens per caption, <END> included (max_caption_len - 1)
  reward_end: bool = True

  @classmethod
  def from_config(cls, config) -> 'ScstConfig':
    train = config.train
    return cls(num_samples=train.scst_samples, baseline=train.scst_baseline,
               temperature=float(train.scst_temperature), max_len=config.data.max_caption_len - 1,
               reward_end=bool(train.get('scst_reward_end', True)))


def check_config(config) -> None:
  """A clear ValueError for an objective or SCST setting that cannot run."""
  train = config.train
  objective = train.get('objective', 'xent')
  if objective not in OBJECTIVES:
    raise ValueError(f'config.train.objective: expected one of {OBJECTIVES}, got {objective!r}')
  if objective != 'scst':
    return
  if train.scst_baseline not in BASELINES:
    raise ValueError(f'config.train.scst_baseline: expected one of {BASELINES}, got {train.scst_baseline!r}')
  minimum = 2 if train.scst_baseline == 'mean' else 1
  if train.scst_samples < minimum:
    raise ValueError(f'config.train.scst_samples={train.scst_samples}: the {train.scst_baseline!r} baseline '
                     f'needs at least {minimum} samples per image')
  if not train.scst_temperature > 0:
    raise ValueError(f'config.train.scst_temperature must be > 0, got {train.scst_temperature}')
  if config.model.encoder_mode == 'cached':
    raise ValueError("config.train.objective='scst' does not support config.model.encoder_mode='cached' "
                     "(sampling starts the decoder from the images); use 'frozen', the same trunk "
                     'without cached features')
  augment = config.data.augment
  if augment.enabled and augment.flip_prob > 0:
    raise ValueError(
        'config.train.objective=scst with horizontal flips: a flipped image\'s "left" and "right" would '
        'be scored against the unflipped references. Set config.data.augment.flip_prob=0 (or '
        'config.data.augment.enabled=False, as the SCST papers train).')


# ----------------------------------------------------------------------------------------------
# The reward (host, numpy)
# ----------------------------------------------------------------------------------------------


def reference_ids(captions_per_image: Sequence[Sequence[str]], vocab: vocab_lib.Vocabulary, *,
                  append_end: bool) -> tuple[list[list[list[int]]], int]:
  """The references as word ids: every word of the raw caption (the vocabulary's tokenisation, no
  truncation) with its vocabulary id, or for words outside the vocabulary an id of its own past it (so
  that a sampled <UNK> matches none of them). Returns (ids per image, number of distinct such words).
  Ids must fit CIDEr-D's 15-bit fields: beyond 2**15 - 1 the rarest-first remainder share one id."""
  index = {w: i for i, w in enumerate(vocab.words)}
  last_id = 2 ** cider.TOKEN_BITS - 1
  extra = {}

  def word_id(word):
    i = index.get(word)
    if i is None:
      i = extra.get(word)
      if i is None:
        i = extra[word] = min(len(vocab) + len(extra), last_id)
    return i

  tail = [vocab_lib.END_ID] if append_end else []
  ids = [[[word_id(w) for w in vocab_lib.tokenize(c)] + tail for c in captions]
         for captions in captions_per_image]
  return ids, len(extra)


def candidate_tokens(samples: np.ndarray, *, keep_end: bool) -> np.ndarray:
  """Decoded rows (M, L) -> what CIDEr-D scores, as rows with <PAD> for the dropped tokens: the words
  before the first <END> (<START>/<PAD> among them dropped, as `Vocabulary.decode` does), then that
  <END> itself when `keep_end`; nothing after it."""
  samples = np.asarray(samples)
  is_end = samples == vocab_lib.END_ID
  after_end = (np.cumsum(is_end, axis=1) - is_end) > 0
  dropped = after_end | (samples == vocab_lib.START_ID) | (samples == vocab_lib.PAD_ID)
  if not keep_end:
    dropped |= is_end
  return np.where(dropped, vocab_lib.PAD_ID, samples)


class CaptionReward:
  """CIDEr-D of generated captions against the training references of their images.

  Built once per run: the document frequencies come from all training references (as the SCST papers
  use, not from the batch), and the references are prepared once, so a call only cooks its captions.
  """

  def __init__(self, captions_per_image: Sequence[Sequence[str]], vocab: vocab_lib.Vocabulary, *,
               reward_end: bool = True):
    references, self.unknown_words = reference_ids(captions_per_image, vocab, append_end=reward_end)
    self.reward_end = reward_end
    self._cider = cider.CiderD(references)
    self._references = self._cider.prepare(references)

  @classmethod
  def from_source(cls, source, vocab: vocab_lib.Vocabulary, *, reward_end: bool = True) -> 'CaptionReward':
    """From a record source's captions (image i of the source is reference set i), read from a prepared
    split's captions file (`records.split_captions`), not from its records and their images."""
    return cls(records_lib.split_captions(source), vocab, reward_end=reward_end)

  @property
  def num_images(self) -> int:
    return self._references.num_images

  def __call__(self, samples: np.ndarray, image_index: np.ndarray) -> np.ndarray:
    """Decoded rows (M, L) (<END> kept, pads after, as `capjax.decoding` returns them), each of image
    `image_index[m]` -> float64 (M,) CIDEr-D."""
    candidates = candidate_tokens(samples, keep_end=self.reward_end)
    return self._cider.score(candidates, self._references, image_index, pad_id=vocab_lib.PAD_ID)


def baselines(rewards: np.ndarray, num_samples: int, kind: str,
              greedy_rewards: np.ndarray | None = None) -> np.ndarray:
  """The baseline of each of B * K sample rewards (image-major): the greedy reward of its image, or the
  mean reward of the other K - 1 samples of its image (leave-one-out, so a sample's own reward never
  enters its baseline and the gradient estimate stays unbiased)."""
  rewards = np.asarray(rewards, np.float64).reshape(-1, num_samples)
  if kind == 'greedy':
    return np.repeat(np.asarray(greedy_rewards, np.float64), num_samples)
  if kind == 'mean':
    return ((rewards.sum(axis=1, keepdims=True) - rewards) / (num_samples - 1)).reshape(-1)
  raise ValueError(f'baseline: expected one of {BASELINES}, got {kind!r}')


def sample_statistics(samples: np.ndarray) -> dict[str, float]:
  """Fraction of rows that emitted <END>, and mean tokens before the first <END> (the row length if none)."""
  is_end = np.asarray(samples) == vocab_lib.END_ID
  ended = is_end.any(axis=1)
  lengths = np.where(ended, np.argmax(is_end, axis=1), is_end.shape[1])
  return {'ended': float(ended.mean()), 'sample_len': float(lengths.mean())}


# ----------------------------------------------------------------------------------------------
# The loss and the pure steps (device)
# ----------------------------------------------------------------------------------------------


def action_mask(samples: jax.Array) -> jax.Array:
  """float32 (N, L): 1 for every token up to and including the first <END>, 0 after it."""
  is_end = samples == vocab_lib.END_ID
  return ((jnp.cumsum(is_end, axis=1) - is_end) == 0).astype(jnp.float32)


def sequence_log_probs(logits: jax.Array, samples: jax.Array, temperature: float = 1.0) -> jax.Array:
  """Sum over each sample's actions (see `action_mask`) of log softmax(logits / T)[token]: float32 (N,).
  logits (N, L, V) with logits[:, t] predicting samples[:, t]."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature)
  token = jnp.take_along_axis(log_probs, samples[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return jnp.sum(token * action_mask(samples), axis=1)


def scst_loss(logits: jax.Array, samples: jax.Array, advantages: jax.Array,
              temperature: float = 1.0) -> jax.Array:
  """-(1/N) sum_i advantage_i * log pi(sample_i): the module docstring's loss, per-sample normalised."""
  advantages = jax.lax.stop_gradient(advantages.astype(jnp.float32))
  return -jnp.sum(advantages * sequence_log_probs(logits, samples, temperature)) / samples.shape[0]


def _step_images(state, batch: Mapping[str, jax.Array], image_table, augment) -> jax.Array:
  """The step's images, exactly as `state.train_step` builds them (table lookup, device augmentation
  with the step's augmentation key): the sampling and the update calls see the same pixels."""
  batch = dict(batch)
  if image_table is not None:
    batch['image'] = jnp.take(image_table, batch.pop('index'), axis=0)
  if augment is not None:
    step_rng = jax.random.fold_in(state.rng, state.step)
    batch = augment(batch, jax.random.fold_in(step_rng, _AUGMENT_KEY))
  return batch['image']


def sample_step(state: state_lib.TrainState, batch: Mapping[str, jax.Array], image_table=None, *,
                model, cfg: ScstConfig, augment=None) -> dict[str, jax.Array]:
  """K sampled captions per image (+ the greedy ones for the greedy baseline), inference mode.
  Returns {'samples' int32 (B*K, max_len) image-major, 'image_index' (B,)[, 'greedy' (B, max_len)]}."""
  images = _step_images(state, batch, image_table, augment)
  variables = state.variables
  encoded = model.apply(variables, images, method=model.encode)
  context = model.apply(variables, encoded, method=model.prepare)  # once per image, shared by the K rows
  carry = model.apply(variables, encoded, method=model.start)
  step_fn = lambda c, t: model.apply(variables, c, t, context, method=model.step)  # noqa: E731
  batch_size = images.shape[0]
  kwargs = dict(start_id=vocab_lib.START_ID, end_id=vocab_lib.END_ID, pad_id=vocab_lib.PAD_ID,
                max_len=cfg.max_len)
  rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), _SAMPLE_KEY)
  tiled = jax.tree.map(lambda x: jnp.repeat(x, cfg.num_samples, axis=0), carry)
  out = {'samples': decoding.sample_decode(step_fn, tiled, rng, batch_size=batch_size * cfg.num_samples,
                                           temperature=cfg.temperature, **kwargs),
         'image_index': batch['image_index']}
  if cfg.baseline == 'greedy':
    out['greedy'] = decoding.greedy_decode(step_fn, carry, batch_size=batch_size, **kwargs)
  return out


def update_step(state: state_lib.TrainState, batch: Mapping[str, jax.Array], samples: jax.Array,
                advantages: jax.Array, image_table=None, *, logits_fn: state_lib.LogitsFn,
                tx: optax.GradientTransformation, cfg: ScstConfig, skip_nonfinite: bool = False,
                augment=None) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
  """One optimiser step on `scst_loss` of the samples (B*K, L) with their advantages (B*K,), the network
  in inference mode (BatchNorm statistics unchanged). `skip_nonfinite` as in `state.train_step`."""
  images = _step_images(state, batch, image_table, augment)
  batch_size, length = images.shape[0], samples.shape[1]
  start = jnp.full((samples.shape[0], 1), vocab_lib.START_ID, jnp.int32)
  # [<START>, s_0 .. s_L-1] per sample, grouped by image: the encoder runs once per image.
  tokens = jnp.concatenate([start, samples.astype(jnp.int32)], axis=1).reshape(batch_size, -1, length + 1)

  def loss_fn(params):
    logits = logits_fn({'params': params, 'batch_stats': state.batch_stats},
                       {'image': images, 'tokens': tokens}, train=False)
    return scst_loss(logits, samples, advantages, cfg.temperature)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  grad_norm = optax.tree.norm(grads)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            opt_state=opt_state)
  if skip_nonfinite:
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                             state.replace(step=state.step + 1))
  return new_state, {'loss': loss, 'grad_norm': grad_norm}


# ----------------------------------------------------------------------------------------------
# The compiled step the training loop calls
# ----------------------------------------------------------------------------------------------


class ScstStep:
  """`(state, batch) -> (state, metrics)` like `state.compile_train_step`'s step: sample (jitted), reward
  (host), update (jitted). The host waits for the samples each step; the reward costs milliseconds
  against the two device calls. Every process computes the same rewards for the whole global batch
  (the samples and image indices come back replicated), so the update's inputs agree everywhere."""

  def __init__(self, sample_fn: Callable, update_fn: Callable, reward: CaptionReward, cfg: ScstConfig,
               mesh, image_table=None):
    self._sample, self._update, self._reward, self.cfg = sample_fn, update_fn, reward, cfg
    self._mesh, self._table = mesh, image_table
    self.last = None  # the latest step's host-side results (samples, rewards, baselines): tests, demos
    # True: each step waits for its update too and records the seconds of its three parts in
    # `last_seconds` ({'sample', 'reward', 'update'}; benchmarks/scst_step.py). Off in training, where the
    # update runs on while the host fetches the next batch.
    self.timed = False
    self.last_seconds = None

  def __call__(self, state, batch):
    extra = () if self._table is None else (self._table,)
    start = time.perf_counter()
    drawn = self._sample(state, batch, *extra)
    host = jax.device_get(drawn)
    sampled = time.perf_counter()
    cfg = self.cfg
    image_index = np.asarray(host['image_index']).reshape(-1)
    rewards = self._reward(host['samples'], np.repeat(image_index, cfg.num_samples))
    greedy = self._reward(host['greedy'], image_index) if cfg.baseline == 'greedy' else None
    baseline = baselines(rewards, cfg.num_samples, cfg.baseline, greedy)
    advantages = mesh_lib.tree_replicate(np.asarray(rewards - baseline, np.float32), self._mesh)
    rewarded = time.perf_counter()
    state, metrics = self._update(state, batch, drawn['samples'], advantages, *extra)
    if self.timed:
      jax.block_until_ready(metrics)
      self.last_seconds = {'sample': sampled - start, 'reward': rewarded - sampled,
                           'update': time.perf_counter() - rewarded}
    self.last = {'samples': host['samples'], 'image_index': image_index, 'rewards': rewards,
                 'baselines': baseline}
    return state, {**metrics, 'reward': np.float32(rewards.mean()), 'baseline': np.float32(baseline.mean()),
                   **{k: np.float32(v) for k, v in sample_statistics(host['samples']).items()}}


def compile_scst_step(model, logits_fn: state_lib.LogitsFn, tx: optax.GradientTransformation, mesh,
                      reward: CaptionReward, cfg: ScstConfig, *, skip_nonfinite: bool = False,
                      augment=None, image_table: jax.Array | None = None) -> ScstStep:
  """The SCST step, its two device calls jitted once with explicit shardings (state replicated, batch
  sharded over 'data', samples and advantages replicated); the update donates the old state."""
  replicated, sharded = mesh_lib.replicated(mesh), mesh_lib.batch_sharded(mesh)
  table = () if image_table is None else (replicated,)
  sample_fn = jax.jit(functools.partial(sample_step, model=model, cfg=cfg, augment=augment),
                      in_shardings=(replicated, sharded, *table), out_shardings=replicated)
  update_fn = jax.jit(
      functools.partial(update_step, logits_fn=logits_fn, tx=tx, cfg=cfg, skip_nonfinite=skip_nonfinite,
                        augment=augment),
      in_shardings=(replicated, sharded, replicated, replicated, *table),
      out_shardings=(replicated, replicated), donate_argnums=(0,))
  return ScstStep(sample_fn, update_fn, reward, cfg, mesh, image_table)


def describe(cfg: ScstConfig, reward: CaptionReward) -> str:
  """One line for the start of a run."""
  end = ', <END> scored as a word' if cfg.reward_end else ''
  return (f'SCST: {cfg.num_samples} samples per image at temperature {cfg.temperature:g}, '
          f'{cfg.baseline} baseline, CIDEr-D reward against {reward.num_images} training images\' '
          f'references{end} ({reward.unknown_words} reference words outside the vocabulary).')


def say_start(cfg: ScstConfig, reward: CaptionReward, initialised: bool) -> None:
  progress.say(describe(cfg, reward))
  if not initialised:
    progress.say('Note: SCST from a model that was not trained with cross-entropy first samples '
                 'noise; start from a cross-entropy workdir with config.train.init_from.')

