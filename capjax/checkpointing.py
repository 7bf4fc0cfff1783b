"""The one module that talks to orbax: train state, data position and run facts, saved together, atomically.

Each checkpoint holds three items: `state` (params, batch_stats, opt_state, step, rng as sharded arrays),
`data` (the grain iterator position, one JSON file per process, written by grain's own handler) and `run`
(JSON: what identifies the run, config fields and vocabulary, and the loop's bookkeeping, see train.py).
orbax writes into a temporary directory and renames it when complete, so a killed job never leaves a
half-written checkpoint that looks valid; such leftovers are removed when a training run opens the
directory (under the workdir lock, so no live writer can own them).

Which checkpoints stay on disk: the latest `keep` plus the `keep_best` best by `best_metric`. The metrics
live in `<directory>/capjax_metrics.json`, written by `record_metrics` after the epoch's checkpoint is
safely saved (so a failing metric computation never costs the checkpoint), and only finite values count:
a NaN never ranks as best. A state with a non-finite value is never saved.
"""

from collections.abc import Callable, Sequence
import errno
import glob
import json
import logging as stdlib_logging
import math
import os
import shutil
import sys
from typing import Any

from absl import logging
import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from capjax import errors
from capjax import fileio

_STATE, _DATA, _RUN = 'state', 'data', 'run'
METRICS_FILE = 'capjax_metrics.json'
# What an epoch record holds and can rank checkpoints by (config.train.best_metric).
RANKABLE_METRICS = ('val_loss', 'train_loss', 'Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'CIDEr')
LOWER_IS_BETTER = ('val_loss', 'train_loss')


def check_best_metric(best_metric: str, best_mode: str) -> None:
  """A clear error for a `config.train.best_metric`/`best_mode` that could never pick a checkpoint."""
  if best_mode not in ('max', 'min'):
    raise ValueError(f"config.train.best_mode: expected 'max' or 'min', got {best_mode!r}")
  if not best_metric:
    return
  if best_metric not in RANKABLE_METRICS:
    raise ValueError(f'config.train.best_metric={best_metric!r} is not a metric a training epoch records; '
                     f"expected one of {list(RANKABLE_METRICS)} or '' (then 'best' means the latest)")
  expected = 'min' if best_metric in LOWER_IS_BETTER else 'max'
  if best_mode != expected:
    raise ValueError(f"config.train.best_mode={best_mode!r} with best_metric={best_metric!r}: "
                     f"{'lower' if expected == 'min' else 'higher'} is better, use best_mode='{expected}'")


class _IteratorPosition:
  """A frozen snapshot of an iterator's state, in the shape grain's checkpoint handler saves.

  The training loop prefetches batches, so the live iterator runs ahead of the last trained step;
  saving the snapshot taken when that step's batch was drawn keeps resume exact."""

  def __init__(self, state: Any):
    self._state = state

  def get_state(self) -> bytes:
    return json.dumps(self._state, indent=1).encode()


class _KeepBest:
  """orbax preservation policy: keep the `n` steps with the best recorded metric."""

  def __init__(self, best_steps: Callable[[Sequence[int], int], list[int]], n: int):
    self._best_steps, self._n = best_steps, n

  def should_preserve(self, checkpoints, *, context) -> list[bool]:
    del context
    best = set(self._best_steps([c.step for c in checkpoints], self._n))
    return [c.step in best for c in checkpoints]


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


class Checkpointer:
  """Saves and restores (train state, data position, run facts) under `<workdir>/checkpoints`."""

  def __init__(self, directory: str, *, keep: int = 2, keep_best: int = 1, best_metric: str = '',
               best_mode: str = 'max', read_only: bool = False):
    check_best_metric(best_metric, best_mode)
    self.directory = os.path.abspath(directory)
    self.best_metric, self._best_mode, self._read_only = best_metric, best_mode, read_only
    if not read_only:
      self._remove_unfinished_saves()
    policies = [checkpoint_managers.LatestN(n=keep)]
    if best_metric:
      policies.append(_KeepBest(self._best_steps, keep_best))
    options = ocp.CheckpointManagerOptions(
        create=not read_only, read_only=read_only, save_interval_steps=0 if read_only else 1,
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        # Synchronous saves: the caller may exit right after `save`, and tests kill jobs mid-run.
        enable_async_checkpointing=False)
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # orbax warns that a read-only directory is read-only
    try:
      self._manager = ocp.CheckpointManager(
          self.directory, options=options,
          # The PyTree handler (what StandardCheckpointHandler wraps, same files) also restores a part
          # of the state: inference reads only params and batch_stats, never the optimizer's moments.
          item_handlers={_STATE: ocp.PyTreeCheckpointHandler(),
                         _DATA: grain.checkpoint.CheckpointHandler(),
                         _RUN: ocp.JsonCheckpointHandler()})
    finally:
      logging.set_verbosity(verbosity)
    self._metrics = self._load_metrics()

  # ------------------------------------------------------------------------------------ steps

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def best_step(self) -> int | None:
    """The step with the best finite `best_metric` among those on disk (None without any)."""
    best = self._best_steps(self.all_steps(), 1)
    return best[0] if best else None

  def _best_steps(self, steps: Sequence[int], n: int) -> list[int]:
    scored = [(self._metrics[s][self.best_metric], s) for s in steps
              if self.best_metric in self._metrics.get(s, {})]
    scored.sort(key=lambda item: (-item[0] if self._best_mode == 'max' else item[0], -item[1]))
    return [s for _, s in scored[:n]]

  def candidates(self, which: str | int | None) -> list[int]:
    """The steps to try for 'latest' | 'best' | a step number, in order (an explicit step: only it)."""
    steps = self.all_steps()
    if not steps:
      raise errors.CheckpointError(f'no checkpoint in {self.directory}')
    newest_first = steps[::-1]
    if which in (None, 'latest'):
      return newest_first
    if which == 'best':
      best = self.best_step()
      return [best] + [s for s in newest_first if s != best] if best is not None else newest_first
    try:
      step = int(which)
    except ValueError:
      raise errors.CheckpointError(
          f"--checkpoint_step={which!r}: expected 'best', 'latest' or a step number") from None
    if step not in steps:
      raise errors.CheckpointError(f'checkpoint_step={step} is not in {self.directory}; saved: {steps}')
    return [step]

  # ------------------------------------------------------------------------------------ metrics

  def _metrics_path(self) -> str:
    return os.path.join(self.directory, METRICS_FILE)

  def _load_metrics(self) -> dict[int, dict[str, float]]:
    if os.path.exists(self._metrics_path()):
      return {int(step): values for step, values in fileio.read_json(self._metrics_path()).items()}
    # Checkpoints written before capjax kept its own metrics file stored them with orbax.
    metrics = {}
    for step in self.all_steps():
      try:
        saved = self._manager.metrics(step)
      except Exception:  # pylint: disable=broad-except  (a damaged metrics item: no metrics)
        saved = None
      if saved:
        metrics[step] = _finite_numbers(saved)
    return metrics

  def has_metrics(self, step: int) -> bool:
    return step in self._metrics

  def record_metrics(self, step: int, metrics: dict[str, Any]) -> None:
    """Remembers a saved step's epoch metrics (finite numbers only) for choosing the best checkpoints."""
    self._metrics[step] = {k: v for k, v in _finite_numbers(metrics).items() if k not in ('epoch', 'step')}
    if jax.process_index() == 0 and not self._read_only:
      fileio.write_json(self._metrics_path(), {str(s): v for s, v in sorted(self._metrics.items())})

  # ------------------------------------------------------------------------------------ saving

  def save(self, step: int, state: Any, data_state: Any | None = None,
           run_info: dict | None = None) -> None:
    """Saves a checkpoint; refuses a state holding NaN or Inf (it would replace good checkpoints)."""
    if not bool(_all_finite(state)):
      raise errors.TrainingDiverged(f'refusing to save checkpoint {step}: the train state holds NaN/Inf')
    items = {_STATE: ocp.args.PyTreeSave(state)}
    if data_state is not None:
      items[_DATA] = grain.checkpoint.CheckpointSave(_IteratorPosition(data_state))
    if run_info is not None:
      items[_RUN] = ocp.args.JsonSave(run_info)
    _report_full_disks_once()
    try:
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore wrap the OSError)
      if not _out_of_space(e):
        raise
      raise errors.DiskFull(
          f'checkpoint {step} could not be saved: no space left on the disk holding {self.directory} '
          f'({_free_space(self.directory)} free). The checkpoints saved before it are intact '
          f'({self.all_steps() or "none yet"}): free some space and run the same command again to '
          'resume from the newest.') from None
    logging.info('Saved checkpoint at step %d (%s).', step, self.directory)

  def _remove_unfinished_saves(self) -> None:
    """orbax's temporary folders from a save that was killed: never valid, and no live writer owns them
    (training holds the workdir lock)."""
    if jax.process_index() != 0:
      return
    for path in sorted(glob.glob(os.path.join(self.directory, '*.orbax-checkpoint-tmp*'))):
      print(f'Removing {path}: an unfinished checkpoint left by a run that stopped while saving it.',
            flush=True)
      shutil.rmtree(path, ignore_errors=True)

  # ------------------------------------------------------------------------------------ restoring

  def restore(self, step: int, target_state: Any, data_iterator: Any | None = None) -> Any:
    """Restores into `target_state`'s structure and shardings (so 8 -> 1 devices works when the
    target's leaves are `jax.ShapeDtypeStruct`s carrying the new sharding). A checkpoint that cannot
    be read raises CheckpointError with its cause in one line."""
    items = {_STATE: _restore_args(target_state)}
    if data_iterator is not None:
      items[_DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self._restore(step, items)[_STATE]

  def restore_fields(self, step: int, target_fields: dict, data_iterator: Any | None = None) -> dict:
    """Only the named top-level fields of the saved train state (e.g. {'step', 'params', ...}: the
    parts a changed optimizer can carry over), into the shapes and shardings of `target_fields`."""
    items = {_STATE: _restore_args(target_fields, partial=True)}
    if data_iterator is not None:
      items[_DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    return dict(self._restore(step, items)[_STATE])

  def differing_fields(self, step: int, target_state: Any) -> list[str]:
    """The top-level fields of the train state (e.g. 'opt_state') whose arrays, by name and shape,
    differ between checkpoint `step` and `target_state`: what a restore into `target_state` would fail
    on for its structure, not for damaged files. [] when the checkpoint's metadata cannot be read (a
    restore then reports the damage)."""
    try:
      saved_tree = self._manager.item_metadata(step)[_STATE].tree
    except Exception:  # pylint: disable=broad-except  (missing or damaged metadata)
      return []
    saved = {m.name: tuple(m.shape) for m in jax.tree.leaves(
        saved_tree, is_leaf=lambda x: hasattr(x, 'name') and hasattr(x, 'shape'))}
    wanted = {_array_name(path): tuple(leaf.shape)
              for path, leaf in jax.tree_util.tree_flatten_with_path(target_state)[0]}
    fields = {name.split('.')[0] for name in (*saved, *wanted)}
    return sorted(f for f in fields if {k: v for k, v in saved.items() if k.split('.')[0] == f}
                  != {k: v for k, v in wanted.items() if k.split('.')[0] == f})

  def restore_variables(self, step: int, target_variables: dict) -> dict:
    """Only {'params', 'batch_stats'} of the saved train state (what inference needs), into the
    shapes and shardings of `target_variables` (leaves: `jax.ShapeDtypeStruct` with a sharding)."""
    return dict(self._restore(step, {_STATE: _restore_args(target_variables, partial=True)})[_STATE])

  def run_info(self, step: int) -> dict | None:
    """The `run` item of a checkpoint, or None for checkpoints written before it existed."""
    if not os.path.isdir(os.path.join(self.directory, str(step), _RUN)):
      return None
    return dict(self._restore(step, {_RUN: ocp.args.JsonRestore()})[_RUN])

  def _restore(self, step: int, items: dict) -> dict:
    # Before the read, not after a failure: the abandoned reads' noise can start before `except` runs.
    _ignore_reads_finishing_after_a_failed_restore()
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many kinds)
      raise errors.CheckpointError(
          f'checkpoint {step} in {self.directory} cannot be restored: {_first_line(e)}') from e

  def restore_first_readable(self, candidates: Sequence[int], restore: Callable[[int], Any], *,
                             set_aside: bool = False) -> tuple[int, Any]:
    """(step, restore(step)) for the first candidate that restores. Each one that fails is reported in
    one line; with `set_aside`, it is moved to `<directory>_unreadable/` (kept, never deleted) so that
    training can save that step number again."""
    failures = []
    for position, step in enumerate(candidates):
      try:
        return step, restore(step)
      except errors.CheckpointError as e:
        if len(candidates) == 1:
          raise
        failures.append(str(e))
        following = candidates[position + 1:]
        print(f"{e}; {f'trying {following[0]}' if following else 'no other checkpoint'}.", flush=True)
        if set_aside:
          self._set_aside(step)
    raise errors.CheckpointError(f'no checkpoint in {self.directory} can be restored:\n  ' +
                                 '\n  '.join(failures))

  def set_aside_steps(self) -> list[int]:
    """The steps of the unreadable checkpoints an earlier run moved to `<directory>_unreadable/`."""
    aside = f'{self.directory}_unreadable'
    names = os.listdir(aside) if os.path.isdir(aside) else []
    return sorted({int(n.split('.')[0]) for n in names if n.split('.')[0].isdigit()})

  def _set_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      aside = f'{self.directory}_unreadable'
      os.makedirs(aside, exist_ok=True)
      target = os.path.join(aside, f'{step}')
      if os.path.exists(target):
        target = f'{target}.{len(os.listdir(aside))}'
      shutil.move(os.path.join(self.directory, str(step)), target)
      print(f'Moved unreadable checkpoint {step} to {target}.', flush=True)
    self._manager.reload()

  def close(self) -> None:
    self._manager.close()


class _AbandonedReads(stdlib_logging.Filter):
  """Drops asyncio's 'exception was never retrieved' reports: after a failed restore, orbax abandons the
  other reads of that checkpoint, and each one's error would be printed again with a traceback."""

  def filter(self, record: stdlib_logging.LogRecord) -> bool:
    return 'exception was never retrieved' not in record.getMessage()


def _ignore_reads_finishing_after_a_failed_restore() -> None:
  """After a failed restore, tensorstore's outstanding reads complete on their own threads and call back
  into orbax's event loop, which is closed by then: each callback prints 'RuntimeError: Event loop is
  closed' as an unraisable exception (hundreds of tracebacks for one broken checkpoint), and asyncio
  reports each abandoned read's error. orbax's read coroutines that the failure left suspended
  (`_read_array_index_and_device_put`, one per array) are closed when they are garbage-collected, and
  what their cleanup raises is reported as unraisable too, 'Exception ignored in <coroutine ...>', one
  traceback each. Those, and only those, are dropped; the failure itself has been reported in one
  line."""
  previous = sys.unraisablehook
  if getattr(previous, 'capjax_filter', False):
    return

  def hook(unraisable):
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == 'Event loop is closed':
      return
    if _is_orbax_coroutine(unraisable.object):
      return
    previous(unraisable)
  hook.capjax_filter = True
  sys.unraisablehook = hook
  stdlib_logging.getLogger('asyncio').addFilter(_AbandonedReads())


_ORBAX_DIR = os.path.dirname(os.path.abspath(ocp.__file__))


def _is_orbax_coroutine(obj: Any) -> bool:
  """A coroutine (or a task's) of orbax's own code, e.g. a read abandoned by a failed restore."""
  code = getattr(obj, 'cr_code', None) or getattr(getattr(obj, 'get_coro', lambda: None)(), 'cr_code', None)
  return code is not None and os.path.abspath(code.co_filename).startswith(_ORBAX_DIR + os.sep)


def _restore_args(target: Any, partial: bool = False) -> ocp.args.PyTreeRestore:
  return ocp.args.PyTreeRestore(item=target, partial_restore=partial,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(target))


class _FullDisk(stdlib_logging.Filter):
  """Drops orbax's own log of a save that ran out of space (a traceback from its writer thread): the
  same failure reaches `Checkpointer.save`, which reports it in one line."""

  def filter(self, record: stdlib_logging.LogRecord) -> bool:
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
      text += str(record.exc_info[1])
    return 'No space left on device' not in text


def _report_full_disks_once() -> None:
  absl_logger = stdlib_logging.getLogger('absl')
  if not any(isinstance(f, _FullDisk) for f in absl_logger.filters):
    absl_logger.addFilter(_FullDisk())


def _out_of_space(error: BaseException) -> bool:
  """Whether ENOSPC is somewhere in an exception's chain (tensorstore reports it as text)."""
  while error is not None:
    if getattr(error, 'errno', None) == errno.ENOSPC or 'No space left on device' in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


def _free_space(directory: str) -> str:
  try:
    return f'{shutil.disk_usage(directory).free / 2**20:,.0f} MiB'
  except OSError:
    return 'unknown space'


def _array_name(path) -> str:
  """An array's name in a checkpoint's metadata, as orbax writes it: its path's keys joined by dots."""
  parts = []
  for key in path:
    for attribute in ('key', 'name', 'idx'):  # DictKey, GetAttrKey, SequenceKey
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
  return '.'.join(parts)


def _finite_numbers(metrics: dict) -> dict[str, float]:
  return {k: float(v) for k, v in metrics.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _first_line(error: BaseException) -> str:
  """The cause of a deep library error in one line: the innermost message that says something."""
  causes = []
  while error is not None:
    causes.append(error)
    error = error.__cause__ or error.__context__
  for cause in reversed(causes):
    text = str(cause).strip()
    if text:
      return f'{type(cause).__name__}: {text.splitlines()[0][:300]}'
  return type(causes[0]).__name__


def abstract_like(tree: Any, sharding) -> Any:
  """Shapes/dtypes of `tree` with `sharding` on every leaf: a restore target for any device count."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
