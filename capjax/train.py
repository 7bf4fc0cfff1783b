"""The training loop: a run built from a config, resumed from its workdir, stepped to the end.

The steps themselves are pure functions in `state.py`; this module owns what happens around them:
the data iterator, resuming, per-epoch validation, checkpoints, history and progress output.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import math
import os
import time
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh
import ml_collections
import optax

from capjax import checkpointing
from capjax import device_augment
from capjax import errors
from capjax import features
from capjax import inference
from capjax import input_pipeline
from capjax import mesh as mesh_lib
from capjax import pretrained
from capjax import progress
from capjax import scst
from capjax import state as state_lib
from capjax import vocab as vocab_lib
from capjax import workdir as workdir_lib
from capjax.data import prepare
from capjax.evaluation import captioning
from capjax.evaluation import content_score
from capjax.evaluation import loss as loss_lib
from capjax.models import captioner


@dataclasses.dataclass(frozen=True)
class TrainResult:
  """What a finished (or resumed-to-the-end) training run returns."""
  state: state_lib.TrainState
  history: list[dict]  # one record per epoch: step, train/val loss, metrics
  step_losses: dict[int, float]  # global step (1-based) -> training loss of that step, this process
  vocab: vocab_lib.Vocabulary
  model: nn.Module
  mesh: Mesh


@dataclasses.dataclass
class _Run:
  """Everything one training run holds besides the train state and the data iterator."""
  config: ml_collections.ConfigDict
  workdir: str
  vocab: vocab_lib.Vocabulary
  model: nn.Module
  mesh: Mesh
  splits: Mapping[str, Any]  # image sources (caption metrics)
  loss_sources: Mapping[str, Any]  # what the loss pipelines read: the images, or cached features
  pipeline: input_pipeline.PipelineConfig
  steps_per_epoch: int
  total_steps: int
  schedule: optax.Schedule
  train_fn_for_step: Callable[[int], Callable]
  eval_fn: Callable
  checkpointer: checkpointing.Checkpointer
  identity: dict  # config fields + vocabulary hash (workdir.run_identity), stored in every checkpoint
  writer: Any = None
  history: list[dict] = dataclasses.field(default_factory=list)
  config_changes: dict = dataclasses.field(default_factory=dict)  # allowed on resume; next epoch records
  optimizer_rebuilt: dict | None = None  # when a resume rebuilt the optimizer state; next epoch records
  # The loop's bookkeeping, kept in each checkpoint so a resumed run reports what an unbroken one would.
  epoch_loss_sum: float = 0.0
  epoch_loss_steps: int = 0
  nonfinite_steps: int = 0
  epoch_reward_sum: float = 0.0  # SCST: the epoch's summed mean sample rewards

  def run_info(self) -> dict:
    return {'identity': self.identity, 'epoch_loss_sum': self.epoch_loss_sum,
            'epoch_loss_steps': self.epoch_loss_steps, 'nonfinite_steps': self.nonfinite_steps,
            'epoch_reward_sum': self.epoch_reward_sum}

  def val_loss(self, state) -> loss_lib.SplitLoss:
    return loss_lib.split_loss(self.eval_fn, state, self.loss_sources['validation'], self.vocab,
                               self.pipeline, batch_size=self.config.train.eval_batch_size, mesh=self.mesh)


# What a resume carries over when the checkpoint's optimizer state has another structure.
_CARRIED_FIELDS = ('step', 'params', 'batch_stats', 'rng')
# The validation caption metrics an epoch records (every config.train.metrics_every_epochs epochs).
CAPTION_METRICS = ('bleu', 'cider')
_METRIC_KEYS = ('Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'CIDEr')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       splits: Mapping[str, Any] | None = None, *,
                       allow_config_change: Sequence[str] = ()) -> TrainResult:
  """Trains (resuming from `workdir` if it holds checkpoints) and validates each epoch.

  A resume must match the checkpoints' config and vocabulary, except for the fields named in
  `allow_config_change`. `splits` injects data sources (tests); by default the prepared tfds splits
  are opened."""
  config = workdir_lib.with_absolute_paths(config)
  checkpointing.check_best_metric(config.train.best_metric, config.train.best_mode)
  scst.check_config(config)
  if config.train.get('init_from'):
    config.train.init_from = os.path.abspath(os.path.expanduser(config.train.init_from))
  if config.train.best_metric not in ('', 'val_loss', 'train_loss') and not config.train.metrics_every_epochs:
    progress.say(f'Note: config.train.best_metric={config.train.best_metric!r} is never computed with '
                 "metrics_every_epochs=0, so 'best' is the latest checkpoint (best_metric='val_loss' "
                 'ranks by validation loss).')
  os.makedirs(workdir, exist_ok=True)
  with workdir_lib.training_lock(workdir):
    if splits is None:
      splits = prepare.open_dataset(config.data)
    vocab = workdir_lib.load_or_build_vocab(workdir, config.data, splits['train'])
    run, state = _new_run(config, workdir, splits, vocab)
    train_iter = input_pipeline.make_train_iterator(
        run.loss_sources['train'], vocab, run.pipeline,
        host_batch_size=mesh_lib.per_host_batch_size(config.train.batch_size, run.mesh),
        process_index=jax.process_index(), process_count=jax.process_count())
    state = _resume(run, state, train_iter, allow_config_change)
    # Only now, with the run going ahead, do the workdir's files change.
    workdir_lib.save_vocab(workdir, vocab)
    workdir_lib.save_config(workdir, config)
    run.writer = progress.make_writer(workdir)
    _complete_interrupted_epochs(run, state)
    return _train(run, state, train_iter)


def _train(run: '_Run', state, train_iter) -> TrainResult:
  config, workdir, vocab = run.config, run.workdir, run.vocab
  progress.say(f'Training {run.total_steps} steps ({run.steps_per_epoch} per epoch, global batch '
               f'{config.train.batch_size}, {run.mesh.devices.size} devices, vocabulary {len(vocab)}, '
               f'encoder {config.model.encoder_mode}, objective {_objective(config)}).')
  state, step_losses = _train_loop(run, state, train_iter)
  run.checkpointer.close()
  progress.close_writer(run.writer)
  if jax.process_index() == 0 and run.history:
    progress.plot_loss_curves(run.history, os.path.join(workdir, 'loss_curves.png'))
  return TrainResult(state=state, history=run.history, step_losses=step_losses, vocab=vocab,
                     model=run.model, mesh=run.mesh)


# ----------------------------------------------------------------------------------------------
# Building and resuming a run
# ----------------------------------------------------------------------------------------------


def _new_run(config, workdir: str, splits, vocab) -> tuple[_Run, state_lib.TrainState]:
  mesh = mesh_lib.make_mesh()
  model = captioner.build_captioner(config.model, len(vocab))
  # The one place that decides what the loss reads: images (from the host, or looked up in a table on
  # the devices), or (cached mode) pooled trunk features; and where the images are augmented.
  from_features = config.model.encoder_mode == 'cached'
  pipeline = input_pipeline.PipelineConfig.from_config(
      config, from_features=from_features,
      device_resident=not from_features and _device_resident(config, len(splits['train'])))
  if _objective(config) == 'scst':  # the reward looks up each example's references by image
    pipeline = dataclasses.replace(pipeline, image_index=True)
  steps_per_epoch = _steps_per_epoch(config, pipeline, len(splits['train']))
  total_steps = steps_per_epoch * config.train.num_epochs
  if config.train.max_steps:
    total_steps = min(total_steps, config.train.max_steps)
  frozen_steps = 0
  if config.model.encoder_mode == 'train':
    frozen_steps = int(config.train.frozen_epochs * steps_per_epoch)

  schedule = state_lib.make_schedule(config.train, steps_per_epoch, total_steps)
  tx = state_lib.make_optimizer(config.train, schedule, config.model.encoder_mode, frozen_steps)
  state = state_lib.create_train_state(model, tx, config.seed, config.data.image_size,
                                       config.data.max_caption_len, mesh)
  if config.model.encoder_init:
    state = _with_pretrained_trunk(state, config.model.encoder_init, mesh)
  checkpointer = checkpointing.Checkpointer(
      workdir_lib.checkpoint_dir(workdir), keep=config.train.keep_checkpoints,
      keep_best=config.train.keep_best_checkpoints, best_metric=config.train.best_metric,
      best_mode=config.train.best_mode)
  # Before the loss sources: in 'cached' mode the features are extracted with the initial trunk.
  starting = checkpointer.latest_step() is None
  if starting and config.train.get('init_from'):
    state = _with_init_from(state, config.train.init_from, vocab, mesh)
  logits_fn = state_lib.teacher_forced_logits(model, from_features=from_features)
  loss_sources = _loss_sources(config, pipeline, workdir, model, state, splits, mesh)
  step_options = dict(skip_nonfinite=config.train.skip_nonfinite_steps > 0)
  if pipeline.augment_on_device:
    step_options['augment'] = device_augment.make_batch_augmenter(pipeline.augment, pipeline.image_size,
                                                                  vocab)
  if pipeline.device_resident:
    step_options['image_table'] = jax.device_put(
        input_pipeline.image_table(loss_sources['train_images'], pipeline.stored_size),
        mesh_lib.replicated(mesh))
  if _objective(config) == 'scst':
    initialised = not starting or bool(config.train.get('init_from'))
    train_fn_for_step = _compiled_scst_step(config, vocab, model, logits_fn, tx, mesh, splits['train'],
                                            step_options, initialised=initialised)
  else:
    train_fn_for_step = _compiled_train_steps(config, vocab, logits_fn, tx, mesh, frozen_steps, step_options)
  run = _Run(
      config=config, workdir=workdir, vocab=vocab, model=model, mesh=mesh, splits=splits,
      loss_sources=loss_sources, pipeline=pipeline,
      steps_per_epoch=steps_per_epoch, total_steps=total_steps, schedule=schedule,
      train_fn_for_step=train_fn_for_step,
      eval_fn=state_lib.compile_eval_step(logits_fn, mesh),
      checkpointer=checkpointer,
      identity=workdir_lib.run_identity(config, vocab))
  return run, state


def _objective(config) -> str:
  return config.train.get('objective', 'xent')  # configs from before SCST: cross-entropy


def _with_init_from(state: state_lib.TrainState, init_from: str, vocab, mesh) -> state_lib.TrainState:
  """A new run's params and batch_stats from another workdir's best checkpoint (its latest without a
  best); the optimizer state, step and rng stay fresh. The other run must have this run's vocabulary
  and parameter shapes (ConfigMismatch otherwise)."""
  _, init_vocab, _, variables, step = inference.restore_variables(init_from, 'best', mesh)
  if init_vocab.fingerprint() != vocab.fingerprint():
    raise errors.ConfigMismatch(
        f'config.train.init_from={init_from}: its vocabulary ({len(init_vocab)} words, hash '
        f'{init_vocab.fingerprint()}) is not this run\'s ({len(vocab)} words, hash {vocab.fingerprint()}); '
        'the data or config.data.min_word_count differ')
  ours = jax.tree_util.tree_flatten_with_path(state.variables)[0]
  theirs = dict(jax.tree_util.tree_flatten_with_path(variables)[0])
  for path, leaf in ours:
    other = theirs.pop(path, None)
    if other is None or other.shape != leaf.shape:
      where = jax.tree_util.keystr(path)
      found = 'missing' if other is None else f'shape {other.shape}'
      raise errors.ConfigMismatch(
          f'config.train.init_from={init_from}: its model differs from this config\'s ({where}: '
          f'{leaf.shape} here, {found} there); init_from needs the same config.model')
  if theirs:
    raise errors.ConfigMismatch(
        f'config.train.init_from={init_from}: its model has parameters this config\'s lacks '
        f'({jax.tree_util.keystr(next(iter(theirs)))}); init_from needs the same config.model')
  progress.say(f'Initialised params and batch_stats from {init_from} (checkpoint {step}); the optimizer '
               'starts fresh.')
  return state.replace(params=variables['params'], batch_stats=variables['batch_stats'])


def _compiled_scst_step(config, vocab, model, logits_fn, tx, mesh, train_source, step_options: dict, *,
                        initialised: bool):
  """step -> the SCST step (capjax/scst.py), its CIDEr-D reward prepared once from the training
  references. The frozen warm-up needs no variant here: SCST runs the network in inference mode
  throughout, and the optimizer already holds the trunk's learning rate at 0 for those steps."""
  cfg = scst.ScstConfig.from_config(config)
  reward = scst.CaptionReward.from_source(train_source, vocab, reward_end=cfg.reward_end)
  scst.say_start(cfg, reward, initialised)
  step_fn = scst.compile_scst_step(model, logits_fn, tx, mesh, reward, cfg, **step_options)
  return lambda step: step_fn


