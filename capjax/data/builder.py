"""The tensorflow-datasets builder for capjax caption data (`capjax_captions`).

Configs: ``flickr8k``, ``flickr30k`` and ``coco`` read a manually downloaded dataset from
``dl_manager.manual_dir`` (see `capjax.data.layouts`); ``shapes`` generates the procedural demo set with
`capjax.data.shapes.generate_records`. Use `shapes_config(...)` for a shapes set of another size.

Data is written as array_record and read with `tfds.data_source` / `builder.as_data_source()`, which needs no
TensorFlow. A record read back is a dict with:

* ``'image'``: ``bytes``, the image file as it was (JPEG, PNG, ...; decode with `capjax.images.load_image`,
  which converts every mode to RGB by one rule);
* ``'image_id'``: ``bytes`` (UTF-8), e.g. ``b'1000268201_693b08cb0e.jpg'``;
* ``'captions'``: ``list`` of ``bytes`` (UTF-8), in file order;
* ``'objects'``: ``bytes``, JSON of the demo's ground truth objects (see `capjax.data.shapes`), empty for
  real datasets.

(Measured with tensorflow-datasets 4.9.10; text is not decoded to ``str``.)

Every build writes `SUMMARY_FILE` (images and captions per split, skipped items with reasons, repairs and
conversions) next to the prepared data and logs the same summary, and each split's captions to
`records.CAPTIONS_FILE` (so that the vocabulary and evaluation never read the images).

How a split of any size is written without TensorFlow, in bounded memory: see `CapjaxCaptions`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pickle
from collections.abc import Callable, Iterable, Iterator, Sequence

from absl import logging
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import hashing as tfds_hashing
from tensorflow_datasets.core import shuffle as tfds_shuffle

from capjax import images
from capjax.data import layouts
from capjax.data import records as records_lib
from capjax.data import shapes

SUMMARY_FILE = 'capjax_build_summary.json'
SHAPES = 'shapes'
# Image bytes per array_record shard. A shard's examples are held in memory while it is written (tfds'
# ShardWriter tees its example iterator), so this bounds prepare's memory whatever the split's size;
# 128 MiB is inside tfds' own shard size range (64 MiB - 1 GiB, utils/shard_utils.py).
SHARD_BYTES = 128 << 20

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download the dataset yourself and unpack it into the manual dir (by default
<data_dir>/downloads/manual; capjax's prepare command takes --manual_dir).
Accepted layouts, detected automatically (or forced with layout=...):

* flickr8k_original: Flicker8k_Dataset/*.jpg and Flickr8k_text/ holding
  Flickr8k.token.txt and Flickr_8k.{train,dev,test}Images.txt. These are the
  Flickr8k_Dataset.zip and Flickr8k_text.zip archives (the original request
  form at the University of Illinois is gone; the same zips are mirrored on
  GitHub, e.g. the releases of jbrownlee/Datasets).
* kaggle_csv: Images/*.jpg and captions.txt ("image,caption"), as in the
  Kaggle datasets "adityajn105/flickr8k" and "adityajn105/flickr30k". Without
  the official Flickr8k split lists a seeded 75/12.5/12.5 split is made.
* karpathy_json: dataset_flickr8k.json, dataset_flickr30k.json or
  dataset_coco.json from Andrej Karpathy's caption_datasets.zip (linked from
  his "Deep Visual-Semantic Alignments" project page at Stanford), next to the
  images: Flicker8k_Dataset/ or Images/ (Flickr8k), flickr30k-images/ or
  Images/ (Flickr30k; images from the Kaggle copy or the Illinois request
  form), train2014/ and val2014/ (COCO 2014 images from the COCO website).
  Images directly in the manual dir or in images/ are found too.

COCO is read only through dataset_coco.json (the Karpathy split).
"""


@dataclasses.dataclass(eq=False)
class CapjaxCaptionsConfig(tfds.core.BuilderConfig):
  """A capjax dataset; the num_*/image_size/seed fields only apply to shapes."""

  dataset: str = ''
  num_train: int = 1500
  num_validation: int = 200
  num_test: int = 200
  image_size: int = 96
  seed: int = 0
  object_scale: float = 1.0

  @property
  def is_procedural(self) -> bool:
    return self.dataset == SHAPES

  def split_sizes(self) -> dict[str, int]:
    return {'train': self.num_train, 'validation': self.num_validation, 'test': self.num_test}


