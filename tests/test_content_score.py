"""The demo's content score: every reference caption names its image's objects; wrong ones are caught."""

import json

import numpy as np
import pytest

from capjax.evaluation import content_score
from capjax.data import builder
from capjax.data import records as records_lib
from capjax.data import shapes


def _records(n=60):
  return list(shapes.generate_records('validation', n, 64))


def test_every_reference_caption_names_the_right_objects():
  records = _records()
  objects = [records_lib.record_objects(r) for r in records]
  assert {len(o) for o in objects} == {1, 2}
  for record, truth in zip(records, objects):
    for caption in record['captions']:
      verdict = content_score.score_caption(caption, truth)
      assert verdict['objects_right'] and verdict['colours_right'] and verdict['shapes_right'], caption
      assert not verdict['positions_wrong'], caption


def test_wrong_objects_colours_shapes_and_positions_are_caught():
  truth = [{'colour': 'red', 'shape': 'square', 'position': 'left', 'size': 'big', 'box': [0, 0, .5, .5]},
           {'colour': 'blue', 'shape': 'circle', 'position': 'right', 'size': 'small', 'box': [.5, .5, 1, 1]}]
  cases = {
      'a red square on the left and a blue circle on the right': (True, True, True, True, False),
      # Wrong shapes, right places: the mentions refer to the red and the blue object.
      'a red circle on the left and a blue square on the right': (False, True, True, True, False),
      'a blue square on the left and a red circle on the right': (False, True, True, False, True),
      'a red square on the right and a blue circle on the left': (True, True, True, False, True),
      'a red square next to a blue circle': (True, True, True, False, False),
      'a red square on the left': (False, False, False, True, False),
      'a red square on the left and a blue circle and a green triangle': (False, False, False, True, False),
  }
  keys = ('objects_right', 'colours_right', 'shapes_right', 'positions_right', 'positions_wrong')
  for caption, expected in cases.items():
    verdict = content_score.score_caption(caption, truth)
    assert tuple(verdict[k] for k in keys) == expected, caption


def test_colour_after_the_shape_and_rates_by_object_count():
  truth = [[{'colour': 'green', 'shape': 'triangle', 'position': 'top', 'size': 'big', 'box': [0, 0, 1, 1]}]]
  result = content_score.content_score(['the triangle at the top is green and big'], truth)
  assert result.objects_right == 1.0 and result.positions_right == 1.0
  records = _records(40)
  captions = [r['captions'][0] for r in records]
  captions[0] = captions[0].replace('circle', 'square').replace('triangle', 'square')
  result = content_score.content_score(captions, [records_lib.record_objects(r) for r in records])
  assert result.images == 40 and set(result.by_object_count) == {'1 object', '2 objects'}
  assert sum(v.images for v in result.by_object_count.values()) == 40
  with pytest.raises(ValueError, match='3 captions for 2 images'):
    content_score.content_score(['a', 'b', 'c'], [[], []])


def test_objects_are_stored_with_boxes_around_the_drawn_shape():
  record = next(shapes.generate_records('train', 1, 64))
  objects = json.loads(record['objects'])
  assert objects and all(0 <= v <= 1 for o in objects for v in o['box'])
  for o in objects:
    x0, y0, x1, y1 = o['box']
    assert x1 > x0 and y1 > y0
    expected_x = {'left': 0.27, 'right': 0.73}.get(o['position'], 0.5)
    assert abs((x0 + x1) / 2 - expected_x) < 0.06


def test_pointing_counts_peak_cells_overlapping_the_named_objects_box():
  objects = [{'colour': 'red', 'shape': 'square', 'position': 'left', 'size': 'big', 'box': [0, 0, .5, 1]}]
  words = ['a', 'red', 'square', 'on', 'the', 'left']
  alphas = np.zeros((len(words), 4))  # a 2x2 grid: cells (0,0) (0,1) (1,0) (1,1)
  alphas[:, 0] = 1  # peak in the top-left cell: inside the box
  # The box covers the left two of four cells: a random cell hits half the time, 2 words -> 1.0 expected.
  assert content_score.pointing(words, alphas, (2, 2), objects) == (2, 2, 1.0)
  alphas[2] = [0, 1, 0, 0]  # 'square' looks at the top-right cell: it only touches the box's edge
  assert content_score.pointing(words, alphas, (2, 2), objects) == (1, 2, 1.0)
  assert content_score.pointing(['a', 'blue', 'circle'], alphas[:3], (2, 2), objects) == (0, 0, 0.0)