def _resume(run: _Run, state: state_lib.TrainState, train_iter,
            allow_config_change: Sequence[str]) -> state_lib.TrainState:
  """The newest readable checkpoint's state (and the iterator's position, and the loop's bookkeeping),
  or `state` for a new run. Unreadable newer checkpoints are reported and set aside; a checkpoint of
  another config or vocabulary is refused (ConfigMismatch) unless the changed fields are allowed."""
  if run.checkpointer.latest_step() is None:
    set_aside = run.checkpointer.set_aside_steps()
    if set_aside:
      progress.say(f'Starting from step 0: {run.checkpointer.directory} holds no checkpoint; the '
                   f'unreadable ones of an earlier attempt (steps {set_aside}) are kept in '
                   f'{run.checkpointer.directory}_unreadable.')
    return state
  target = checkpointing.abstract_like(state, mesh_lib.replicated(run.mesh))

  def restore(step):
    info = run.checkpointer.run_info(step)
    changes = {}
    where = f'checkpoint {step} in {run.checkpointer.directory}'
    if info is None:
      progress.say(f'Checkpoint {step} predates run fingerprints: its config and vocabulary are '
                   'not checked.')
    else:
      changes = workdir_lib.check_resume(info['identity'], run.identity, allow_config_change, where=where)
    differing = run.checkpointer.differing_fields(step, target)
    if not differing:
      return run.checkpointer.restore(step, target, train_iter), info or {}, changes
    if differing != ['opt_state']:
      raise errors.ConfigMismatch(
          f'{where} holds {", ".join(differing)} of other shapes than this config builds (written by '
          'another model or capjax version); it is left as it is: train in a new workdir.')
    return _carry_over(run, state, target, step, train_iter, changes), info or {}, changes

  step, (state, info, changes) = run.checkpointer.restore_first_readable(
      run.checkpointer.candidates('latest'), restore, set_aside=True)
  run.history[:] = [h for h in workdir_lib.load_history(run.workdir) if h['step'] <= step]
  run.config_changes = changes
  run.epoch_loss_sum = info.get('epoch_loss_sum', 0.0)
  run.epoch_loss_steps = info.get('epoch_loss_steps', 0)
  run.nonfinite_steps = info.get('nonfinite_steps', 0)
  run.epoch_reward_sum = info.get('epoch_reward_sum', 0.0)
  changed = f' with config changes {changes}' if changes else ''
  progress.say(f'Resumed from step {step} in {run.workdir}{changed}.')
  return state


