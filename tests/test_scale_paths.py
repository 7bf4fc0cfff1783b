"""What keeps every stage bounded at COCO scale: prepare past tfds' 1 GB shuffle buffer without TensorFlow and
in memory that does not grow with the split, captions read without images, cached features memory-mapped.

The sizes are small; the thresholds that decide the path (tfds' `MAX_MEM_BUFFER_SIZE`, capjax's
`SHARD_BYTES`) are lowered so that a small fixture takes the path a >1 GB split takes."""

import io
import json
import pathlib
import pickle
import tracemalloc
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import shuffle as tfds_shuffle

from capjax import features as features_lib
from capjax import input_pipeline
from capjax import mesh as mesh_lib
from capjax import scst
from capjax import vocab as vocab_lib
from capjax import workdir as workdir_lib
from capjax.data import builder as builder_lib
from capjax.data import layouts
from capjax.data import prepare
from capjax.data import records as records_lib
from capjax.data import shapes
from capjax.evaluation import analysis
from capjax.evaluation import captioning
from capjax.evaluation import evaluator
from capjax.evaluation import provenance as provenance_lib
from configs import tiny

import flickr_fixtures as ff

SMALL_SHAPES = dict(num_train=60, num_validation=10, num_test=10, image_size=32)


def _no_tensorflow(*args, **kwargs):
  raise ModuleNotFoundError("No module named 'tensorflow' (the shuffler spilled to disk)")


@pytest.fixture
def past_the_shuffle_buffer(monkeypatch):
  """Every split is 'over 1 GB' for tfds' shuffler, whose spill needs TensorFlow (faked missing, so the test
  means the same with TensorFlow installed); capjax's shards are a few images each."""
  monkeypatch.setattr(tfds_shuffle, 'MAX_MEM_BUFFER_SIZE', 0)
  monkeypatch.setattr(tfds_shuffle._Bucket, 'add', _no_tensorflow)  # pylint: disable=protected-access
  monkeypatch.setattr(builder_lib, 'SHARD_BYTES', 2000)


def _tfds_shuffler_order(split: str, keys) -> list[str]:
  """The order tfds' own shuffler gives these keys (in memory, where the keys alone fit)."""
  with mock.patch.object(tfds_shuffle, 'MAX_MEM_BUFFER_SIZE', 1 << 30):
    shuffler = tfds_shuffle.Shuffler(dirpath='/nonexistent', hash_salt=split)
    for key in keys:
      shuffler.add(key, key.encode())
    return [data.decode() for _, data in shuffler]


def _read_back(data_dir, config: str, split: str) -> list[tuple[str, tuple[str, ...], bytes]]:
  source = tfds.data_source(f'capjax_captions/{config}', data_dir=data_dir, split=split, download=False)
  return [(records_lib.as_text(r['image_id']), tuple(records_lib.record_captions(r)), r['image'])
          for r in source]


def _shard_files(data_dir, config: str, split: str) -> list[pathlib.Path]:
  return sorted(pathlib.Path(data_dir).glob(f'capjax_captions/{config}/1.1.0/*-{split}.array_record-*'))


def test_real_split_past_the_shuffle_buffer_reads_back_record_for_record(tmp_path, past_the_shuffle_buffer):
  fixture = ff.make_flickr8k_original(tmp_path / 'manual')
  records, _ = layouts.read_records(fixture.root)
  by_id = {r.image_id: r for r in records}
  summary = prepare.prepare_dataset('flickr8k', tmp_path / 'data', manual_dir=fixture.root)
  assert summary['images'] == fixture.split_sizes(without_bad=True)
  for split in layouts.SPLITS:
    kept = [i for i, s in fixture.splits.items() if s == split and i not in fixture.bad_images]
    expected = [(i, by_id[i].captions, pathlib.Path(by_id[i].image_path).read_bytes())
                for i in _tfds_shuffler_order(split, kept)]
    assert _read_back(tmp_path / 'data', 'flickr8k', split) == expected
  assert len(_shard_files(tmp_path / 'data', 'flickr8k', 'train')) > 3


def test_shapes_past_the_shuffle_buffer_keep_the_shufflers_order(tmp_path, past_the_shuffle_buffer):
  summary = prepare.prepare_dataset('shapes', tmp_path / 'data', **SMALL_SHAPES)
  for split in layouts.SPLITS:
    generated = {e['image_id']: e for e in shapes.generate_records(
        split, SMALL_SHAPES[f'num_{split}'], SMALL_SHAPES['image_size'])}
    expected = [(i, tuple(generated[i]['captions']), generated[i]['image'])
                for i in _tfds_shuffler_order(split, list(generated))]
    assert _read_back(tmp_path / 'data', summary['config'], split) == expected
  assert len(_shard_files(tmp_path / 'data', summary['config'], 'train')) > 3
  assert not list(pathlib.Path(summary['data_path']).glob('spill-*')), 'spill files left behind'


