"""Checkpoint retention: the latest is never deleted in favour of the best, and 'best' is the best."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capjax import checkpointing
from capjax import errors
from capjax import mesh as mesh_lib


def _state(value):
  return {'w': jnp.full((3,), value, jnp.float32), 'step': jnp.asarray(int(value), jnp.int32)}


def test_keeps_latest_and_best_and_restores_onto_a_new_sharding(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=1, keep_best=1, best_metric='CIDEr')
  for step, cider in [(1, 0.5), (2, 0.9), (3, 0.7), (4, 0.6)]:
    ckpt.save(step, _state(step), data_state=None)
    ckpt.record_metrics(step, {'CIDEr': cider, 'val_loss': 1.0})
  assert ckpt.all_steps() == [2, 4]  # best (0.9) and latest
  assert ckpt.best_step() == 2 and ckpt.latest_step() == 4
  assert ckpt.candidates('best') == [2, 4] and ckpt.candidates('latest') == [4, 2]
  with pytest.raises(errors.CheckpointError, match='saved: \\[2, 4\\]'):
    ckpt.candidates(3)
  # A reopened directory knows the metrics (they are in capjax_metrics.json).
  again = checkpointing.Checkpointer(str(tmp_path), best_metric='CIDEr', read_only=True)
  assert again.best_step() == 2
  mesh = mesh_lib.make_mesh(jax.devices()[:2])
  target = checkpointing.abstract_like(_state(0), mesh_lib.replicated(mesh))
  restored = ckpt.restore(2, target)
  np.testing.assert_array_equal(restored['w'], [2, 2, 2])
  assert restored['w'].sharding == mesh_lib.replicated(mesh)


def test_lower_is_better_mode_and_missing_directory(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'a'), keep=1, keep_best=1, best_metric='val_loss',
                                    best_mode='min')
  for step, loss in [(1, 2.0), (2, 1.0), (3, 1.5)]:
    ckpt.save(step, _state(step))
    ckpt.record_metrics(step, {'val_loss': loss})
  assert ckpt.best_step() == 2 and ckpt.all_steps() == [2, 3]
  empty = checkpointing.Checkpointer(str(tmp_path / 'b'))
  with pytest.raises(errors.CheckpointError, match='no checkpoint'):
    empty.candidates('latest')


def test_epochs_without_the_metric_never_count_as_best(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=1, keep_best=1, best_metric='CIDEr')
  for step, metrics in [(1, {'val_loss': 3.0}), (2, {'val_loss': 2.0, 'CIDEr': 0.4}),
                        (3, {'val_loss': 1.0})]:
    ckpt.save(step, _state(step))
    ckpt.record_metrics(step, metrics)
  assert ckpt.best_step() == 2 and ckpt.all_steps() == [2, 3]