def _carry_over(run: _Run, state, target, step: int, train_iter, changes: dict) -> state_lib.TrainState:
  """Checkpoint `step` into a state whose optimizer is built differently (an allowed change of
  encoder_lr_factor or frozen_epochs, or another capjax version): params, batch_stats, step, rng and the
  data position carry over; the optimizer's moments start from zero, its schedules go on from `step`."""
  carried = run.checkpointer.restore_fields(step, {k: getattr(target, k) for k in _CARRIED_FIELDS},
                                            train_iter)
  why = (f'the config changes {sorted(changes)} build another optimizer' if changes else
         "this capjax builds the optimizer differently from the checkpoint's")
  run.optimizer_rebuilt = {'at_step': step, 'why': why}
  progress.say(f"Checkpoint {step}: {why}; params, batch_stats, step and the data position carried over, "
               "the optimizer's moments start from zero (its learning-rate schedule goes on).")
  return state.replace(**carried, opt_state=state_lib.continue_schedules(state.opt_state, step))


def _steps_per_epoch(config, pipeline: input_pipeline.PipelineConfig, num_train_images: int) -> int:
  examples = input_pipeline.num_train_examples(num_train_images, pipeline)
  steps = examples // config.train.batch_size
  if steps < 1:
    raise ValueError(f'config.train.batch_size={config.train.batch_size} is larger than the '
                     f'{examples} training examples of one epoch')
  return steps


