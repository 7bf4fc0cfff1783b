"""The train state, its optimizer, the loss and the pure train/eval steps, jitted over the mesh.

Nothing here knows about loops, files or evaluation: `train.py` drives these steps, `evaluation.loss`
uses `compile_eval_step`, and inference restores only the model variables (it never imports this).
"""

from collections.abc import Callable, Mapping
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from capjax import mesh as mesh_lib
from capjax import vocab as vocab_lib
from capjax.models import captioner


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data: saved and restored like any array

  @property
  def variables(self) -> dict:
    """What `model.apply` takes."""
    return {'params': self.params, 'batch_stats': self.batch_stats}


# ----------------------------------------------------------------------------------------------
# Optimiser
# ----------------------------------------------------------------------------------------------


def make_schedule(train_cfg, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  warmup = int(train_cfg.warmup_epochs * steps_per_epoch)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train_cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=train_cfg.learning_rate * train_cfg.end_learning_rate_factor)


def _decay_mask(params):
  """Weight decay on matrices and kernels only, not on biases or BatchNorm scales."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def _trunk_labels(params):
  return flax.traverse_util.path_aware_map(
      lambda path, _: 'trunk' if 'trunk' in path else 'head', params)


def _adamw(train_cfg, learning_rate) -> optax.GradientTransformation:
  return optax.adamw(learning_rate, weight_decay=train_cfg.weight_decay, mask=_decay_mask)


def make_optimizer(train_cfg, schedule: optax.Schedule, encoder_mode: str,
                   frozen_steps: int = 0) -> optax.GradientTransformation:
  """Global-norm clipping + AdamW with warmup/cosine.

  encoder_mode 'frozen'/'cached': the trunk gets no updates at all (not even weight decay).
  encoder_mode 'train' with `frozen_steps` > 0 (the warm-up): the trunk's learning rate is 0 for
  the first `frozen_steps`, then `encoder_lr_factor` x the schedule."""
  clip = optax.clip_by_global_norm(train_cfg.grad_clip_norm)
  if encoder_mode in ('frozen', 'cached'):
    return optax.chain(clip, optax.multi_transform(
        {'head': _adamw(train_cfg, schedule), 'trunk': optax.set_to_zero()}, _trunk_labels))
  factor = train_cfg.get('encoder_lr_factor', 1.0)
  if frozen_steps or factor != 1.0:
    trunk_schedule = lambda step: jnp.where(step < frozen_steps, 0.0, factor * schedule(step))  # noqa: E731
    return optax.chain(clip, optax.multi_transform(
        {'head': _adamw(train_cfg, schedule), 'trunk': _adamw(train_cfg, trunk_schedule)},
        _trunk_labels))
  return optax.chain(clip, _adamw(train_cfg, schedule))


def continue_schedules(opt_state, step: int):
  """A freshly initialised optimizer state whose learning-rate schedules go on from `step` (each
  schedule counts its own steps) while Adam's moments, and their bias correction, start from zero: what
  a resumed run gets when its optimizer is built differently from the checkpoint's."""
  def carry_on(node):
    if isinstance(node, optax.ScaleByScheduleState):
      return node._replace(count=jax.device_put(jnp.asarray(step, node.count.dtype), node.count.sharding))
    return node
  return jax.tree.map(carry_on, opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))


# ----------------------------------------------------------------------------------------------
# Loss and pure steps
# ----------------------------------------------------------------------------------------------

LogitsFn = Callable[..., Any]  # (variables, batch, **apply_kwargs) -> logits (or (logits, updates))


def teacher_forced_logits(model, *, from_features: bool = False) -> LogitsFn:
  """The run's batch -> logits function, chosen once: from `batch['image']`, or (the 'cached' encoder
  mode) from cached pooled trunk features in `batch['features']`."""
  if from_features:
    def logits_fn(variables, batch, **kwargs):
      return model.apply(variables, batch['features'], batch['tokens'][..., :-1],
                         method=model.decode_from_features, **kwargs)
  else:
    def logits_fn(variables, batch, **kwargs):
      return model.apply(variables, batch['image'], batch['tokens'][..., :-1], **kwargs)
  return logits_fn


def _token_losses(logits, tokens, example_weight=None):
  """(per-token cross-entropy, mask of real targets, targets), each (N * K, T); see token_cross_entropy."""
  tokens = tokens.reshape(-1, tokens.shape[-1])
  targets = tokens[:, 1:]
  mask = (targets != vocab_lib.PAD_ID).astype(jnp.float32)
  if example_weight is not None:
    mask = mask * example_weight[:, None]
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return losses, mask, targets


def token_cross_entropy(logits, tokens, example_weight=None):
  """Sum of next-token cross-entropies over real (non-<PAD>) targets, and how many there were.
  `logits[:, t]` predicts `tokens[:, t + 1]` (see models/captioner.py). tokens (N, K, L) (K captions
  per image, logits (N * K, T, V)) count every caption's tokens."""
  losses, mask, _ = _token_losses(logits, tokens, example_weight)
  return jnp.sum(losses * mask), jnp.sum(mask)


def sown_loss(updates) -> jax.Array | None:
  """The sum of the terms a model sowed into its 'losses' collection during `apply`; None when it sowed
  none (known when tracing)."""
  terms = jax.tree.leaves(updates.get('losses', {}))
  return sum((jnp.sum(term) for term in terms), jnp.float32(0)) if terms else None


