"""The one rule that turns an image file into RGB pixels, used by prepare, training, eval and captioning.

Whatever path an image takes (stored by the dataset builder and decoded by the input pipeline, or
given to caption mode / the Python API), it goes through `load_image`, so a model sees the same pixels
in training and in use:
- alpha (RGBA, LA, PA, P with a transparent colour) is composited on white, as image viewers show it;
- 16-bit and 32-bit integer grayscale (PNG/TIFF `I;16`, `I`) is scaled to 8 bits (PIL's own
  `convert('RGB')` clips those values at 255, turning most pictures pure white); float images are
  read as 0..1 when their maximum is <= 1, else as 0..255;
- everything else (L, 1, P, CMYK, YCbCr) goes through PIL's `convert('RGB')`.
With `min_side`, a JPEG is decoded at a reduced DCT scale that still leaves each side >= `min_side`
(`Image.draft`), which is much faster for photos far larger than the model input.
"""

import io
import os
import pathlib
from typing import Any

import numpy as np
from PIL import Image

_ALPHA_MODES = ('RGBA', 'LA', 'PA', 'RGBa', 'La')
_WHITE = (255, 255, 255, 255)


class BadImageError(ValueError):
  """An image file that cannot be read or fully decoded."""

  def __init__(self, path: str | os.PathLike, reason: str):
    super().__init__(f'cannot use image {os.fspath(path)}: {reason}')
    self.path = os.fspath(path)
    self.reason = reason


def to_rgb(image: Image.Image) -> Image.Image:
  """The conversion rule of the module docstring."""
  if image.mode == 'RGB':
    return image
  if image.mode in _ALPHA_MODES or (image.mode == 'P' and 'transparency' in image.info):
    rgba = image.convert('RGBA')
    return Image.alpha_composite(Image.new('RGBA', rgba.size, _WHITE), rgba).convert('RGB')
  if image.mode.startswith('I') or image.mode == 'F':
    return Image.fromarray(_to_uint8(np.asarray(image), image.mode)).convert('RGB')
  return image.convert('RGB')


def _to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
  if mode == 'F':
    scale = 255.0 if pixels.size and float(np.nanmax(pixels)) <= 1.0 else 1.0
    return np.clip(np.nan_to_num(pixels) * scale + 0.5, 0, 255).astype(np.uint8)
  # 16-bit: 65535 -> 255 exactly. Mode 'I' (32-bit) files in practice hold 16-bit samples.
  return np.clip(np.round(pixels.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)


def load_image(image: Any, min_side: int | None = None) -> Image.Image:
  """A path, encoded bytes, PIL image or uint8 array -> RGB PIL image by the module's rule."""
  if isinstance(image, Image.Image):
    return to_rgb(image)
  if isinstance(image, np.ndarray):
    return to_rgb(Image.fromarray(image.astype(np.uint8)))
  if isinstance(image, (bytes, bytearray, memoryview)):
    image = io.BytesIO(image)
  with Image.open(image) as opened:
    if min_side:
      opened.draft('RGB', (min_side, min_side))  # no-op for non-JPEG; keeps >= min_side per side
    opened.load()
    return to_rgb(opened)


def resize_image(image: Image.Image, size: int) -> np.ndarray:
  """RGB PIL image -> uint8 (size, size, 3), bilinear (PIL antialiases when shrinking)."""
  return np.asarray(image.resize((size, size), Image.BILINEAR), np.uint8)


def read_image_file(path: str | os.PathLike) -> tuple[bytes, str | None]:
  """(the file's bytes, how `load_image` will convert it or None) for a file that decodes fully.

  The dataset builder stores the file as it is and the input pipeline applies `load_image` when it
  reads it, so prepared data and caption mode see the same pixels. Raises BadImageError for a file
  that cannot be read or decoded (truncated files included: everything is decoded once here)."""
  try:
    data = pathlib.Path(path).read_bytes()
  except OSError as e:
    raise BadImageError(path, f'cannot read file: {e}') from e
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      kind = f"{image.format}{' progressive' if image.info.get('progressive') else ''} {image.mode}"
      to_rgb(image)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise BadImageError(path, f'{type(e).__name__}: {e}') from e
  return data, (None if image.mode == 'RGB' else f'{kind} -> RGB when read')