def _device_resident(config, num_images: int) -> bool:
  """Whether the training images go to the devices once (config.data.device_resident), as one uint8
  array at the store size: only when it fits in `device_resident_max_gb` (and in a third of a device's
  memory where the device reports it); otherwise the host feeds them, with a line saying why."""
  if not config.data.device_resident:
    return False
  size = config.data.store_size or config.data.image_size
  needed = num_images * size * size * 3
  limit = config.data.device_resident_max_gb * 2**30
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'bytes_limit' in stats:
    limit = min(limit, stats['bytes_limit'] / 3)
  if needed > limit:
    progress.say(f'Device-resident data off: the training images need {needed / 2**30:.2f} GiB at '
                 f'{size} px, over the limit of {limit / 2**30:.2f} GiB; the host feeds them instead.')
    return False
  progress.say(f'Device-resident data: {num_images} training images, {needed / 2**20:.0f} MiB at {size} px.')
  return True


def _with_pretrained_trunk(state: state_lib.TrainState, path: str, mesh) -> state_lib.TrainState:
  """Puts imported ImageNet trunk weights into a fresh state (Adam moments start at zero either way)."""
  variables = pretrained.load_encoder_init(os.path.expanduser(path), state.variables)
  progress.say(f'Initialised the ResNet trunk from {path}.')
  return state.replace(params=mesh_lib.tree_replicate(variables['params'], mesh),
                       batch_stats=mesh_lib.tree_replicate(variables['batch_stats'], mesh))