def test_captions_files_match_the_records(tmp_path, past_the_shuffle_buffer):
  fixture = ff.make_karpathy_coco(tmp_path / 'manual')
  summary = prepare.prepare_dataset('coco', tmp_path / 'data', manual_dir=fixture.root)
  for split, source in prepare.open_splits('coco', tmp_path / 'data').items():
    lines = (pathlib.Path(summary['data_path']) / f'{split}_captions.jsonl').read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {'image_id': records_lib.as_text(r['image_id']), 'captions': records_lib.record_captions(r)}
        for r in source]


def test_repeated_image_ids_are_an_error():
  with pytest.raises(ValueError, match=r"'train' lists 'a.jpg' twice"):
    builder_lib.in_tfds_order('train', ['b.jpg', 'a.jpg', 'c.jpg', 'a.jpg'], key=lambda k: k)


def test_shards_are_cut_by_size_in_order():
  groups = builder_lib.size_bounded_groups(list('abcde'), [3, 3, 9, 1, 1], budget=6)
  assert groups == [['a', 'b'], ['c'], ['d', 'e']]


# ------------------------------------------------------------------------ prepare's memory ---

def _write_karpathy_coco(root: pathlib.Path, num_images: int, jpeg: bytes) -> None:
  """A COCO-shaped Karpathy layout: `num_images` copies of one JPEG, 4/5 train, the rest val/test."""
  (root / 'train2014').mkdir(parents=True)
  entries = []
  for i in range(num_images):
    name = f'COCO_train2014_{i:012d}.jpg'
    (root / 'train2014' / name).write_bytes(jpeg)
    split = 'train' if i % 5 else ('val', 'test')[i // 5 % 2]
    entries.append({'filepath': 'train2014', 'filename': name, 'split': split, 'cocoid': i,
                    'sentences': [{'raw': f'A photo number {i} of a thing {k} .'} for k in range(5)]})
  (root / 'dataset_coco.json').write_text(json.dumps({'images': entries, 'dataset': 'coco'}))


def _noise_jpeg(side: int) -> bytes:
  pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format='JPEG', quality=95)
  return out.getvalue()


def _prepare_peak_bytes(tmp_path: pathlib.Path, num_images: int, jpeg: bytes) -> int:
  manual_dir = tmp_path / f'manual{num_images}'
  _write_karpathy_coco(manual_dir, num_images, jpeg)
  tracemalloc.start()
  try:
    prepare.prepare_dataset('coco', tmp_path / f'data{num_images}', manual_dir=manual_dir)
    return tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


def test_prepare_memory_does_not_grow_with_the_split(tmp_path, monkeypatch):
  # tracemalloc sees every Python allocation (image bytes, serialized examples, the shuffler's buffer):
  # 10x the images (2.4 MB -> 24 MB of JPEGs) may only add the per-image metadata (captions, paths).
  monkeypatch.setattr(builder_lib, 'SHARD_BYTES', 1 << 20)
  jpeg = _noise_jpeg(224)
  assert len(jpeg) > 50_000
  _prepare_peak_bytes(tmp_path, 10, jpeg)  # the first prepare of a process imports and caches more
  small = _prepare_peak_bytes(tmp_path, 40, jpeg)
  large = _prepare_peak_bytes(tmp_path, 400, jpeg)
  data_growth = 360 * len(jpeg)
  assert large - small < data_growth / 5, (small, large, data_growth)


# ------------------------------------------------------------- captions without the images ---

