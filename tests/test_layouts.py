"""Tests for capjax.data.layouts: layout detection and real-file quirks."""

import collections

import pytest

from capjax.data import layouts

import flickr_fixtures as ff


def _skipped_names(report: layouts.ReadReport) -> dict[str, set[str]]:
  names = collections.defaultdict(set)
  for item in report.skipped:
    names[item.reason].add(item.name)
  return dict(names)


def _check_records_match(fixture: ff.Fixture, records, *, without_bad: bool):
  expected = {k: v for k, v in fixture.splits.items()
              if not (without_bad and k in fixture.bad_images)}
  assert {r.image_id: r.split for r in records} == expected
  by_id = {r.image_id: r for r in records}
  for image_id, captions in fixture.captions.items():
    assert by_id[image_id].captions == captions


# ---------------------------------------------------------------- detection ---


@pytest.mark.parametrize('make, layout', [
    (ff.make_flickr8k_original, layouts.FLICKR8K_ORIGINAL),
    (ff.make_kaggle_csv, layouts.KAGGLE_CSV),
    (ff.make_karpathy_flickr8k, layouts.KARPATHY_JSON),
    (ff.make_karpathy_coco, layouts.KARPATHY_JSON),
])
def test_detects_each_layout(tmp_path, make, layout):
  fixture = make(tmp_path / 'manual')
  assert layouts.detect_layout(fixture.root) == layout


def test_detection_prefers_karpathy_then_original_then_kaggle(tmp_path):
  root = tmp_path / 'manual'
  ff.make_kaggle_csv(root)
  assert layouts.detect_layout(root) == layouts.KAGGLE_CSV
  ff.make_flickr8k_original(root)
  assert layouts.detect_layout(root) == layouts.FLICKR8K_ORIGINAL
  ff.make_karpathy_flickr8k(root)
  assert layouts.detect_layout(root) == layouts.KARPATHY_JSON
  # A Karpathy file for another dataset is no marker for this one.
  assert layouts.detect_layout(root, dataset='coco') == layouts.FLICKR8K_ORIGINAL


def test_explicit_layout_overrides_detection(tmp_path):
  root = tmp_path / 'manual'
  kaggle = ff.make_kaggle_csv(root)
  ff.make_flickr8k_original(root)
  records, report = layouts.read_records(root, layout=layouts.KAGGLE_CSV)
  assert report.layout == layouts.KAGGLE_CSV
  assert all('/Images/' in r.image_path for r in records)
  by_id = {r.image_id: r for r in records}
  for image_id, captions in kaggle.captions.items():
    assert by_id[image_id].captions == captions
  # The Flickr8k split lists written by the other fixture now decide the split.
  assert any('official Flickr8k lists' in note for note in report.notes)


def test_unrecognised_layout_lists_markers_and_contents(tmp_path):
  (tmp_path / 'readme.txt').write_text('hello')
  (tmp_path / 'photos').mkdir()
  with pytest.raises(ValueError) as error:
    layouts.read_records(tmp_path)
  message = str(error.value)
  for looked_for in ('Flickr8k.token.txt', 'captions.txt', 'dataset_coco.json',
                     'dataset_flickr8k.json'):
    assert looked_for in message
  assert 'readme.txt' in message and 'photos/' in message


def test_unknown_layout_name_and_missing_dir(tmp_path):
  with pytest.raises(ValueError, match='layout must be'):
    layouts.read_records(tmp_path, layout='zip')
  with pytest.raises(ValueError, match='does not exist'):
    layouts.read_records(tmp_path / 'nope')


def test_no_image_folder_is_a_clear_error(tmp_path):
  fixture = ff.make_flickr8k_original(tmp_path / 'manual', with_images=False)
  with pytest.raises(ValueError, match='None of the 15 images named in '
                     'Flickr8k.token.txt were found.*Flicker8k_Dataset'):
    layouts.read_records(fixture.root)


# ------------------------------------------------------ flickr8k original ---


def test_flickr8k_original_quirks(tmp_path):
  fixture = ff.make_flickr8k_original(tmp_path / 'manual')
  records, report = layouts.read_records(fixture.root)
  _check_records_match(fixture, records, without_bad=False)
  assert _skipped_names(report) == fixture.skipped
  assert report.images == fixture.split_sizes()
  assert report.captions == {s: 5 * n for s, n in fixture.split_sizes().items()}
  # The '.1' name is resolved to the file on disk, and that is noted.
  assert any('.jpg.1' in note and 'read as' in note for note in report.notes)
  # CRLF and BOM leave no stray characters behind.
  for record in records:
    assert all('\r' not in c and '\ufeff' not in c and c == c.strip()
               for c in record.captions)
    assert not record.image_id.startswith('\ufeff')