def _loss_sources(config, pipeline, workdir, model, state, splits, mesh) -> dict:
  """What the loss pipelines read: image sources (decoded once when cached); with device-resident
  data, the training captions alone (+ 'train_images' for building the table); in 'cached' mode,
  cached pooled features with the same captions. The trunk is fixed in that mode, so the state before
  a restore already has the checkpoint's trunk."""
  if not pipeline.from_features:
    sources = dict(splits)
    if config.data.cache_images_min_side:
      sources = {split: input_pipeline.DecodedImageCache(source, config.data.cache_images_min_side)
                 for split, source in splits.items()}
    if pipeline.device_resident:
      sources['train_images'] = sources['train']
      sources['train'] = input_pipeline.CaptionsOnly(splits['train'])
    return sources
  if not config.model.encoder_init:
    progress.say('encoder_mode=cached without encoder_init: the cached features come from a '
                 'randomly initialised trunk.')
  sources = {}
  for split in ('train', 'validation'):
    rows = features.load_or_extract(
        workdir, split, model, state.variables, splits[split], mesh, image_size=config.data.image_size,
        batch_size=config.train.eval_batch_size, reextract=config.model.reextract_features)
    sources[split] = features.FeatureSource(rows, splits[split])
  return sources


def _compiled_train_steps(config, vocab, logits_fn, tx, mesh, frozen_steps: int, step_options: dict):
  """step -> compiled train step: during the frozen warm-up, a variant whose trunk is frozen (no
  gradient, BatchNorm in inference mode); the same parameters either way."""
  train_fn = state_lib.compile_train_step(logits_fn, tx, mesh, **step_options)
  if not frozen_steps:
    return lambda step: train_fn
  warmup_model = captioner.build_captioner(config.model, len(vocab), trunk_mode='frozen')
  warmup_fn = state_lib.compile_train_step(state_lib.teacher_forced_logits(warmup_model), tx, mesh,
                                           **step_options)
  return lambda step: warmup_fn if step < frozen_steps else train_fn


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def _draw_batches(iterator, count: int):
  """Pulls `count` host batches, each with the iterator state right after it (for exact resume)."""
  for _ in range(count):
    batch = next(iterator)
    yield batch, iterator.get_state()


