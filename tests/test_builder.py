"""Tests for the capjax_captions tfds builder and prepare/open_splits."""

import io
import json

import pytest
from PIL import Image
import tensorflow_datasets as tfds

from capjax import images
from capjax.data import builder as builder_lib
from capjax.data import layouts
from capjax.data import prepare

import flickr_fixtures as ff

SMALL_SHAPES = dict(num_train=40, num_validation=10, num_test=10, image_size=32)


def _decode(jpeg: bytes) -> Image.Image:
  img = Image.open(io.BytesIO(jpeg))
  img.load()
  return img


def _as_text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else value


@pytest.mark.parametrize('make, name', [
    (ff.make_flickr8k_original, 'flickr8k'),
    (ff.make_kaggle_csv, 'flickr8k'),
    (ff.make_karpathy_flickr8k, 'flickr8k'),
    (ff.make_karpathy_coco, 'coco'),
])
def test_build_and_read_back(tmp_path, make, name):
  fixture = make(tmp_path / 'manual')
  summary = prepare.prepare_dataset(name, tmp_path / 'data', manual_dir=fixture.root)

  expected_sizes = fixture.split_sizes(without_bad=True)
  assert summary['images'] == expected_sizes
  bad = [i for i in summary['skipped'] if i['reason'] == 'bad_image']
  assert {i['name'] for i in bad} == fixture.bad_images
  assert all('OSError' in i['detail'] for i in bad), bad  # the truncated JPEG, found by decoding it
  converted = {note.split(':')[0] for note in summary['notes'] if '-> RGB when read' in note}
  assert converted == fixture.converted

  sources = prepare.open_splits(name, tmp_path / 'data')
  assert {s: len(src) for s, src in sources.items()} == expected_sizes
  read_back = {}
  for split, source in sources.items():
    for i in range(len(source)):
      record = source[i]
      assert isinstance(record['image'], bytes)
      assert isinstance(record['image_id'], bytes)
      assert isinstance(record['captions'], list)
      assert images.load_image(record['image']).size == ff.IMAGE_SIZE
      read_back[_as_text(record['image_id'])] = (
          split, tuple(_as_text(c) for c in record['captions']))
  assert {k: v[0] for k, v in read_back.items()} == {
      k: v for k, v in fixture.splits.items() if k not in fixture.bad_images}
  for image_id, captions in fixture.captions.items():
    assert read_back[image_id][1] == captions


def test_image_files_are_stored_unchanged(tmp_path):
  fixture = ff.make_flickr8k_original(tmp_path / 'manual')
  prepare.prepare_dataset('flickr8k', tmp_path / 'data', manual_dir=fixture.root)
  source = tfds.data_source('capjax_captions/flickr8k', data_dir=tmp_path / 'data',
                            split='train', download=False)
  records, _ = layouts.read_records(fixture.root)
  path_of = {r.image_id: r.image_path for r in records}
  assert fixture.converted and len(source) > len(fixture.converted)
  for record in source:  # converted ones too: the pipeline converts them when it reads them
    with open(path_of[_as_text(record['image_id'])], 'rb') as f:
      assert record['image'] == f.read()


def test_summary_json_is_written_next_to_the_data(tmp_path):
  fixture = ff.make_flickr8k_original(tmp_path / 'manual')
  summary = prepare.prepare_dataset('flickr8k', tmp_path / 'data', manual_dir=fixture.root)
  path = tmp_path / 'data/capjax_captions/flickr8k/1.1.0' / builder_lib.SUMMARY_FILE
  assert summary['data_path'] == str(path.parent)
  on_disk = json.loads(path.read_text())
  assert on_disk['images'] == summary['images']
  assert on_disk['layout'] == layouts.FLICKR8K_ORIGINAL
  reasons = {item['reason'] for item in on_disk['skipped']}
  assert reasons == {'missing_file', 'bad_image', 'malformed_line', 'no_split',
                     'no_captions'}


