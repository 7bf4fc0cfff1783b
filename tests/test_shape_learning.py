"""benchmarks/investigations/shape_learning.py: its shape-word targets and scoring are right, and every
variant runs."""

import types

from absl import flags
import jax.numpy as jnp
import numpy as np

from benchmarks.investigations import shape_learning
from capjax import vocab as vocab_lib


def test_shape_targets_mark_exactly_the_shape_words_and_name_them():
  vocab = vocab_lib.Vocabulary(vocab_lib.SPECIALS + ('a', 'red', 'circle', 'square', 'triangle', 'left'))
  captions = [['a red square', 'a triangle left'], ['a circle', 'red left']]
  tokens = jnp.asarray([[vocab.encode(c, 6) for c in pair] for pair in captions])
  is_shape, which = shape_learning.shape_targets(tokens, jnp.asarray(shape_learning.shape_word_ids(vocab)))
  # Targets are tokens[..., 1:]: 'a' 'red' 'square' <END> <PAD> | 'a' 'triangle' 'left' <END> <PAD> | ...
  np.testing.assert_array_equal(
      is_shape, [[0, 0, 1, 0, 0], [0, 1, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
  assert [int(which[0, 2]), int(which[1, 1]), int(which[2, 1])] == [1, 2, 0]  # square, triangle, circle


def test_every_variant_trains_and_reports_held_out_shape_accuracy(tmp_path):
  output = tmp_path / 'shape_learning.json'
  flag_values = flags.FlagValues()  # the script's own flags, apart from the process-global ones
  shape_learning.define_flags(flag_values)
  flag_values([
      'shape_learning', '--width=2', '--stage_sizes=1', '--image_size=16', '--steps=2', '--eval_every=1',
      '--batch_size=4', '--num_train=12', '--num_test=10', f'--output={output}'])
  payload = shape_learning.run(types.SimpleNamespace(**flag_values.flag_values_dict()))
  assert output.exists()
  assert set(payload['curves']) == set(shape_learning.VARIANTS)
  for curve in payload['curves'].values():
    assert [point['step'] for point in curve] == [1, 2]
    for point in curve:
      assert np.isfinite(point['train_loss']) and 0.0 <= point['test_shape_accuracy'] <= 1.0