_DEFAULT_SHAPES = CapjaxCaptionsConfig(name=SHAPES, dataset=SHAPES,
                                       description='Procedural shapes with generated captions (no download).')


def shapes_config(num_train: int | None = None, num_validation: int | None = None,
                  num_test: int | None = None, image_size: int | None = None,
                  seed: int | None = None, object_scale: float | None = None) -> CapjaxCaptionsConfig:
  """The shapes config with the given sizes (None keeps the default).

  A changed config gets its own name, e.g. ``shapes_40_10_10_32px``, because tfds keeps one prepared copy per
  config name.
  """
  sizes = dict(num_train=num_train, num_validation=num_validation, num_test=num_test, image_size=image_size,
               seed=seed, object_scale=object_scale)
  changes = {k: v for k, v in sizes.items() if v is not None and v != getattr(_DEFAULT_SHAPES, k)}
  if not changes:
    return _DEFAULT_SHAPES
  config = dataclasses.replace(_DEFAULT_SHAPES, **changes)
  name = (f'{SHAPES}_{config.num_train}_{config.num_validation}_'
          f'{config.num_test}_{config.image_size}px')
  if config.seed:
    name += f'_seed{config.seed}'
  if config.object_scale != 1.0:
    name += f'_objects{config.object_scale:g}x'
  return dataclasses.replace(config, name=name, description=f'{_DEFAULT_SHAPES.description} {name}')