class _NoRecordReads:
  """A prepared split whose records cannot be read: a tfds record always carries its image, so reading
  one means reading a training image. Everything else (length, dataset_info, split) passes through."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def __getattr__(self, name):
    if name in ('__getitem__', '__getitems__', '__iter__'):
      raise AttributeError(name)
    return getattr(self._source, name)

  def __getitem__(self, index):
    raise AssertionError(f'read training record {index} (and with it its image)')

  def __iter__(self):
    raise AssertionError('iterated over the training records (and their images)')


@pytest.fixture
def prepared_shapes(tmp_path):
  prepare.prepare_dataset('shapes', tmp_path / 'data', **SMALL_SHAPES)
  return prepare.open_splits('shapes', tmp_path / 'data', **SMALL_SHAPES)


def test_evaluation_never_reads_a_training_image(prepared_shapes, monkeypatch):
  splits = dict(prepared_shapes)
  expected = [c for r in splits['train'] for c in records_lib.record_captions(r)]
  splits['train'] = _NoRecordReads(splits['train'])
  seen = {}
  # Captioning and provenance are other tests' business; what reaches the analysis is this one's.
  monkeypatch.setattr(captioning, 'caption_split', lambda *args, **kwargs: [])
  monkeypatch.setattr(provenance_lib, 'collect', lambda *args, **kwargs: None)
  monkeypatch.setattr(analysis, 'analyse', lambda captioned, **kwargs: seen.update(kwargs))
  evaluator.evaluate(None, None, config=tiny.get_config(), vocab=None, splits=splits, split='test', mesh=None,
                     decode=captioning.DecodeSettings(), workdir='unused', step=0, checkpoint_choice='latest')
  assert seen['train_captions'] == expected


def test_vocabulary_scst_reward_and_caption_table_never_read_a_training_image(prepared_shapes, tmp_path):
  """What needs only the training captions (the vocabulary, SCST's reference statistics, device-resident
  training's caption table) reads the split's captions file: at COCO size the records are 19 GB."""
  train = prepared_shapes['train']
  expected = [records_lib.record_captions(r) for r in train]
  unreadable = _NoRecordReads(train)
  config = tiny.get_config()
  vocab = workdir_lib.load_or_build_vocab(str(tmp_path), config.data, unreadable)
  assert vocab.words == vocab_lib.build_vocabulary([c for cs in expected for c in cs],
                                                  config.data.min_word_count).words
  reward = scst.CaptionReward.from_source(unreadable, vocab)
  assert reward.num_images == len(expected)
  table = input_pipeline.CaptionsOnly(unreadable)
  assert [table[i]['captions'] for i in range(len(table))] == expected


def test_older_prepared_data_gets_its_captions_file_once(prepared_shapes, capsys):
  train = prepared_shapes['train']
  path = records_lib.captions_path(train)
  expected = [records_lib.record_captions(r) for r in train]
  pathlib.Path(path).unlink()  # as prepared before capjax wrote it
  assert records_lib.split_captions(train) == expected
  assert 'was missing' in capsys.readouterr().out
  assert records_lib.split_captions(_NoRecordReads(train)) == expected  # from the file written then
  assert 'was missing' not in capsys.readouterr().out


def test_a_captions_file_that_does_not_match_its_split_is_an_error(prepared_shapes):
  path = pathlib.Path(records_lib.captions_path(prepared_shapes['validation']))
  path.write_text(''.join(path.read_text().splitlines(keepends=True)[:-1]))
  with pytest.raises(ValueError, match=f'{path} has captions for 9 images but its split has 10 records'):
    records_lib.split_captions(prepared_shapes['validation'])


# ----------------------------------------------------------------------- cached features ---

class _ColourModel:
  """Stands in for a captioner in 'cached' mode: each image's features are its mean colour, repeated."""

  has_attention = False

  def __init__(self, width: int):
    self.width = width

  def cached_features(self, images):
    return jnp.tile(images.astype(jnp.float32).mean(axis=(1, 2)), (1, self.width // 3))

  def apply(self, variables, images, method):
    return method(images) * variables['params']['encoder']['trunk']['scale']


FEATURE_WIDTH = 3 * 20_000  # 240 KB a row
VARIABLES = {'params': {'encoder': {'trunk': {'scale': jnp.float32(2.0)}}}}


@pytest.fixture(scope='module')
def in_memory_shapes():
  return list(shapes.generate_records('train', 48, 32))


def _features_in_memory(model, source, mesh) -> np.ndarray:
  """What the features must be: every row gathered in memory, the way extraction once worked."""
  fn = jax.jit(lambda v, images: model.apply(v, images, method=model.cached_features))
  batches = input_pipeline.caption_batches(source, image_size=32, host_batch_size=8)
  rows = mesh_lib.apply_to_host_batches(fn, VARIABLES, batches, mesh)
  return np.stack([rows[i] for i in range(len(source))])


def _load_or_extract(workdir, source, model, mesh):
  return features_lib.load_or_extract(str(workdir), 'train', model, VARIABLES, source, mesh, image_size=32,
                                      batch_size=8)


def test_cached_features_are_memory_mapped_when_extracted_and_when_reused(tmp_path, in_memory_shapes):
  model, mesh = _ColourModel(FEATURE_WIDTH), mesh_lib.make_mesh()
  expected = _features_in_memory(model, in_memory_shapes, mesh)
  extracted = _load_or_extract(tmp_path, in_memory_shapes, model, mesh)
  reused = _load_or_extract(tmp_path, in_memory_shapes, model, mesh)
  for features in (extracted, reused):
    assert isinstance(features, np.memmap) and features.mode == 'r'
    np.testing.assert_array_equal(features, expected)
  assert not list((tmp_path / 'features').glob('*.tmp*'))


def test_feature_extraction_never_holds_all_the_features(tmp_path, in_memory_shapes):
  model, mesh = _ColourModel(FEATURE_WIDTH), mesh_lib.make_mesh()
  _load_or_extract(tmp_path / 'warm_up', in_memory_shapes[:8], model, mesh)
  tracemalloc.start()
  try:
    features = _load_or_extract(tmp_path / 'run', in_memory_shapes, model, mesh)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert features.nbytes == 48 * FEATURE_WIDTH * 4
  assert peak < features.nbytes / 2, (peak, features.nbytes)


def test_feature_source_pickles_the_file_name_not_the_features(tmp_path, in_memory_shapes):
  model, mesh = _ColourModel(FEATURE_WIDTH), mesh_lib.make_mesh()
  features = _load_or_extract(tmp_path, in_memory_shapes, model, mesh)
  source = features_lib.FeatureSource(features, in_memory_shapes)
  pickled = pickle.dumps(source)
  assert len(pickled) < 100_000
  copy = pickle.loads(pickled)
  np.testing.assert_array_equal(copy[47]['features'], source[47]['features'])
  assert copy[47]['captions'] == in_memory_shapes[47]['captions']
