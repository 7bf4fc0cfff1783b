"""Builds a capjax dataset once and opens its splits for reading."""

from __future__ import annotations

import glob
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds

from capjax.data import builder as builder_lib
from capjax.data import layouts

DATASET_NAME = 'capjax_captions'


def prepare_dataset(
    name: str,
    data_dir: str | os.PathLike,
    manual_dir: str | os.PathLike | None = None,
    layout: str = 'auto',
    *,
    num_train: int | None = None,
    num_validation: int | None = None,
    num_test: int | None = None,
    image_size: int | None = None,
    seed: int | None = None,
    object_scale: float | None = None,
) -> dict[str, Any]:
  """Prepares dataset `name` ('flickr8k', 'flickr30k', 'coco', 'shapes') under
  `data_dir` unless it is already there, prints its summary and returns it.

  `manual_dir` holds the manually downloaded files for real datasets (default: <data_dir>/downloads/manual).
  The num_*/image_size/seed overrides apply to 'shapes' only and give it its own config name (see
  `config_name`).

  Returns the build summary (see `builder.SUMMARY_FILE`) plus 'config' (the name to pass to `open_splits`),
  'data_path' and 'rebuilt' (False when data already existed and nothing was built).
  """
  config = _config(name, num_train=num_train, num_validation=num_validation, num_test=num_test,
                   image_size=image_size, seed=seed, object_scale=object_scale)
  builder = builder_lib.CapjaxCaptions(config=config, data_dir=os.fspath(data_dir), layout=layout)
  already_prepared = builder.is_prepared()
  _report_unfinished_builds(builder)
  if not already_prepared:
    download_config = tfds.download.DownloadConfig(
        manual_dir=os.fspath(manual_dir) if manual_dir is not None else None)
    builder.download_and_prepare(download_config=download_config, file_format='array_record')
  summary = _read_summary(builder)
  summary.update(config=builder.builder_config.name, data_path=os.fspath(builder.data_path),
                 rebuilt=not already_prepared)
  print(_summary_text(summary))
  return summary


def _report_unfinished_builds(builder) -> None:
  """tfds builds into `incomplete.*` folders and renames them when done; a killed prepare leaves one
  behind. They are reported, not deleted: another prepare may be writing into the same data dir."""
  leftovers = sorted(glob.glob(os.path.join(os.fspath(builder.data_path.parent), 'incomplete.*')))
  for path in leftovers:
    age_hours = (time.time() - os.path.getmtime(path)) / 3600
    print(f'Note: {path} is an unfinished dataset build ({age_hours:.1f} h old), left by a killed prepare; '
          'delete it when no prepare is running.', flush=True)


def open_splits(
    name: str,
    data_dir: str | os.PathLike,
    **overrides: float | None,
) -> dict[str, Sequence[dict[str, Any]]]:
  """Random-access sources for each split of prepared dataset `name`.

  `name` is a config name ('flickr8k', 'shapes', 'shapes_40_10_10_32px', ...) or 'shapes' plus the same
  overrides given to `prepare_dataset`. Records are dicts of 'image' (encoded file bytes), 'image_id'
  (bytes) and 'captions' (list of bytes). Raises FileNotFoundError if it was not prepared.
  """
  config = config_name(name, **overrides)
  try:
    builder = tfds.builder(f'{DATASET_NAME}/{config}', data_dir=os.fspath(data_dir))
  except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:
    # A config name that is neither built-in nor on disk ends up as ValueError.
    raise FileNotFoundError(_not_prepared_message(config, data_dir)) from e
  if not builder.is_prepared():
    raise FileNotFoundError(_not_prepared_message(config, data_dir))
  return dict(builder.as_data_source())


def config_name(name: str, **overrides: float | None) -> str:
  """The tfds config name `prepare_dataset(name, ..., **overrides)` writes."""
  if any(v is not None for v in overrides.values()):
    return _config(name, **overrides).name
  return name


