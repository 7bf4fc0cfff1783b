"""Reading the records that `capjax.data.builder` writes (and that tests and in-memory sources imitate).

A record is a dict with ``'image'`` (the encoded image file as bytes), ``'image_id'`` and ``'captions'``
(``bytes`` or ``str``; tfds returns text as UTF-8 bytes) and, for the demo data, ``'objects'`` (JSON of the
ground-truth objects, see `capjax.data.shapes`; empty for real datasets). A source that has decoded its
images ahead (`input_pipeline.DecodedImageCache`) holds ``'pixels'`` (uint8 HWC) instead of ``'image'``.

These readers need neither tfds nor grain, so evaluation, SCST and the workdir read records without
importing the input pipeline.
"""

import json
from typing import Any

import numpy as np
from PIL import Image

from capjax import images


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
  """Every reference caption of a split, in record order (reads every record once)."""
  return [c for i in range(len(source)) for c in record_captions(source[i])]
