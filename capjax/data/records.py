"""Reading the records that `capjax.data.builder` writes (and that tests and in-memory sources imitate).

A record is a dict with ``'image'`` (the encoded image file as bytes), ``'image_id'`` and ``'captions'``
(``bytes`` or ``str``; tfds returns text as UTF-8 bytes) and, for the demo data, ``'objects'`` (JSON of the
ground-truth objects, see `capjax.data.shapes`; empty for real datasets). A source that has decoded its
images ahead (`input_pipeline.DecodedImageCache`) holds ``'pixels'`` (uint8 HWC) instead of ``'image'``.

A prepared split also has its captions in `CAPTIONS_FILE` beside its array_record files (one JSON line
per record, in record order): `split_captions`/`all_captions` read that instead of every record, whose
reading would load every image too.

These readers need neither tfds nor grain, so evaluation, SCST and the workdir read records without
importing the input pipeline.
"""

import json
import os
import re
from typing import Any

import numpy as np
from PIL import Image

from capjax import errors
from capjax import fileio
from capjax import images

# Written by `capjax.data.builder` next to a prepared split's files; {"image_id": ..., "captions": [...]}.
CAPTIONS_FILE = '{split}_captions.jsonl'


def as_bytes(value: Any) -> bytes:
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.encode('utf-8') if isinstance(value, str) else bytes(value)


def as_text(value: Any) -> str:
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def record_captions(record: dict) -> list[str]:
  return [as_text(c) for c in record['captions']]


def record_image(record: dict, min_side: int) -> Image.Image:
  """The record's picture: pre-decoded pixels when the source holds them, else its encoded file."""
  if 'pixels' in record:
    return Image.fromarray(record['pixels'])
  return images.load_image(as_bytes(record['image']), min_side)


def record_objects(record: dict) -> list[dict] | None:
  """A record's ground-truth objects, or None when its dataset has none (real data, older builds)."""
  value = record.get('objects')
  text = as_text(value) if value is not None else ''
  return json.loads(text) if text else None


def all_captions(source) -> list[str]:
  """Every reference caption of a split, in record order (see `split_captions`)."""
  return [c for captions in split_captions(source) for c in captions]


def split_captions(source) -> list[list[str]]:
  """Each record's captions, in record order. A prepared split (a tfds data source) has them in its
  `CAPTIONS_FILE`, read without touching an image. Other sources are read record by record; a prepared
  split from before that file existed is read so once, and the file is then written for next time."""
  path = captions_path(source)
  if path is None:
    return [record_captions(source[i]) for i in range(len(source))]
  if os.path.exists(path):
    return _read_captions_file(path, len(source))
  entries = []
  for i in range(len(source)):
    record = source[i]  # one read a record: each carries its image
    entries.append((as_text(record['image_id']), record_captions(record)))
  _cache_captions(path, entries)
  return [captions for _, captions in entries]


def captions_path(source) -> str | None:
  """Where a prepared split's captions file is, or None for a source that is not a whole prepared split
  (in-memory lists, sliced splits such as 'train[:10]')."""
  info, split = getattr(source, 'dataset_info', None), getattr(source, 'split', None)
  data_dir = getattr(info, 'data_dir', None)
  if data_dir is None or not isinstance(split, str) or not re.fullmatch(r'\w+', split):
    return None
  return os.path.join(os.fspath(data_dir), CAPTIONS_FILE.format(split=split))


def captions_line(image_id: str, captions) -> str:
  return json.dumps({'image_id': image_id, 'captions': list(captions)}, ensure_ascii=False) + '\n'


def _read_captions_file(path: str, num_records: int) -> list[list[str]]:
  with open(path, encoding='utf-8') as f:
    try:
      captions = [json.loads(line)['captions'] for line in f]
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f'{path}: expected one JSON line {{"image_id", "captions"}} per record ({e})') from e
  if len(captions) != num_records:
    raise ValueError(f'{path} has captions for {len(captions)} images but its split has {num_records} '
                     'records; delete the file and it is rebuilt from the records')
  return captions


def _cache_captions(path: str, entries: list[tuple[str, list[str]]]) -> None:
  try:
    fileio.write_text(path, ''.join(captions_line(image_id, captions) for image_id, captions in entries))
    outcome = 'wrote it for next time'
  except (OSError, errors.DiskFull) as e:  # a read-only or full data dir: the captions are still here
    outcome = f'could not write it ({e})'
  print(f'Note: {path} was missing (data prepared by an older capjax): read the captions from the '
        f'{len(entries)} records, images included, and {outcome}.', flush=True)