def _config(name: str, **overrides: float | None) -> builder_lib.CapjaxCaptionsConfig | str:
  if name == builder_lib.SHAPES:
    return builder_lib.shapes_config(**overrides)
  given = sorted(k for k, v in overrides.items() if v is not None)
  if given:
    raise ValueError(f'{given} only apply to the shapes dataset, not {name!r}')
  known = [c.name for c in builder_lib.CapjaxCaptions.BUILDER_CONFIGS]
  if name not in known:
    raise ValueError(f'unknown dataset {name!r}; expected one of {known}')
  return name


def _read_summary(builder: tfds.core.DatasetBuilder) -> dict[str, Any]:
  path = builder.data_path / builder_lib.SUMMARY_FILE
  if not path.exists():
    # Prepared by something other than this builder: report what tfds knows.
    return {
        'images': {
            s: info.num_examples for s, info in builder.info.splits.items()
        },
        'notes': [f'{builder_lib.SUMMARY_FILE} not found'],
        'skipped': []
    }
  with path.open() as f:
    return json.load(f)


def _summary_text(summary: dict[str, Any]) -> str:
  report = layouts.ReadReport.from_dict(summary)
  state = 'built' if summary['rebuilt'] else 'already prepared'
  return (f'{DATASET_NAME}/{summary["config"]} {state} at '
          f'{summary["data_path"]}\n{report.summary()}')


def _not_prepared_message(config: str, data_dir) -> str:
  return (f'{DATASET_NAME}/{config} is not prepared under {os.fspath(data_dir)}; '
          'run prepare_dataset (the prepare command) first')


# ---------------------------------------------------------------------------------------------
# From a config (what launch.py's prepare mode and training call)
# ---------------------------------------------------------------------------------------------


def _shapes_overrides(data_config) -> dict:
  return dict(num_train=data_config.shapes_num_train, num_validation=data_config.shapes_num_validation,
              num_test=data_config.shapes_num_test, image_size=data_config.shapes_image_size,
              # .get: config.json of a workdir trained before the field existed (drawn at 1.0) lacks it
              object_scale=data_config.get('shapes_object_scale', 1.0))


def prepare_from_config(data_config) -> dict[str, Any]:
  """Builds the array_record files for `config.data` (the `--mode=prepare` command)."""
  data_dir = os.path.expanduser(data_config.data_dir)
  if data_config.name == builder_lib.SHAPES:
    return prepare_dataset(builder_lib.SHAPES, data_dir, **_shapes_overrides(data_config))
  if not data_config.manual_dir:
    raise ValueError(f'config.data.manual_dir is empty: point it at the unpacked {data_config.name} '
                     'download (see README, "Training on Flickr8k")')
  return prepare_dataset(data_config.name, data_dir, manual_dir=os.path.expanduser(data_config.manual_dir),
                         layout=data_config.layout)


def open_dataset(data_config, *, build_demo: bool = True) -> dict[str, Sequence[dict[str, Any]]]:
  """{'train'|'validation'|'test': random-access source} for `config.data`. The demo data is generated
  the first time when `build_demo` (training); evaluation opens what training used and never builds.
  Real datasets must have been prepared (their images come from a manual download)."""
  data_dir = os.path.expanduser(data_config.data_dir)
  overrides = _shapes_overrides(data_config) if data_config.name == builder_lib.SHAPES else {}
  if data_config.name == builder_lib.SHAPES and build_demo:
    prepare_from_config(data_config)
  try:
    splits = open_splits(data_config.name, data_dir, **overrides)
  except FileNotFoundError as e:
    how = ('a demo training run builds it' if data_config.name == builder_lib.SHAPES else
           f'run: python launch.py --mode=prepare --config=<your config> '
           f'--config.data.manual_dir=/path/to/{data_config.name}')
    raise FileNotFoundError(f'{e}.\nData dir {os.path.abspath(data_dir)!r}: {how}') from e
  missing = [s for s in layouts.SPLITS if s not in splits]
  if missing:
    raise ValueError(f'dataset {data_config.name!r} in {data_dir} has no {missing} split(s)')
  return splits
