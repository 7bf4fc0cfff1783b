"""Pure train/eval steps, state creation, and the sharded, resumable training loop."""

from collections.abc import Callable, Mapping
import dataclasses
import functools
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from capjax import checkpointing
from capjax import input_pipeline
from capjax import mesh as mesh_lib
from capjax import reporting
from capjax import vocab as vocab_lib
from capjax import workdir as workdir_lib
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


# ----------------------------------------------------------------------------------------------
# Pure steps
# ----------------------------------------------------------------------------------------------


def token_cross_entropy(logits, tokens, example_weight=None):
  """Sum of next-token cross-entropies over real (non-<PAD>) targets, and how many there were.
  `logits[:, t]` predicts `tokens[:, t + 1]` (see models/captioner.py)."""
  targets = tokens[:, 1:]
  mask = (targets != vocab_lib.PAD_ID).astype(jnp.float32)
  if example_weight is not None:
    mask = mask * example_weight[:, None]
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return jnp.sum(losses * mask), jnp.sum(mask)


def _apply_model(model, variables, batch, **kwargs):
  """Teacher-forced logits from images, or from cached pooled trunk features ('cached' mode)."""
  if 'features' in batch:
    return model.apply(variables, batch['features'], batch['tokens'][:, :-1],
                       method=model.decode_from_features, **kwargs)
  return model.apply(variables, batch['image'], batch['tokens'][:, :-1], **kwargs)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step on a (globally sharded) batch; BatchNorm statistics are over the global batch."""
  step_rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    logits, updates = _apply_model(model, {'params': params, 'batch_stats': state.batch_stats}, batch,
                                   train=True, mutable=['batch_stats'], rngs={'dropout': step_rng})
    loss_sum, count = token_cross_entropy(logits, batch['tokens'])
    return loss_sum / jnp.maximum(count, 1.0), (updates['batch_stats'], count)

  (loss, (batch_stats, count)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            batch_stats=batch_stats, opt_state=opt_state)
  return new_state, {'loss': loss, 'tokens': count, 'grad_norm': optax.tree.norm(grads)}


def eval_step(state: TrainState, batch: Mapping[str, jax.Array], *, model: nn.Module) -> dict:
  """Summed loss and token count; examples with weight 0 (batch padding) do not count."""
  logits = _apply_model(model, state.variables, batch, train=False)
  loss_sum, count = token_cross_entropy(logits, batch['tokens'], batch['weight'])
  return {'loss_sum': loss_sum, 'tokens': count}


# ----------------------------------------------------------------------------------------------
# State creation and compiled steps
# ----------------------------------------------------------------------------------------------


def init_variables(model: nn.Module, rng, image_size: int, max_caption_len: int):
  images = jnp.zeros((1, image_size, image_size, 3), jnp.uint8)
  tokens = jnp.zeros((1, max_caption_len - 1), jnp.int32)
  return model.init({'params': rng}, images, tokens, train=False)


def _state_initializer(model: nn.Module, tx: optax.GradientTransformation, image_size: int,
                       max_caption_len: int) -> Callable[[jax.Array], TrainState]:
  def init(rng):
    init_rng, state_rng = jax.random.split(rng)
    variables = init_variables(model, init_rng, image_size, max_caption_len)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
                      rng=state_rng)
  return init


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, seed: int, image_size: int,
                       max_caption_len: int, mesh) -> TrainState:
  """Initialises straight into the replicated sharding (one compiled init, no host round trip)."""
  init = _state_initializer(model, tx, image_size, max_caption_len)
  return jax.jit(init, out_shardings=mesh_lib.replicated(mesh))(jax.random.PRNGKey(seed))


def abstract_train_state(config, model: nn.Module, mesh) -> TrainState:
  """Shapes, dtypes and (replicated) shardings of the train state a config trains: the restore
  target for evaluation, whatever the device count the checkpoint was written with."""
  tx = make_optimizer(config.train, lambda step: 0.0, config.model.encoder_mode)
  init = _state_initializer(model, tx, config.data.image_size, config.data.max_caption_len)
  shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
  return checkpointing.abstract_like(shapes, mesh_lib.replicated(mesh))


def compile_train_step(model, tx, mesh) -> Callable:
  """The train step, jitted once with explicit shardings; the old state's buffers are donated."""
  replicated, batch = mesh_lib.replicated(mesh), mesh_lib.batch_sharded(mesh)
  return jax.jit(functools.partial(train_step, model=model, tx=tx), in_shardings=(replicated, batch),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def compile_eval_step(model, mesh) -> Callable:
  replicated, batch = mesh_lib.replicated(mesh), mesh_lib.batch_sharded(mesh)
  return jax.jit(functools.partial(eval_step, model=model), in_shardings=(replicated, batch),
                 out_shardings=replicated)


def split_loss(config, vocab, eval_fn, state, source, mesh) -> float:
  """Mean next-token loss over every (image, caption) pair of `source`."""
  batches = input_pipeline.eval_pair_batches(
      source, vocab, image_size=config.data.image_size, max_caption_len=config.data.max_caption_len,
      host_batch_size=mesh_lib.check_batch_size(config.train.eval_batch_size, mesh, 'eval_batch_size'),
      captions_per_image=config.data.captions_per_image, process_index=jax.process_index(),
      process_count=jax.process_count())
  return evaluate_loss(eval_fn, state, batches, mesh)


def evaluate_loss(eval_fn, state, batches, mesh) -> float:
  """Mean next-token loss over every (image, caption) pair of a split."""
  totals = []
  for batch, _ in mesh_lib.prefetch_to_mesh(((b, None) for b in batches), mesh):
    totals.append(eval_fn(state, batch))
  totals = jax.device_get(totals)
  loss_sum = sum(float(t['loss_sum']) for t in totals)
  tokens = sum(float(t['tokens']) for t in totals)
  return loss_sum / max(tokens, 1.0)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Run:
  """Everything the loop needs that does not change during training."""
  config: Any
  workdir: str
  vocab: Any
  model: Any
  mesh: Any
  splits: Any  # image sources (captioning metrics)
  loss_sources: Any  # what the loss pipelines read: the images, or cached features
  steps_per_epoch: int
  total_steps: int


def _steps_per_epoch(config, num_train_images: int) -> int:
  pairs = input_pipeline.num_train_pairs(num_train_images, config.data.captions_per_image,
                                         config.data.random_caption)
  steps = pairs // config.train.batch_size
  if steps < 1:
    raise ValueError(f'config.train.batch_size={config.train.batch_size} is larger than the '
                     f'{pairs} training pairs of one epoch')
  return steps


def _train_iterator(run: _Run):
  cfg = run.config
  return input_pipeline.make_train_iterator(
      run.loss_sources['train'], run.vocab, image_size=cfg.data.image_size,
      max_caption_len=cfg.data.max_caption_len,
      host_batch_size=mesh_lib.check_batch_size(cfg.train.batch_size, run.mesh),
      captions_per_image=cfg.data.captions_per_image, augment=input_pipeline.AugmentConfig.from_config(
          cfg.data.augment), seed=cfg.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), num_workers=cfg.data.num_workers,
      random_caption=cfg.data.random_caption, read_threads=cfg.data.read_threads,
      prefetch_batches=cfg.data.prefetch_batches)