def _epoch_end(run: _Run, state, epoch: int, data_state) -> dict[str, float]:
  """Validation loss, then the checkpoint (the epoch is safe from here on), then caption metrics: a
  failing metric costs a warning and a missing value, never the epoch. Returns the seconds each part
  took (time outside the train step, which decides an epoch's wall clock on a fast accelerator)."""
  cfg = run.config
  step = int(state.step)
  seconds, clock = {}, time.perf_counter()

  def lap(part: str) -> None:
    nonlocal clock
    now = time.perf_counter()
    seconds[part], clock = now - clock, now

  val_loss = run.val_loss(state)
  lap('val loss')
  record = {'epoch': epoch, 'step': step,
            'train_loss': run.epoch_loss_sum / max(run.epoch_loss_steps, 1) if run.epoch_loss_steps
            else float('nan'), 'val_loss': val_loss.mean}
  if cfg.data.name == 'shapes':  # the demo's captions are about known words: which has it not learnt?
    record['val_loss_by_word'] = val_loss.by_word_class(run.vocab, content_score.WORD_CLASSES)
  if _objective(cfg) == 'scst':  # 'train_loss' is then SCST's surrogate loss; the reward says more
    record['train_reward'] = (run.epoch_reward_sum / run.epoch_loss_steps if run.epoch_loss_steps
                              else float('nan'))
  if run.config_changes:
    record['config_changes'] = run.config_changes
    run.config_changes = {}
  if run.optimizer_rebuilt:
    record['optimizer_rebuilt'] = run.optimizer_rebuilt
    run.optimizer_rebuilt = None
  run.epoch_loss_sum, run.epoch_loss_steps, run.epoch_reward_sum = 0.0, 0, 0.0
  run.checkpointer.save(step, state, data_state, run.run_info())
  run.history.append(record)
  workdir_lib.save_history(run.workdir, run.history)
  lap('checkpoint')
  if _metrics_due(run, record):
    _add_caption_metrics(run, record, state.variables)
    lap('caption metrics')
  run.checkpointer.record_metrics(step, record)
  progress.log_epoch(record, run.writer, overhead=seconds)
  return seconds


def _metrics_due(run: _Run, record: dict) -> bool:
  """Whether an epoch's record is to hold validation caption metrics (config.train.metrics_every_epochs,
  and always the last epoch)."""
  every = run.config.train.metrics_every_epochs
  return bool(every) and (record['epoch'] % every == 0 or record['step'] >= run.total_steps)


def _add_caption_metrics(run: _Run, record: dict, variables) -> None:
  """Validation BLEU/CIDEr of the epoch's checkpoint into its record (history.json is rewritten); a
  failure is a warning and a 'metrics_error' in the record, never a lost epoch."""
  cfg = run.config
  try:
    record.update(captioning.validation_metrics(
        run.model, variables, run.vocab, run.splits['validation'], run.mesh, cfg,
        metrics=CAPTION_METRICS, max_images=cfg.train.metrics_num_images))
  except Exception as e:  # pylint: disable=broad-except  (metrics must not cost the epoch)
    progress.say(f"Warning: epoch {record['epoch']}: caption metrics failed and are left out "
                 f"({type(e).__name__}: {e}); checkpoint {record['step']} is saved.")
    record['metrics_error'] = f'{type(e).__name__}: {e}'
  workdir_lib.save_history(run.workdir, run.history)


def _complete_interrupted_epochs(run: _Run, state) -> None:
  """A run killed between an epoch's checkpoint and the end of its metrics left that epoch without
  caption metrics, or without its metrics recorded for choosing the best checkpoint. Both are made up
  now, from the checkpoint itself, so that kill + rerun keeps the checkpoints and picks the best one
  exactly as an unbroken run does."""
  on_disk = set(run.checkpointer.all_steps())
  for record in run.history:
    step = record['step']
    if step not in on_disk:
      continue
    missing = _metrics_due(run, record) and not any(k in record for k in (*_METRIC_KEYS, 'metrics_error'))
    if missing:
      progress.say(f"Epoch {record['epoch']} (checkpoint {step}) has no caption metrics: the run was "
                   'stopped while computing them. Computing them now.')
      variables = state.variables if step == int(state.step) else _checkpoint_variables(run, state, step)
      _add_caption_metrics(run, record, variables)
      progress.log_epoch(record, run.writer)
    if missing or not run.checkpointer.has_metrics(step):
      run.checkpointer.record_metrics(step, record)


