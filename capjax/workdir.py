"""What a workdir holds besides checkpoints: config, vocabulary, history, the lock; and what identifies a run.

    <workdir>/config.json       the config of the run (paths absolute; eval/caption need nothing else)
    <workdir>/vocab.json        the vocabulary (readable JSON)
    <workdir>/history.json      per-epoch train/val loss and metrics
    <workdir>/checkpoints/      orbax checkpoints (capjax/checkpointing.py)
    <workdir>/train.lock        held by the training process (its pid, host and start time inside)
    <workdir>/tensorboard/      TensorBoard scalars
    <workdir>/loss_curves.png   train vs validation loss

A run's identity is its config minus the fields that only steer how it runs (logging, checkpoint
retention, paths, eval batch size...) plus the content hash of its vocabulary. Every checkpoint stores it;
resuming with a different identity is refused with the list of changed fields, unless the user allows
those fields to change (`--allow_config_change`), which the history then records.
"""

from collections.abc import Iterable
import contextlib
import datetime
import fcntl
import json
import os
import socket

from absl import logging
import jax
import ml_collections

from capjax import errors
from capjax import fileio
from capjax import vocab as vocab_lib
from capjax.data import records as records_lib


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, 'checkpoints')


def with_absolute_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config with its data paths made absolute, so eval and caption find the same data whatever
  directory they are started from."""
  for field in ('data_dir', 'manual_dir'):
    value = config.data[field]
    if value:
      config.data[field] = os.path.abspath(os.path.expanduser(value))
  return config


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  if jax.process_index() == 0:
    fileio.write_json(os.path.join(workdir, 'config.json'), config.to_dict())


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: is {workdir} a capjax training workdir?')
  config = ml_collections.ConfigDict(fileio.read_json(path))
  # JSON turns tuples into lists; the model wants tuples.
  config.model.stage_sizes = tuple(config.model.stage_sizes)
  return config


def vocab_path(workdir: str) -> str:
  return os.path.join(workdir, 'vocab.json')


def load_or_build_vocab(workdir: str, data_config, train_source) -> vocab_lib.Vocabulary:
  """Reuses `<workdir>/vocab.json` (a resumed run must not change the vocabulary); otherwise builds
  it from the training captions. Saving it is the caller's (once the run is known to go ahead)."""
  path = vocab_path(workdir)
  if os.path.exists(path):
    vocab = vocab_lib.Vocabulary.load(path)
    if vocab.min_count != data_config.min_word_count:
      raise ValueError(f'{path} was built with min_count={vocab.min_count} but '
                       f'config.data.min_word_count={data_config.min_word_count}; use a new workdir')
    return vocab
  captions = records_lib.all_captions(train_source)  # the split's captions file: no image is read
  vocab = vocab_lib.build_vocabulary(captions, data_config.min_word_count)
  truncated = vocab_lib.count_truncated(captions, data_config.max_caption_len)
  logging.info('Vocabulary: %d words (min count %d) from %d training captions; %d captions longer '
               'than max_caption_len=%d are truncated.', len(vocab), vocab.min_count, len(captions),
               truncated, data_config.max_caption_len)
  print(f'Vocabulary: {len(vocab)} tokens (4 specials + words seen >= {vocab.min_count} times in '
        f'{len(captions)} training captions); {truncated} captions truncated to '
        f'{data_config.max_caption_len} tokens.', flush=True)
  return vocab


def save_vocab(workdir: str, vocab: vocab_lib.Vocabulary) -> None:
  if jax.process_index() == 0:
    vocab.save(vocab_path(workdir))


def load_vocab(workdir: str) -> vocab_lib.Vocabulary:
  return vocab_lib.Vocabulary.load(vocab_path(workdir))


def save_history(workdir: str, history: list[dict]) -> None:
  if jax.process_index() == 0:
    fileio.write_json(os.path.join(workdir, 'history.json'), history)


def load_history(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'history.json')
  if not os.path.exists(path):
    return []
  return fileio.read_json(path)


# ----------------------------------------------------------------------------------------------
# Run identity
# ----------------------------------------------------------------------------------------------

# Fields that steer how a run goes, not what it computes: they may differ when it resumes.
OPERATIONAL_FIELDS = frozenset({
    'data.data_dir', 'data.manual_dir', 'data.layout', 'data.read_threads', 'data.prefetch_batches',
    'model.reextract_features', 'model.encoder_init', 'train.log_every_steps',
    'train.checkpoint_every_steps', 'train.keep_checkpoints', 'train.keep_best_checkpoints',
    'train.best_metric', 'train.best_mode', 'train.metrics_every_epochs', 'train.metrics_num_images',
    'train.eval_batch_size', 'train.skip_nonfinite_steps',
    # Where the (same) training images come from: the host or a table on the devices.
    'data.device_resident', 'data.device_resident_max_gb',
})
# Fields a resumed run can never change, even when allowed: what the step structure, the data a step
# reads and the parameter shapes are made of. A new workdir is the way to change these.
_CHANGEABLE_PREFIXES = ('train.', 'data.augment.', 'model.dtype', 'model.lstm_unroll')
_FIXED_TRAIN_FIELDS = frozenset({'train.batch_size'})
# Fields added to the config after runs were saved, each with the value that does what those older runs
# did (the value the code assumes when a config lacks the field). A checkpoint's identity without the
# field matches a config that holds this value.
ABSENT_IN_OLDER_RUNS = {
    'data.seq_per_img': 1, 'data.augment.on_device': False, 'data.store_size': 0,
    'data.shapes_object_scale': 1.0, 'model.decoder': 'seed', 'model.word_loss_weight': 0.0,
    'model.attention_dim': 256, 'model.attention_dropout': 0.5, 'model.attention_grid': 0,
    'model.attention_regularizer': 1.0, 'model.attention_cell_positions': False,
    'model.attention_query_word': False, 'model.attention_deep_output': False,
    'model.attention_location': False, 'model.word_loss_pooling': 'mean', 'train.init_from': '',
    'train.objective': 'xent', 'train.scst_baseline': 'greedy', 'train.scst_reward_end': True,
    'train.scst_samples': 5, 'train.scst_temperature': 1.0,
}