class CapjaxCaptions(tfds.core.ShardBasedBuilder):
  """Images with several captions each, stored as their original encoded files.

  Why a ShardBasedBuilder (tensorflow-datasets 4.9.10): a GeneratorBasedBuilder writes every split
  through `shuffle.Shuffler`, which keeps all serialized examples in memory (`_add_to_mem_buffer`) and,
  past `MAX_MEM_BUFFER_SIZE` (1 GB), spills them to bucket files through `tf.io.gfile` (`_Bucket.add`):
  memory grows with the split and a split over 1 GB fails without TensorFlow, `disable_shuffling` or
  not. `ShardBasedBuilder._download_and_prepare` (dataset_builder.py) instead hands each shard's
  example generator to `SplitBuilder.submit_shard_based_generation` (split_builder.py), which writes
  it with `writer.ShardWriter` (encode, serialize, `ArrayRecordFileAdapter.write_examples`) to the
  same file names (`filename_template.sharded_filepath`), records the same `SplitInfo` (shard lengths,
  bytes) and lets `download_and_prepare` write dataset_info.json as for any build: same files, same
  readers, no shuffler. That writer tees each shard's examples (`ShardWriter.write`), so a shard is
  held in memory once: shards are cut to `SHARD_BYTES` of images.

  Record order stays what the shuffler gave (earlier builds, cached features and "the first N
  validation images" keep meaning the same images): the shuffler yields examples sorted by
  `hashing.Hasher(split).hash_key(key)` (`Shuffler.add`, `_iter_mem`, `_iter_buckets`; the salt is
  the split name, `_build_from_generator`), so the examples are put in that order before sharding:
  real datasets' records by their image ids (known before any image is read), the generated shapes
  through local spill files by hash range (`_HashOrderSpill`). A build is thus the same record for
  record as one from before (tests/test_scale_paths.py checks it against tfds' own shuffler), and the
  version stays 1.1.0: data prepared earlier is still used (only its captions files are missing, see
  `records.split_captions`).
  """

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {
      '1.0.0': 'First release.',
      '1.1.0': "Image files stored as they are (converted to RGB when read); 'objects': the demo's "
               'ground truth (JSON; empty for real datasets).',
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [
      CapjaxCaptionsConfig(name='flickr8k', dataset='flickr8k',
                           description='Flickr8k: 8000 images, 5 captions each.'),
      CapjaxCaptionsConfig(name='flickr30k', dataset='flickr30k',
                           description='Flickr30k: 31783 images, 5 captions each.'),
      CapjaxCaptionsConfig(name='coco', dataset='coco', description='COCO 2014 captions, Karpathy split.'),
      _DEFAULT_SHAPES,
  ]
  DEFAULT_CONFIG_NAME = SHAPES

  def __init__(self, *, layout: str = 'auto', **kwargs):
    """`layout` is passed to `layouts.read_records` ('auto' detects it)."""
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)
    self._layout = layout
    # Pickling rebuilds the builder from _original_state; keep the layout.
    self._original_state = dict(self._original_state, layout=layout)
    self._report = layouts.ReadReport()
    self._manual_dir = None

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(), dtype=np.object_),
            'image_id': tfds.features.Text(),
            'captions': tfds.features.Sequence(tfds.features.Text()),
            # JSON list of the demo's objects (shape, colour, size, position, box); '' for real data.
            'objects': tfds.features.Text(),
        }),
    )

  def _shard_iterators_per_split(self, dl_manager) -> dict[str, list[Callable[[], Iterator]]]:
    config = self.builder_config
    if config.is_procedural:
      return self._shapes_shards(config)
    return self._manual_shards(dl_manager.manual_dir, config.dataset)

  # ------------------------------------------------------------------------------- shapes ---

  def _shapes_shards(self, config: CapjaxCaptionsConfig) -> dict[str, list[Callable[[], Iterator]]]:
    self._report = layouts.ReadReport(layout=SHAPES)
    shards = {}
    for split, size in config.split_sizes().items():
      if size <= 0:
        raise ValueError(f'{config.name}: split {split!r} would be empty '
                         f'(num_{split}={size})')
      # A JPEG of the noisy picture stays below its raw RGB size: an upper bound of a shard's bytes.
      num_shards = max(1, math.ceil(size * 3 * config.image_size**2 / SHARD_BYTES))
      spill = _HashOrderSpill(split, num_shards, self._scratch_path)
      shards[split] = [functools.partial(self._shapes_shard, split, spill, k) for k in range(num_shards)]
    return shards

  def _scratch_path(self, name: str) -> str:
    # data_path is the build's incomplete.* folder while tfds generates (renamed into place when done).
    return os.fspath(self.data_path / name)

  def _shapes_shard(self, split: str, spill: _HashOrderSpill, shard: int) -> Iterator:
    if shard == 0:  # shards are written in order, one after the other (submit_shard_based_generation)
      spill.fill(self._generate_shapes(split))
    with self._captions_log(split) as log:
      for key, example in spill.read(shard):
        self._report.images[split] += 1
        self._report.captions[split] += len(example['captions'])
        log(key, example['captions'])
        yield key, example

  def _generate_shapes(self, split: str) -> Iterator:
    config = self.builder_config
    for example in shapes.generate_records(split=split, num_images=config.split_sizes()[split],
                                           image_size=config.image_size, seed=config.seed,
                                           object_scale=config.object_scale):
      yield example['image_id'], {
          'image': example['image'],
          'image_id': example['image_id'],
          'captions': list(example['captions']),
          'objects': example['objects'],
      }

  # ------------------------------------------------------------------ manually downloaded ---

  def _manual_shards(self, manual_dir, dataset: str) -> dict[str, list[Callable[[], Iterator]]]:
    self._manual_dir = manual_dir
    records, self._report = layouts.read_records(manual_dir, self._layout, dataset=dataset)
    shards = {}
    for split, split_records in layouts.records_by_split(records).items():
      if not split_records:
        raise ValueError(_empty_split_message(split, manual_dir, self._report))
      ordered = in_tfds_order(split, split_records, key=lambda r: r.image_id)
      groups = size_bounded_groups(ordered, [_file_size(r.image_path) for r in ordered], SHARD_BYTES)
      shards[split] = [functools.partial(self._examples_from_files, split, group) for group in groups]
    return shards

  def _examples_from_files(self, split: str, records: Sequence[layouts.CaptionRecord]) -> Iterator:
    with self._captions_log(split) as log:
      for record in records:
        try:
          image, conversion = images.read_image_file(record.image_path)
        except images.BadImageError as e:
          logging.warning('Skipping %s: %s', record.image_id, e.reason)
          self._report.drop(record, layouts.BAD_IMAGE, e.reason)
          continue
        if conversion:
          self._report.notes.append(f'{record.image_id}: {conversion}')
        log(record.image_id, record.captions)
        yield record.image_id, {
            'image': image,
            'image_id': record.image_id,
            'captions': list(record.captions),
            'objects': '',
        }

  # --------------------------------------------------------------------------- the build ---

  def _captions_log(self, split: str):
    """A context giving log(image_id, captions), which appends a line to the split's captions file in
    record order (shards are generated in order; a failed build's folder is discarded whole)."""
    return _CaptionsLog(self._scratch_path(records_lib.CAPTIONS_FILE.format(split=split)))

  def _download_and_prepare(self, dl_manager, download_config=None):
    super()._download_and_prepare(dl_manager, download_config)
    for split, info in self.info.splits.items():
      if not info.num_examples:  # every image of the split was unreadable: never write it empty
        raise ValueError(_empty_split_message(split, self._manual_dir, self._report))
    self._log_and_save_summary()

  def _log_and_save_summary(self) -> None:
    for item in self._report.skipped:
      logging.warning('Skipped %s (%s): %s', item.name, item.reason, item.detail)
    logging.info('%s/%s build summary:\n%s', self.name, self.builder_config.name, self._report.summary())
    summary = dict(self._report.to_dict(), config=self.builder_config.name, version=str(self.version))
    (self.data_path / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))