def _draw_batches(iterator, count: int):
  """Pulls `count` host batches, each with the iterator state right after it (for exact resume)."""
  for _ in range(count):
    batch = next(iterator)
    yield batch, iterator.get_state()


def _epoch_end(run: _Run, state, eval_fn, epoch: int, train_loss: float, checkpointer, history,
               data_state, writer) -> None:
  cfg = run.config
  record = {'epoch': epoch, 'step': int(state.step), 'train_loss': train_loss,
            'val_loss': split_loss(cfg, run.vocab, eval_fn, state, run.loss_sources['validation'],
                                   run.mesh)}
  every = cfg.train.metrics_every_epochs
  if every and (epoch % every == 0 or int(state.step) >= run.total_steps):
    from capjax import evaluation  # pylint: disable=g-import-not-at-top
    scores = evaluation.caption_metrics_for_split(
        run.model, state, run.vocab, run.splits['validation'], run.mesh, cfg,
        metrics=('bleu', 'cider'), max_images=cfg.train.metrics_num_images)
    record.update(scores)
  history.append(record)
  checkpointer.save(int(state.step), state, data_state, metrics=record)
  workdir_lib.save_history(run.workdir, history)
  reporting.log_epoch(record, writer)


def _with_pretrained_trunk(state: TrainState, path: str, mesh) -> TrainState:
  """Puts imported ImageNet trunk weights into a fresh state (Adam moments start at zero either way)."""
  from capjax import pretrained  # pylint: disable=g-import-not-at-top  (torch is optional)
  variables = pretrained.load_encoder_init(
      os.path.expanduser(path), state.variables)
  reporting.say(f'Initialised the ResNet trunk from {path}.')
  return state.replace(params=mesh_lib.tree_replicate(variables['params'], mesh),
                       batch_stats=mesh_lib.tree_replicate(variables['batch_stats'], mesh))


