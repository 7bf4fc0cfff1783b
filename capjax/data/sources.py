"""Opens the prepared splits a config names (preparing the built-in demo data on first use)."""

import os

from capjax.data import prepare

SPLITS = ('train', 'validation', 'test')


def shapes_overrides(data_config) -> dict:
  return dict(num_train=data_config.shapes_num_train, num_validation=data_config.shapes_num_validation,
              num_test=data_config.shapes_num_test, image_size=data_config.shapes_image_size)


def prepare_from_config(data_config) -> dict:
  """Builds the array_record files for `config.data` (the `--mode=prepare` command)."""
  data_dir = os.path.expanduser(data_config.data_dir)
  if data_config.name == 'shapes':
    return prepare.prepare_dataset('shapes', data_dir, **shapes_overrides(data_config))
  if not data_config.manual_dir:
    raise ValueError(f'config.data.manual_dir is empty: point it at the unpacked {data_config.name} '
                     'download (see README, "Training on Flickr8k")')
  return prepare.prepare_dataset(data_config.name, data_dir,
                                 manual_dir=os.path.expanduser(data_config.manual_dir),
                                 layout=data_config.layout)


def open_dataset(data_config) -> dict:
  """{'train'|'validation'|'test': random-access source}. The demo data is generated the first time;
  real datasets must have been prepared (their images come from a manual download)."""
  data_dir = os.path.expanduser(data_config.data_dir)
  if data_config.name == 'shapes':
    prepare_from_config(data_config)
    splits = prepare.open_splits('shapes', data_dir, **shapes_overrides(data_config))
  else:
    try:
      splits = prepare.open_splits(data_config.name, data_dir)
    except FileNotFoundError as e:
      raise FileNotFoundError(
          f'{e}.\nRun: python launch.py --mode=prepare --config=<your config> '
          f'--config.data.manual_dir=/path/to/{data_config.name}') from e
  missing = [s for s in SPLITS if s not in splits]
  if missing:
    raise ValueError(f'dataset {data_config.name!r} in {data_dir} has no {missing} split(s)')
  return splits
