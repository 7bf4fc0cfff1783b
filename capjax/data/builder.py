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
conversions) next to the prepared data and logs the same summary.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from capjax import images
from capjax.data import layouts
from capjax.data import shapes

SUMMARY_FILE = 'capjax_build_summary.json'
SHAPES = 'shapes'

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


class CapjaxCaptions(tfds.core.GeneratorBasedBuilder):
  """Images with several captions each, stored as their original encoded files."""

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

  def _split_generators(self, dl_manager):
    config = self.builder_config
    if config.is_procedural:
      return self._shapes_splits(config)
    return self._manual_splits(dl_manager.manual_dir, config.dataset)

  def _shapes_splits(self, config: CapjaxCaptionsConfig) -> dict[str, Iterator]:
    self._report = layouts.ReadReport(layout=SHAPES)
    for split, size in config.split_sizes().items():
      if size <= 0:
        raise ValueError(f'{config.name}: split {split!r} would be empty '
                         f'(num_{split}={size})')
    return {split: self._generate_examples(split) for split in config.split_sizes()}

  def _generate_examples(self, split: str, records: list[layouts.CaptionRecord] | None = None):
    if self.builder_config.is_procedural:
      return self._generate_shapes(split)
    return self._generate_from_files(split, records)

  def _generate_shapes(self, split: str) -> Iterator:
    config = self.builder_config
    for example in shapes.generate_records(split=split, num_images=config.split_sizes()[split],
                                           image_size=config.image_size, seed=config.seed,
                                           object_scale=config.object_scale):
      self._report.images[split] += 1
      self._report.captions[split] += len(example['captions'])
      yield example['image_id'], {
          'image': example['image'],
          'image_id': example['image_id'],
          'captions': list(example['captions']),
          'objects': example['objects'],
      }

  def _manual_splits(self, manual_dir, dataset: str) -> dict[str, Iterator]:
    self._manual_dir = manual_dir
    records, self._report = layouts.read_records(manual_dir, self._layout, dataset=dataset)
    grouped = layouts.records_by_split(records)
    for split, split_records in grouped.items():
      if not split_records:
        raise ValueError(_empty_split_message(split, manual_dir, self._report))
    return {split: self._generate_examples(split, split_records) for split, split_records in grouped.items()}

  def _generate_from_files(self, split: str, records: list[layouts.CaptionRecord]) -> Iterator:
    written = 0
    for record in records:
      try:
        image, conversion = images.read_image_file(record.image_path)
      except images.BadImageError as e:
        logging.warning('Skipping %s: %s', record.image_id, e.reason)
        self._report.drop(record, layouts.BAD_IMAGE, e.reason)
        continue
      if conversion:
        self._report.notes.append(f'{record.image_id}: {conversion}')
      written += 1
      yield record.image_id, {
          'image': image,
          'image_id': record.image_id,
          'captions': list(record.captions),
          'objects': '',
      }
    if not written:
      raise ValueError(_empty_split_message(split, self._manual_dir, self._report))

  def _download_and_prepare(self, dl_manager, download_config):
    super()._download_and_prepare(dl_manager, download_config)
    self._log_and_save_summary()

  def _log_and_save_summary(self) -> None:
    for item in self._report.skipped:
      logging.warning('Skipped %s (%s): %s', item.name, item.reason, item.detail)
    logging.info('%s/%s build summary:\n%s', self.name, self.builder_config.name, self._report.summary())
    summary = dict(self._report.to_dict(), config=self.builder_config.name, version=str(self.version))
    # self.data_path is the temporary folder tfds renames into place on success.
    (self.data_path / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))


def _empty_split_message(split: str, manual_dir, report: layouts.ReadReport) -> str:
  return (f'The {split!r} split has no usable images in manual dir '
          f'{os.fspath(manual_dir)} (layout {report.layout}). What was read '
          f'so far:\n{report.summary()}')