def _flatten(tree: dict, prefix: str = '') -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def run_identity(config: ml_collections.ConfigDict, vocab: vocab_lib.Vocabulary) -> dict:
  """What defines a run: its config fields (JSON values) and its vocabulary's content hash."""
  fields = json.loads(json.dumps(_flatten(config.to_dict())))  # tuples -> lists, as stored
  return {'config': {k: v for k, v in sorted(fields.items()) if k not in OPERATIONAL_FIELDS},
          'vocabulary': {'size': len(vocab), 'sha256': vocab.fingerprint()}}


def check_vocabulary(saved: dict, current: dict, *, where: str) -> None:
  """ConfigMismatch unless two run identities have the same vocabulary (size and content hash)."""
  was, now = saved['vocabulary'], current['vocabulary']
  if was != now:
    raise errors.ConfigMismatch(
        f'vocab.json does not hold the vocabulary {where} was trained with (size {was["size"]} -> '
        f'{now["size"]}, content hash {was["sha256"]} -> {now["sha256"]}): it was edited, reordered or '
        'rebuilt. Restore the original vocab.json or train in a new workdir.')


def check_resume(saved: dict, current: dict, allowed: Iterable[str], *, where: str) -> dict[str, list]:
  """{field: [saved, now]} for the config changes a resume makes, when every one is allowed; otherwise
  ConfigMismatch naming each field, with `--allow_config_change` suggested only for the fields it can
  change. A field the checkpoint predates counts as unchanged when it holds the value older runs used
  (ABSENT_IN_OLDER_RUNS). A different vocabulary is always refused."""
  check_vocabulary(saved, current, where=where)
  old, new = saved['config'], current['config']
  changes = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new))
             if old.get(k) != new.get(k) and not _added_since(k, old, new)}
  allowed = set(allowed)
  unknown = sorted(allowed - set(old) - set(new) - OPERATIONAL_FIELDS)
  if unknown:
    raise errors.ConfigMismatch(f'--allow_config_change names unknown config fields: {unknown}')
  listing = '\n'.join(f'  {k}: {a!r} -> {b!r}' for k, (a, b) in changes.items())
  fixed = sorted(k for k in changes if not changeable(k))
  refused = sorted(set(changes) - allowed - set(fixed))
  if fixed:
    also = (f' ({", ".join(refused)} could change with --allow_config_change={",".join(refused)})'
            if refused else '')
    raise errors.ConfigMismatch(
        f'the config differs from the one {where} was trained with:\n{listing}\n{", ".join(fixed)} '
        f'cannot change in a resumed run (the model, the data or the step structure would differ from '
        f'the checkpoints): train in a new workdir{also}.')
  if refused:
    raise errors.ConfigMismatch(
        f'the config differs from the one {where} was trained with:\n{listing}\nTo resume with these '
        f'changes on purpose: --allow_config_change={",".join(refused)}; or train in a new workdir.')
  return changes


def changeable(field: str) -> bool:
  """Whether a resumed run may change `field` (with --allow_config_change)."""
  return field.startswith(_CHANGEABLE_PREFIXES) and field not in _FIXED_TRAIN_FIELDS


def _added_since(field: str, old: dict, new: dict) -> bool:
  """The checkpoint predates `field` and the config holds what runs before it did."""
  return (field not in old and field in ABSENT_IN_OLDER_RUNS
          and new.get(field) == ABSENT_IN_OLDER_RUNS[field])


# ----------------------------------------------------------------------------------------------
# The training lock
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def training_lock(workdir: str):
  """Holds `<workdir>/train.lock` (process 0 of a run) so two training runs never mix in one workdir.
  An flock dies with its process, so a killed run leaves no stale lock behind."""
  if jax.process_index() != 0:
    yield
    return
  path = os.path.join(workdir, 'train.lock')
  handle = open(path, 'a+', encoding='utf-8')  # pylint: disable=consider-using-with
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    handle.seek(0)
    holder = handle.read().strip() or 'a process that left no details'
    handle.close()
    raise errors.WorkdirLocked(f'{workdir} is being trained by another process ({holder}); let it '
                               'finish or stop it, or train in another --workdir') from None
  handle.seek(0)
  handle.truncate()
  since = datetime.datetime.now().astimezone().isoformat(timespec='seconds')
  handle.write(f'pid {os.getpid()} on {socket.gethostname()} since {since}\n')
  handle.flush()
  try:
    yield
  finally:
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()