def _loss_sources(config, workdir, model, state, splits, mesh) -> dict:
  """Image sources, or in 'cached' mode cached pooled features with the same captions. The trunk is
  fixed in that mode, so the state before a restore already has the checkpoint's trunk."""
  if config.model.encoder_mode != 'cached':
    if config.data.cache_images_min_side:
      return {split: input_pipeline.DecodedImageCache(source, config.data.cache_images_min_side)
              for split, source in splits.items()}
    return splits
  from capjax import features  # pylint: disable=g-import-not-at-top
  if not config.model.encoder_init:
    reporting.say('encoder_mode=cached without encoder_init: the cached features come from a '
                  'randomly initialised trunk.')
  variables = state.variables
  sources = {}
  for split in ('train', 'validation'):
    rows = features.load_or_extract(
        workdir, split, model, variables, splits[split], mesh, image_size=config.data.image_size,
        batch_size=config.train.eval_batch_size, reextract=config.model.reextract_features)
    sources[split] = features.FeatureSource(rows, splits[split])
  return sources


def _compiled_train_steps(config, vocab, model, tx, mesh, frozen_steps: int):
  """step -> compiled train step: during the frozen warm-up, a variant whose trunk is frozen (no
  gradient, BatchNorm in inference mode); the same parameters either way."""
  train_fn = compile_train_step(model, tx, mesh)
  if not frozen_steps:
    return lambda step: train_fn
  warmup_model = captioner.build_captioner(config.model, len(vocab), trunk_mode='frozen')
  warmup_fn = compile_train_step(warmup_model, tx, mesh)
  return lambda step: warmup_fn if step < frozen_steps else train_fn


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       splits: Mapping[str, Any] | None = None) -> dict:
  """Trains (resuming from `workdir` if it holds checkpoints), evaluates, returns the final summary.

  `splits` injects data sources (tests); by default the prepared tfds splits are opened."""
  os.makedirs(workdir, exist_ok=True)
  if splits is None:
    from capjax.data import sources  # pylint: disable=g-import-not-at-top
    splits = sources.open_dataset(config.data)
  vocab = workdir_lib.load_or_build_vocab(workdir, config.data, splits['train'])
  workdir_lib.save_config(workdir, config)
  mesh = mesh_lib.make_mesh()
  model = captioner.build_captioner(config.model, len(vocab))
  steps_per_epoch = _steps_per_epoch(config, len(splits['train']))
  total_steps = steps_per_epoch * config.train.num_epochs
  if config.train.max_steps:
    total_steps = min(total_steps, config.train.max_steps)
  frozen_steps = 0
  if config.model.encoder_mode == 'train':
    frozen_steps = int(config.train.frozen_epochs * steps_per_epoch)

  schedule = make_schedule(config.train, steps_per_epoch, total_steps)
  tx = make_optimizer(config.train, schedule, config.model.encoder_mode, frozen_steps)
  state = create_train_state(model, tx, config.seed, config.data.image_size,
                             config.data.max_caption_len, mesh)
  if config.model.encoder_init:
    state = _with_pretrained_trunk(state, config.model.encoder_init, mesh)
  run = _Run(config, workdir, vocab, model, mesh, splits,
             _loss_sources(config, workdir, model, state, splits, mesh), steps_per_epoch, total_steps)
  train_fn_for_step = _compiled_train_steps(config, vocab, model, tx, mesh, frozen_steps)
  eval_fn = compile_eval_step(model, mesh)
  train_iter = _train_iterator(run)
  checkpointer = checkpointing.Checkpointer(
      workdir_lib.checkpoint_dir(workdir), keep=config.train.keep_checkpoints,
      keep_best=config.train.keep_best_checkpoints, best_metric=config.train.best_metric,
      best_mode=config.train.best_mode)
  history = []
  if checkpointer.latest_step() is not None:
    step = checkpointer.latest_step()
    state = checkpointer.restore(step, checkpointing.abstract_like(state, mesh_lib.replicated(mesh)),
                                 train_iter)
    history = [h for h in workdir_lib.load_history(workdir) if h['step'] <= step]
    reporting.say(f'Resumed from step {step} in {workdir}.')

  writer = reporting.make_writer(workdir)
  reporting.say(f'Training {total_steps} steps ({steps_per_epoch} per epoch, global batch '
                f'{config.train.batch_size}, {mesh.devices.size} devices, vocabulary {len(vocab)}, '
                f'encoder {config.model.encoder_mode}).')
  step_losses = _train_loop(run, state, train_fn_for_step, eval_fn, train_iter, checkpointer, history,
                            writer, schedule)
  state = step_losses.pop('state')
  checkpointer.close()
  reporting.close_writer(writer)
  if jax.process_index() == 0 and history:
    reporting.plot_loss_curves(history, os.path.join(workdir, 'loss_curves.png'))
  return {'state': state, 'history': history, 'vocab': vocab, 'model': model, 'mesh': mesh,
          'step_losses': step_losses}