def _checkpoint_variables(run: _Run, state, step: int) -> dict:
  target = checkpointing.abstract_like(state.variables, mesh_lib.replicated(run.mesh))
  return run.checkpointer.restore_variables(step, target)


def _train_loop(run: _Run, state, train_iter) -> tuple[state_lib.TrainState, dict[int, float]]:
  """Steps from `state.step` to the end; returns the final state and {step: loss} of the steps run.

  Metrics come back from the devices only at log time and before every checkpoint; a NaN/Inf loss or
  gradient norm among them stops the run (after `skip_nonfinite_steps` skipped steps in all) before
  anything non-finite is saved."""
  cfg = run.config
  start_step = int(state.step)
  progress_line = progress.Progress(run.total_steps, start_step, cfg.train.batch_size, run.steps_per_epoch)
  pending, step_losses = [], {}

  def fetch(step):  # the host never waits on each step: metrics are fetched in groups
    nonlocal pending
    fetched, pending = jax.device_get(pending), []
    for offset, metrics in enumerate(fetched):
      which = step - len(fetched) + 1 + offset
      loss, grad_norm = float(metrics['loss']), float(metrics['grad_norm'])
      if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        _count_nonfinite(run, which, loss, grad_norm)
        continue
      run.epoch_loss_sum += loss
      run.epoch_loss_steps += 1
      run.epoch_reward_sum += float(metrics.get('reward', 0.0))
      step_losses[which] = loss
    return [m for m in fetched if math.isfinite(float(m['loss']))]

  # Batches go to the devices one step ahead: the copy (and the next host batch) overlap the step.
  batches = mesh_lib.prefetch_to_mesh(
      _draw_batches(train_iter, run.total_steps - start_step), run.mesh, size=1)
  for step, (batch, data_state) in zip(range(start_step, run.total_steps), batches):
    state, metrics = run.train_fn_for_step(step)(state, batch)
    pending.append(metrics)
    if (step + 1) % cfg.train.log_every_steps == 0 or step + 1 == run.total_steps:
      progress_line.update(step + 1, fetch(step + 1), run.schedule(step), run.writer)
    if (step + 1) % run.steps_per_epoch == 0 or step + 1 == run.total_steps:
      fetch(step + 1)
      overhead = _epoch_end(run, state, -(-(step + 1) // run.steps_per_epoch), data_state)
      progress_line.restart_clock(step + 1, epoch_end_seconds=sum(overhead.values()))
    elif cfg.train.checkpoint_every_steps and (step + 1) % cfg.train.checkpoint_every_steps == 0:
      fetch(step + 1)
      run.checkpointer.save(step + 1, state, data_state, run.run_info())
  return state, step_losses


def _count_nonfinite(run: _Run, step: int, loss: float, grad_norm: float) -> None:
  run.nonfinite_steps += 1
  allowed = run.config.train.skip_nonfinite_steps
  if run.nonfinite_steps <= allowed:
    progress.say(f'Warning: step {step}: loss {loss}, gradient norm {grad_norm}; the update was '
                 f'skipped ({run.nonfinite_steps} of {allowed} allowed).')
    return
  saved = run.checkpointer.latest_step()
  raise errors.TrainingDiverged(
      f'training diverged at step {step}: loss {loss}, gradient norm {grad_norm}. Nothing after '
      f'{"checkpoint " + str(saved) if saved is not None else "the start"} was saved. Lower '
      'config.train.learning_rate (or raise warmup_epochs), or let up to N such steps be skipped with '
      'config.train.skip_nonfinite_steps=N.')