def in_tfds_order(split: str, items: Iterable, key: Callable) -> list:
  """`items` in the order tfds' shuffler writes examples with these keys: ascending
  `hashing.Hasher(split).hash_key(key)`. Raises ValueError for a repeated key, as tfds does."""
  hasher = tfds_hashing.Hasher(split)
  keyed = sorted(((hasher.hash_key(key(item)), i, item) for i, item in enumerate(items)),
                 key=lambda t: t[:2])
  for (hkey, _, item), (next_hkey, _, _) in zip(keyed, keyed[1:]):
    if hkey == next_hkey:
      raise ValueError(f'split {split!r} lists {key(item)!r} twice; image ids must be unique')
  return [item for _, _, item in keyed]


def size_bounded_groups(items: Sequence, sizes: Sequence[int], budget: int) -> list[list]:
  """`items` cut, in order, into consecutive groups of at most `budget` total size (an item larger
  than `budget` makes a group of its own)."""
  groups, current, total = [], [], 0
  for item, size in zip(items, sizes, strict=True):
    if current and total + size > budget:
      groups.append(current)
      current, total = [], 0
    current.append(item)
    total += size
  return groups + [current] if current else groups


def _file_size(path: str) -> int:
  try:
    return os.path.getsize(path)
  except OSError:
    return 0  # reading it fails later and skips it as a bad image, with the reason


class _CaptionsLog:
  """Appends {"image_id", "captions"} JSON lines (the format `records.split_captions` reads)."""

  def __init__(self, path: str):
    self._path = path
    self._file = None

  def __enter__(self):
    self._file = open(self._path, 'a', encoding='utf-8')
    return self.write

  def write(self, image_id: str, captions: Sequence[str]) -> None:
    self._file.write(records_lib.captions_line(image_id, captions))

  def __exit__(self, *exc_info):
    self._file.close()


class _HashOrderSpill:
  """Examples that come in generation order, given back in tfds' order with one bucket in memory.

  `fill` pickles each (key, example) into the local file of its bucket, the tfds hash range
  `shuffle.get_bucket_number(hkey, num_buckets)` (monotonic in the hash, as the shuffler's own
  buckets); `read(bucket)` loads one file, sorts it by hash and deletes it. So bucket after bucket is
  the whole split in ascending hash order, the order `Shuffler` gives, using plain local files."""

  def __init__(self, split: str, num_buckets: int, scratch_path: Callable[[str], str]):
    self._split = split
    self._hasher = tfds_hashing.Hasher(split)
    self._paths = [scratch_path(f'spill-{split}-{k:05d}.pickle') for k in range(num_buckets)]

  def fill(self, examples: Iterable[tuple[str, dict]]) -> None:
    files = [open(path, 'wb') for path in self._paths]
    try:
      for key, example in examples:
        hkey = self._hasher.hash_key(key)
        bucket = tfds_shuffle.get_bucket_number(hkey, len(files))
        pickle.dump((hkey, key, example), files[bucket], protocol=pickle.HIGHEST_PROTOCOL)
    finally:
      for f in files:
        f.close()

  def read(self, bucket: int) -> Iterator[tuple[str, dict]]:
    entries = []
    with open(self._paths[bucket], 'rb') as f:
      while True:
        try:
          entries.append(pickle.load(f))
        except EOFError:
          break
    os.remove(self._paths[bucket])
    entries.sort(key=lambda entry: entry[0])
    for (hkey, key, _), (next_hkey, _, _) in zip(entries, entries[1:]):
      if hkey == next_hkey:
        raise ValueError(f'split {self._split!r} generated {key!r} twice; image ids must be unique')
    for _, key, example in entries:
      yield key, example


def _empty_split_message(split: str, manual_dir, report: layouts.ReadReport) -> str:
  return (f'The {split!r} split has no usable images in manual dir '
          f'{os.fspath(manual_dir)} (layout {report.layout}). What was read '
          f'so far:\n{report.summary()}')
