"""The one module that talks to orbax: train state + data-iterator state saved together, atomically.

Each checkpoint holds two items: `state` (params, batch_stats, opt_state, step, rng as sharded arrays)
and `data` (the grain iterator position, one JSON file per process, written by grain's own handler).
Which checkpoints stay on disk: the latest `keep` ones plus the `keep_best` best by a validation metric.
(`max_to_keep` together with `best_fn` would delete the *latest* checkpoint and make a resumed run go
back in time, hence an explicit preservation policy.) orbax writes into a temporary directory and
renames it when complete, so a killed job never leaves a half-written checkpoint that looks valid.
"""

import json
import os
from typing import Any

from absl import logging
import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

_STATE, _DATA = 'state', 'data'


class _IteratorPosition:
  """A frozen snapshot of an iterator's state, in the shape grain's checkpoint handler saves.

  The training loop prefetches batches, so the live iterator runs ahead of the last trained step;
  saving the snapshot taken when that step's batch was drawn keeps resume exact."""

  def __init__(self, state: Any):
    self._state = state

  def get_state(self) -> bytes:
    return json.dumps(self._state, indent=1).encode()


class Checkpointer:
  """Saves and restores (train state, data position) under `<workdir>/checkpoints`."""

  def __init__(self, directory: str, *, keep: int = 2, keep_best: int = 1,
               best_metric: str | None = None, best_mode: str = 'max', read_only: bool = False):
    if best_mode not in ('max', 'min'):
      raise ValueError(f"best_mode: expected 'max' or 'min', got {best_mode!r}")
    self.best_metric = best_metric
    policies = [checkpoint_managers.LatestN(n=keep)]
    best_fn = None
    if best_metric:
      # Epochs without the metric (it may be computed only every few epochs) rank last.
      worst = float('-inf') if best_mode == 'max' else float('inf')
      best_fn = lambda metrics: metrics.get(best_metric, worst)  # noqa: E731
      policies.append(checkpoint_managers.BestN(
          get_metric_fn=best_fn, n=keep_best, reverse=best_mode == 'min',
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        best_fn=best_fn, best_mode=best_mode, create=not read_only, read_only=read_only,
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        # Synchronous saves: the caller may exit right after `save`, and tests kill jobs mid-run.
        enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory), options=options,
        # The PyTree handler (what StandardCheckpointHandler wraps, same files) also restores a part of
        # the state: inference reads only params and batch_stats, never the optimizer's moments.
        item_handlers={_STATE: ocp.PyTreeCheckpointHandler(),
                       _DATA: grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    return self._manager.best_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: Any | None = None,
           metrics: dict[str, float] | None = None) -> None:
    items = {_STATE: ocp.args.PyTreeSave(state)}
    if data_state is not None:
      items[_DATA] = grain.checkpoint.CheckpointSave(_IteratorPosition(data_state))
    clean_metrics = None
    if metrics is not None and self.best_metric:
      clean_metrics = {k: float(v) for k, v in metrics.items()}
    self._manager.save(step, args=ocp.args.Composite(**items), metrics=clean_metrics, force=True)
    self._manager.wait_until_finished()
    logging.info('Saved checkpoint at step %d (%s).', step, self._manager.directory)

  def resolve_step(self, which: str | int | None) -> int:
    """'latest' | 'best' | a step number -> an existing step, or a clear error."""
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f'no checkpoint in {self._manager.directory}')
    if which in (None, 'latest'):
      return self.latest_step()
    if which == 'best':
      best = self.best_step()
      return best if best is not None else self.latest_step()
    step = int(which)
    if step not in steps:
      raise ValueError(f'checkpoint_step={step} is not in {self._manager.directory}; saved: {steps}')
    return step

  def restore(self, step: int, target_state: Any, data_iterator: Any | None = None) -> Any:
    """Restores into `target_state`'s structure and shardings (so 8 -> 1 devices works when the
    target's leaves are `jax.ShapeDtypeStruct`s carrying the new sharding)."""
    items = {_STATE: _restore_args(target_state)}
    if data_iterator is not None:
      items[_DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored[_STATE]

  def restore_variables(self, step: int, target_variables: dict) -> dict:
    """Only {'params', 'batch_stats'} of the saved train state (what inference needs), into the
    shapes and shardings of `target_variables` (leaves: `jax.ShapeDtypeStruct` with a sharding)."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{_STATE: _restore_args(target_variables, partial=True)}))
    return dict(restored[_STATE])

  def close(self) -> None:
    self._manager.close()


def _restore_args(target: Any, partial: bool = False) -> ocp.args.PyTreeRestore:
  return ocp.args.PyTreeRestore(item=target, partial_restore=partial,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(target))


def abstract_like(tree: Any, sharding) -> Any:
  """Shapes/dtypes of `tree` with `sharding` on every leaf: a restore target for any device count."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
