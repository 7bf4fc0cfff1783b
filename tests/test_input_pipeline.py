"""grain pipeline: shapes/dtypes, determinism, iterator-state round trip, per-host slicing, flips."""

import numpy as np

from capjax import input_pipeline
from capjax import vocab as vocab_lib
from capjax.data import shapes

AUGMENT = input_pipeline.AugmentConfig()


def _source(n=12):
  return list(shapes.generate_records('train', n, 48))


def _vocab(source):
  return vocab_lib.build_vocabulary([c for r in source for c in r['captions']], min_count=1)


def _iterator(source, host_batch_size=4, process_index=0, process_count=1, **kwargs):
  args = dict(image_size=32, max_caption_len=12, captions_per_image=5, augment=AUGMENT, seed=3)
  args.update(kwargs)
  return input_pipeline.make_train_iterator(
      source, _vocab(source), input_pipeline.PipelineConfig(**args), host_batch_size=host_batch_size,
      process_index=process_index, process_count=process_count)


def test_batches_have_the_right_shapes_and_dtypes():
  batch = next(_iterator(_source()))
  assert batch['image'].shape == (4, 32, 32, 3) and batch['image'].dtype == np.uint8
  assert batch['tokens'].shape == (4, 12) and batch['tokens'].dtype == np.int32
  assert (batch['tokens'][:, 0] == vocab_lib.START_ID).all()


def test_deterministic_and_state_roundtrip():
  source = _source()
  first = [next(_iterator(source)) for _ in range(1)][0]
  again = next(_iterator(source))
  np.testing.assert_array_equal(first['image'], again['image'])
  it = _iterator(source)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  restored = _iterator(source)
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    np.testing.assert_array_equal(want['image'], got['image'])
    np.testing.assert_array_equal(want['tokens'], got['tokens'])


def test_epochs_are_reshuffled_and_cover_every_pair():
  source = _source(4)
  no_aug = input_pipeline.AugmentConfig(crop_scale=(1, 1), crop_ratio=(1, 1), flip_prob=0,
                                        brightness=0, contrast=0, rotation_degrees=0)
  it = _iterator(source, augment=no_aug, host_batch_size=5)
  epoch1 = [tuple(t) for _ in range(4) for t in next(it)['tokens']]
  epoch2 = [tuple(t) for _ in range(4) for t in next(it)['tokens']]
  vocab = _vocab(source)
  every_pair = sorted(tuple(vocab.encode(c, 12)) for r in source for c in r['captions'])
  assert sorted(epoch1) == every_pair and sorted(epoch2) == every_pair
  assert epoch1 != epoch2


def test_two_hosts_cover_each_pair_exactly_once():
  source = _source(6)  # 30 pairs
  pairs = []
  for host in range(2):
    ds = input_pipeline.grain.MapDataset.range(30)[host::2]
    pairs.extend(int(i) for i in ds)
  assert sorted(pairs) == list(range(30))
  batches = [next(_iterator(source, process_index=h, process_count=2, host_batch_size=3))
             for h in range(2)]
  assert not np.array_equal(batches[0]['tokens'], batches[1]['tokens'])


def test_flip_swaps_left_and_right():
  assert input_pipeline.swap_left_right('a red circle on the left and a cube on the right') == (
      'a red circle on the right and a cube on the left')
  record = {'image': next(shapes.generate_records('train', 1, 48))['image'],
            'captions': ['a dog on the left']}
  vocab = vocab_lib.build_vocabulary(['a dog on the left right'], min_count=1)
  always_flip = input_pipeline.AugmentConfig(flip_prob=1.0)
  pipeline = input_pipeline.PipelineConfig(image_size=32, max_caption_len=10, captions_per_image=1,
                                           augment=always_flip)
  example = input_pipeline.TrainExample(vocab, pipeline).random_map((0, record, 0), np.random.default_rng(0))
  assert vocab.decode(example['tokens']) == 'a dog on the right'


def test_eval_batches_are_padded_with_zero_weight():
  source = _source(3)
  pipeline = input_pipeline.PipelineConfig(image_size=32, max_caption_len=12, captions_per_image=5)
  batches = list(input_pipeline.eval_pair_batches(source, _vocab(source), pipeline, host_batch_size=4))
  assert len(batches) == 4  # 15 pairs
  assert sum(b['weight'].sum() for b in batches) == 15
  captions = list(input_pipeline.caption_batches(source, image_size=32, host_batch_size=2))
  assert [list(b['index']) for b in captions] == [[0, 1], [2, -1]]
  assert captions[1]['references'][0] == source[2]['captions']


def test_decoded_image_cache_gives_the_same_batches_without_decoding_again():
  source = list(shapes.generate_records('train', 4, 96))
  cached = input_pipeline.DecodedImageCache(source, min_side=64)
  no_aug = input_pipeline.AugmentConfig(crop_scale=(1, 1), crop_ratio=(1, 1), flip_prob=0,
                                        brightness=0, contrast=0, rotation_degrees=0)
  first = next(_iterator(cached, augment=no_aug, image_size=64))
  assert all(cached[i]['pixels'].shape == (64, 64, 3) for i in range(4))
  cached._source = None  # reading (and decoding) a record again would now fail
  again = next(_iterator(cached, augment=no_aug, image_size=64))
  np.testing.assert_array_equal(first['image'], again['image'])
  direct = next(_iterator(source, augment=no_aug, image_size=64))
  np.testing.assert_array_equal(first['tokens'], direct['tokens'])
  assert np.abs(first['image'].astype(int) - direct['image'].astype(int)).mean() < 3