def test_prepare_is_idempotent(tmp_path, capsys):
  fixture = ff.make_flickr8k_original(tmp_path / 'manual')
  first = prepare.prepare_dataset('flickr8k', tmp_path / 'data', manual_dir=fixture.root)
  data_files = sorted((tmp_path / 'data/capjax_captions/flickr8k/1.1.0').iterdir())
  mtimes = [p.stat().st_mtime_ns for p in data_files]
  second = prepare.prepare_dataset('flickr8k', tmp_path / 'data', manual_dir=fixture.root)
  assert first['rebuilt'] and not second['rebuilt']
  assert [p.stat().st_mtime_ns for p in data_files] == mtimes
  assert second['images'] == first['images']
  assert 'already prepared' in capsys.readouterr().out


def test_layout_option_reaches_the_builder(tmp_path):
  root = tmp_path / 'manual'
  ff.make_kaggle_csv(root)
  ff.make_karpathy_flickr8k(root)  # Auto-detection would pick this one.
  summary = prepare.prepare_dataset('flickr8k', tmp_path / 'data', manual_dir=root,
                                    layout='kaggle_csv')
  assert summary['layout'] == layouts.KAGGLE_CSV


def test_small_shapes_build(tmp_path):
  summary = prepare.prepare_dataset('shapes', tmp_path / 'data', **SMALL_SHAPES)
  assert summary['config'] == 'shapes_40_10_10_32px'
  assert summary['images'] == {'train': 40, 'validation': 10, 'test': 10}
  # A fresh reader needs only the name and data_dir.
  source = tfds.data_source(f'capjax_captions/{summary["config"]}',
                            data_dir=tmp_path / 'data', split='validation',
                            download=False)
  record = source[0]
  assert _decode(record['image']).size == (32, 32)
  assert record['captions'] and all(isinstance(c, bytes) for c in record['captions'])
  sources = prepare.open_splits('shapes', tmp_path / 'data', **SMALL_SHAPES)
  assert {s: len(v) for s, v in sources.items()} == summary['images']


def test_default_shapes_config_keeps_its_name():
  assert builder_lib.shapes_config().name == 'shapes'
  assert prepare.config_name('shapes', num_train=1500, image_size=96) == 'shapes'
  assert prepare.config_name('shapes', num_train=7) == 'shapes_7_200_200_96px'


def test_empty_split_names_split_and_manual_dir(tmp_path):
  fixture = ff.make_flickr8k_original(tmp_path / 'manual')
  for image_id, split in fixture.splits.items():
    if split == 'test':
      (fixture.root / 'Flicker8k_Dataset' / image_id).unlink()
  with pytest.raises(ValueError, match=r"'test' split has no usable images") as error:
    prepare.prepare_dataset('flickr8k', tmp_path / 'data', manual_dir=fixture.root)
  assert str(fixture.root) in str(error.value)


def test_split_emptied_by_bad_images_is_an_error(tmp_path):
  fixture = ff.make_flickr8k_original(tmp_path / 'manual')
  for image_id, split in fixture.splits.items():
    if split == 'validation':
      (fixture.root / 'Flicker8k_Dataset' / image_id).write_bytes(b'not a jpeg')
  with pytest.raises(ValueError, match=r"'validation' split has no usable images"):
    prepare.prepare_dataset('flickr8k', tmp_path / 'data', manual_dir=fixture.root)


def test_open_splits_before_prepare_is_file_not_found(tmp_path):
  with pytest.raises(FileNotFoundError, match='prepare'):
    prepare.open_splits('flickr8k', tmp_path / 'data')
  with pytest.raises(FileNotFoundError, match='prepare'):
    prepare.open_splits('shapes', tmp_path / 'data', num_train=3)


def test_bad_names_and_overrides(tmp_path):
  with pytest.raises(ValueError, match='unknown dataset'):
    prepare.prepare_dataset('imagenet', tmp_path)
  with pytest.raises(ValueError, match='only apply to the shapes'):
    prepare.prepare_dataset('flickr8k', tmp_path, num_train=10)