def test_pointing_on_a_coarse_grid_counts_the_cell_not_its_centre():
  # A small object in the top-left quarter, away from that cell's centre (0.25, 0.25).
  objects = [{'colour': 'red', 'shape': 'circle', 'position': 'left', 'size': 'small',
              'box': [0.05, 0.05, 0.2, 0.2]}]
  alphas = np.array([[0.7, 0.1, 0.1, 0.1]] * 3)
  assert content_score.pointing(['a', 'red', 'circle'], alphas, (2, 2), objects) == (2, 2, 0.5)
  fine = np.zeros((3, 16))
  fine[:, 5] = 1  # a 4x4 grid, cell (1, 1) = [0.25, 0.5]^2: beside the box
  assert content_score.pointing(['a', 'red', 'circle'], fine, (4, 4), objects) == (0, 2, 2 / 16)


def test_shape_confusion_counts_named_shapes_by_true_size_and_shape():
  big_red_square = {'colour': 'red', 'shape': 'square', 'position': 'left', 'size': 'big',
                    'box': [0, 0, 1, 1]}
  small_blue_circle = {'colour': 'blue', 'shape': 'circle', 'position': 'right', 'size': 'small',
                       'box': [0, 0, 1, 1]}
  small_red_circle = dict(small_blue_circle, colour='red')
  captions = ['a big red square on the left',
              'a red triangle on the left and a blue square on the right',
              'a green circle on the right',  # names no object of the image's colours: 'none'
              'a red circle next to a red square']  # two red objects: which mention is which is unknown
  objects = [[big_red_square], [big_red_square, small_blue_circle], [small_blue_circle],
             [small_red_circle, big_red_square]]
  assert content_score.shape_confusion(captions, objects) == {
      'big square': {'square': 1, 'triangle': 1}, 'small circle': {'none': 1, 'square': 1}}
  assert content_score.content_score(captions, objects).shape_confusion['big square'] == {
      'square': 1, 'triangle': 1}


def test_objects_scale_draws_bigger_objects_under_their_own_dataset_name():
  (record,), (scaled_record,) = (list(shapes.generate_records('test', 1, 64, object_scale=scale))
                                 for scale in (1.0, 1.5))
  small, scaled = json.loads(record['objects']), json.loads(scaled_record['objects'])
  width = lambda o: o['box'][2] - o['box'][0]  # noqa: E731
  assert [o['shape'] for o in small] == [o['shape'] for o in scaled]
  assert width(scaled[0]) == pytest.approx(1.5 * width(small[0]), abs=0.02)
  assert builder.shapes_config(object_scale=1.5).name == 'shapes_1500_200_200_96px_objects1.5x'
  assert builder.shapes_config(object_scale=1.0).name == 'shapes'


def test_two_objects_are_separated_when_each_shape_word_peaks_on_its_own_object():
  left = {'colour': 'red', 'shape': 'circle', 'size': 'big', 'position': 'left', 'box': [0, 0, .5, 1]}
  right = {'colour': 'blue', 'shape': 'square', 'size': 'big', 'position': 'right', 'box': [.5, 0, 1, 1]}
  words = 'a red circle on the left and a blue square on the right'.split()

  def maps(circle_cell: int, square_cell: int) -> np.ndarray:
    alphas = np.full((len(words), 4), 0.25, np.float32)  # a 2 x 2 grid, row-major
    for index, cell in ((words.index('circle'), circle_cell), (words.index('square'), square_cell)):
      alphas[index] = 0.0
      alphas[index, cell] = 1.0
    return alphas

  assert content_score.separated(words, maps(0, 1), (2, 2), [left, right]) is True
  assert content_score.separated(words, maps(1, 0), (2, 2), [left, right]) is False  # each on the other
  assert content_score.separated(words, maps(0, 0), (2, 2), [left, right]) is False  # one cell for both
  assert content_score.separated(words, maps(0, 1), (2, 2), [left]) is None  # one object
  assert content_score.separated(words[:6], maps(0, 1)[:6], (2, 2), [left, right]) is None  # names one
  result = content_score.pointing_score([words, words], [maps(0, 1).reshape(-1, 2, 2),
                                                         maps(1, 0).reshape(-1, 2, 2)], [[left, right]] * 2)
  assert (result.separated, result.two_object_captions) == (0.5, 2)