def test_flickr8k_text_files_directly_in_manual_dir(tmp_path):
  fixture = ff.make_flickr8k_original(tmp_path / 'manual', text_dir='')
  records, report = layouts.read_records(fixture.root)
  assert report.layout == layouts.FLICKR8K_ORIGINAL
  _check_records_match(fixture, records, without_bad=False)


# -------------------------------------------------------------- kaggle csv ---


def test_kaggle_csv_quirks_and_seeded_split(tmp_path):
  fixture = ff.make_kaggle_csv(tmp_path / 'manual')
  records, report = layouts.read_records(fixture.root)
  # Quoted commas and quotes, an unquoted comma, non-ASCII, a '.1' name.
  _check_records_match(fixture, records, without_bad=False)
  assert _skipped_names(report) == fixture.skipped
  assert report.images == {'train': 12, 'validation': 2, 'test': 2}
  assert any('seeded split' in note for note in report.notes)


def test_seeded_split_is_deterministic_and_proportioned():
  names = [f'{i:05d}.jpg' for i in range(8091)]
  split = layouts.seeded_split(names)
  assert split == layouts.seeded_split(reversed(names))
  counts = collections.Counter(split.values())
  assert counts == {'train': 6069, 'validation': 1011, 'test': 1011}


def test_kaggle_csv_uses_official_split_lists_found_below(tmp_path):
  fixture = ff.make_kaggle_csv(tmp_path / 'manual', split_lists_in='extras/text')
  records, report = layouts.read_records(fixture.root)
  _check_records_match(fixture, records, without_bad=False)
  assert _skipped_names(report) == fixture.skipped
  # Flickr8k lists are not applied to another dataset.
  records, _ = layouts.read_records(fixture.root, dataset='flickr30k')
  assert len(records) == 16


# ----------------------------------------------------------- karpathy json ---


@pytest.mark.parametrize('image_dir', ['Flicker8k_Dataset', 'Images', 'images', '.'])
def test_karpathy_flickr8k(tmp_path, image_dir):
  fixture = ff.make_karpathy_flickr8k(tmp_path / 'manual', image_dir=image_dir)
  records, report = layouts.read_records(fixture.root)
  # restval -> train, val -> validation, tokens when raw is empty.
  _check_records_match(fixture, records, without_bad=False)
  assert _skipped_names(report) == fixture.skipped
  assert report.images == {'train': 7, 'validation': 2, 'test': 3}


def test_karpathy_coco_filepath_folders(tmp_path):
  fixture = ff.make_karpathy_coco(tmp_path / 'manual')
  records, report = layouts.read_records(fixture.root)
  _check_records_match(fixture, records, without_bad=False)
  assert report.skipped == []
  by_id = {r.image_id: r for r in records}
  val_path = by_id['val2014/COCO_val2014_000000000001.jpg'].image_path
  train_path = by_id['train2014/COCO_train2014_000000000001.jpg'].image_path
  assert val_path == str(fixture.root / 'images/val2014/COCO_val2014_000000000001.jpg')
  assert train_path == str(fixture.root / 'train2014/COCO_train2014_000000000001.jpg')


def test_several_karpathy_files_need_a_dataset_name(tmp_path):
  root = tmp_path / 'manual'
  flickr = ff.make_karpathy_flickr8k(root)
  coco = ff.make_karpathy_coco(root)
  with pytest.raises(ValueError, match='pass dataset='):
    layouts.read_records(root)
  records, _ = layouts.read_records(root, dataset='coco')
  _check_records_match(coco, records, without_bad=False)
  records, _ = layouts.read_records(root, dataset='flickr8k')
  _check_records_match(flickr, records, without_bad=False)


# ------------------------------------------------------------------ report ---


def test_report_summary_and_round_trip(tmp_path):
  fixture = ff.make_flickr8k_original(tmp_path / 'manual')
  _, report = layouts.read_records(fixture.root)
  report.skip(layouts.BAD_IMAGE, 'broken.jpg', 'the builder found it truncated')  # as the builder does
  text = report.summary()
  assert 'train: 9 images, 45 captions' in text  # the builder, not the reader, drops bad images
  for reason in ('missing_file', 'bad_image', 'malformed_line', 'no_split',
                 'no_captions'):
    assert reason in text
  assert 'ghost.jpg' in text and 'Flickr8k.token.txt:8' in text
  assert layouts.ReadReport.from_dict(report.to_dict()) == report