def _train_loop(run: _Run, state, train_fn_for_step, eval_fn, train_iter, checkpointer, history,
                writer, schedule) -> dict:
  """Steps from `state.step` to the end; returns {step: loss} and the final state under 'state'."""
  cfg = run.config
  start_step = int(state.step)
  progress = reporting.Progress(run.total_steps, start_step, cfg.train.batch_size)
  pending, epoch_losses, step_losses = [], [], {}

  def fetch(step):  # metrics are fetched at log time only: the host never waits on each step
    nonlocal pending
    fetched, pending = jax.device_get(pending), []
    losses = [float(m['loss']) for m in fetched]
    epoch_losses.extend(losses)
    step_losses.update(zip(range(step - len(losses) + 1, step + 1), losses))
    return fetched

  # Batches go to the devices one step ahead: the copy (and the next host batch) overlap the step.
  batches = mesh_lib.prefetch_to_mesh(
      _draw_batches(train_iter, run.total_steps - start_step), run.mesh, size=1)
  for step, (batch, data_state) in zip(range(start_step, run.total_steps), batches):
    state, metrics = train_fn_for_step(step)(state, batch)
    pending.append(metrics)
    if (step + 1) % cfg.train.log_every_steps == 0 or step + 1 == run.total_steps:
      progress.update(step + 1, fetch(step + 1), schedule(step), writer)
    if (step + 1) % run.steps_per_epoch == 0 or step + 1 == run.total_steps:
      fetch(step + 1)
      epoch = -(-(step + 1) // run.steps_per_epoch)
      train_loss = float(np.mean(epoch_losses)) if epoch_losses else float('nan')
      _epoch_end(run, state, eval_fn, epoch, train_loss, checkpointer, history, data_state, writer)
      epoch_losses.clear()
      progress.restart_clock(step + 1)
    elif cfg.train.checkpoint_every_steps and (step + 1) % cfg.train.checkpoint_every_steps == 0:
      checkpointer.save(step + 1, state, data_state)
  return {**step_losses, 'state': state}