BatchFn = Callable[[dict, jax.Array], dict]  # (batch, rng) -> batch, inside the jitted step


def train_step(state: TrainState, batch: Mapping[str, jax.Array], image_table: jax.Array | None = None, *,
               logits_fn: LogitsFn, tx: optax.GradientTransformation, skip_nonfinite: bool = False,
               augment: BatchFn | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step on a (globally sharded) batch; BatchNorm statistics are over the global batch.

  `image_table` (device-resident data): every training image, uint8 (N, S, S, 3) on every device;
  the batch then carries `index` instead of `image`. `augment` applies the training augmentations on
  the device (capjax/device_augment.py) with this step's own key. With `skip_nonfinite`, a step whose
  loss or gradient norm is NaN/Inf leaves the state as it was (only the step counter advances); the
  loop decides how many of those it tolerates."""
  step_rng = jax.random.fold_in(state.rng, state.step)
  batch = dict(batch)
  if image_table is not None:
    batch['image'] = jnp.take(image_table, batch.pop('index'), axis=0)
  if augment is not None:
    batch = augment(batch, jax.random.fold_in(step_rng, 1))  # dropout keeps step_rng itself

  def loss_fn(params):
    # 'losses': terms a model adds to its objective with `sow` (the attention penalty, the word loss).
    logits, updates = logits_fn({'params': params, 'batch_stats': state.batch_stats}, batch,
                                train=True, mutable=['batch_stats', 'losses'], rngs={'dropout': step_rng})
    loss_sum, count = token_cross_entropy(logits, batch['tokens'])
    loss = loss_sum / jnp.maximum(count, 1.0)
    extra = sown_loss(updates)
    return loss + (0.0 if extra is None else extra), (loss, extra, updates.get('batch_stats', {}), count)

  (total, (loss, extra, batch_stats, count)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  grad_norm = optax.tree.norm(grads)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            batch_stats=batch_stats, opt_state=opt_state)
  if skip_nonfinite:
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                             state.replace(step=state.step + 1))
  # 'loss' stays the per-token cross-entropy (comparable across models and with the eval loss); a
  # model's extra terms (known when tracing: only models that sow them have them) are reported apart.
  metrics = {'loss': loss, 'tokens': count, 'grad_norm': grad_norm}
  if extra is not None:
    metrics['extra_loss'] = extra
  return new_state, metrics


def eval_step(state: TrainState, batch: Mapping[str, jax.Array], *, logits_fn: LogitsFn) -> dict:
  """Summed loss and token count, also per target word (vectors over the vocabulary, so a split's loss
  can be read word by word: which words the model has not learnt); examples with weight 0 (batch
  padding) do not count."""
  logits = logits_fn(state.variables, batch, train=False)
  losses, mask, targets = _token_losses(logits, batch['tokens'], batch['weight'])
  per_word = jnp.zeros(logits.shape[-1], jnp.float32).at[targets.reshape(-1)]
  word_loss_sum = per_word.add((losses * mask).reshape(-1))
  word_count = per_word.add(mask.reshape(-1))
  return {'loss_sum': jnp.sum(losses * mask), 'tokens': jnp.sum(mask), 'word_loss_sum': word_loss_sum,
          'word_count': word_count}


# ----------------------------------------------------------------------------------------------
# State creation and compiled steps
# ----------------------------------------------------------------------------------------------


def create_train_state(model, tx: optax.GradientTransformation, seed: int, image_size: int,
                       max_caption_len: int, mesh) -> TrainState:
  """Initialises straight into the replicated sharding (one compiled init, no host round trip)."""
  def init(rng):
    init_rng, state_rng = jax.random.split(rng)
    variables = captioner.init_variables(model, init_rng, image_size, max_caption_len)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
                      rng=state_rng)
  return jax.jit(init, out_shardings=mesh_lib.replicated(mesh))(jax.random.PRNGKey(seed))


def compile_train_step(logits_fn: LogitsFn, tx, mesh, *, skip_nonfinite: bool = False,
                       augment: BatchFn | None = None, image_table: jax.Array | None = None) -> Callable:
  """The train step `(state, batch) -> (state, metrics)`, jitted once with explicit shardings; the old
  state's buffers are donated. With `image_table` (already on the devices, replicated), the compiled
  step takes it as an argument (a constant would be copied into the program)."""
  replicated, batch = mesh_lib.replicated(mesh), mesh_lib.batch_sharded(mesh)
  step = functools.partial(train_step, logits_fn=logits_fn, tx=tx, skip_nonfinite=skip_nonfinite,
                           augment=augment)
  if image_table is None:
    return jax.jit(step, in_shardings=(replicated, batch), out_shardings=(replicated, replicated),
                   donate_argnums=(0,))
  compiled = jax.jit(step, in_shardings=(replicated, batch, replicated),
                     out_shardings=(replicated, replicated), donate_argnums=(0,))
  return lambda state, host_batch: compiled(state, host_batch, image_table)


def compile_eval_step(logits_fn: LogitsFn, mesh) -> Callable:
  replicated, batch = mesh_lib.replicated(mesh), mesh_lib.batch_sharded(mesh)
  return jax.jit(functools.partial(eval_step, logits_fn=logits_fn), in_shardings=(replicated, batch),
                 out_shardings=replicated)
