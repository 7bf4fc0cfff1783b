"""Uploaded bytes -> the pixels the model sees, or why they cannot be captioned (`ImageRefused`).

Each image is first checked from its header alone (`check_upload`): its pixel count (decompression
bombs) and the memory its decoding will hold (`decode_bytes`: size, bit depth and the conversions of
`images.load_image`, so a small 16-bit PNG of many pixels is refused before it costs anything). Then
`read_upload` decodes it. Empty, unreadable, oversized and too costly images are refused one by one,
with the HTTP status the API answers. Nothing here knows about HTTP requests: `capjax.serve.app` calls
these functions in its decode threads.
"""

import io

import numpy as np
from PIL import Image

from capjax import images as images_lib

# What `images.to_rgb` composites on white (mirrors its own list; tests/test_serve_hardening.py checks).
_ALPHA_MODES = ('RGBA', 'LA', 'PA', 'RGBa', 'La')
# On top of the image's own bytes: decoder buffers and allocator slack (measured: 2.5-3 MB whatever the
# size), and 5% of the estimate (what a decode held beyond the model below: at most 2%, measured).
_FIXED_BYTES = 4 * 2**20
_SLACK = 1.05


class ImageRefused(Exception):
  """One uploaded image that cannot be captioned; the others of its request still are."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status, self.message = status, message


def decode_bytes(mode: str, size: tuple[int, int], *, transparency: bool = False) -> int:
  """The most memory `images.load_image` holds while it decodes an image of PIL `mode` and `size` (as
  its header gives them, after `Image.draft` for a JPEG) and converts it to RGB, in bytes.

  Per pixel: the decoded image as PIL stores it (1 byte for modes 1, L and P; 2 for I;16; 4 for the rest,
  RGB included: PIL keeps RGB in 4 bytes), plus what the conversion holds beside it:
    RGB             nothing
    alpha           12: the RGBA copy, the white canvas and the composite, all at once
    I, I;16, F      the samples copied into numpy, then 16: two float64 arrays at once while they are
                    scaled to 8 bits (16-bit grayscale: 2 + 2 + 16 = 20 bytes a pixel)
    anything else   4: PIL's convert('RGB')
  """
  stored = 1 if mode in ('1', 'L', 'P') else 2 if mode.startswith('I;16') else 4
  if mode == 'RGB':
    beside = 0
  elif mode in _ALPHA_MODES or (mode == 'P' and transparency):
    beside = 12
  elif mode.startswith('I') or mode == 'F':
    beside = stored + 16
  else:
    beside = 4
  width, height = size
  return int(width * height * (stored + beside) * _SLACK) + _FIXED_BYTES


def check_upload(data: bytes, image_size: int, max_pixels: int, max_decode_bytes: int) -> int:
  """The memory decoding `data` will hold (`decode_bytes`), read from its header without decoding;
  ImageRefused when it is empty, not an image, has more than `max_pixels` pixels, or would hold more
  than `max_decode_bytes`."""
  if not data:
    raise ImageRefused(400, 'empty file (0 bytes)')
  try:
    with Image.open(io.BytesIO(data)) as header:
      width, height = header.size
      if width * height > max_pixels:
        raise ImageRefused(413, f'too many pixels: {width} x {height} = {width * height:,} is over the '
                                f'limit of {max_pixels:,} (--max_image_pixels)')
      header.draft('RGB', (image_size, image_size))  # as load_image decodes it (JPEG: a reduced scale)
      mode, decoded_size = header.mode, header.size
      cost = decode_bytes(mode, decoded_size, transparency='transparency' in header.info)
  except Image.DecompressionBombError as e:  # PIL's own limit, when it is below ours
    raise ImageRefused(413, f'too many pixels: {e}') from e
  except Image.UnidentifiedImageError as e:
    raise ImageRefused(415, 'not an image: no image format this server reads (JPEG, PNG, GIF, WebP, '
                            'BMP, TIFF...) recognises the data') from e
  except (OSError, SyntaxError, ValueError) as e:
    raise ImageRefused(415, f'not an image file this server can read ({type(e).__name__}: {e})') from e
  if cost > max_decode_bytes:
    raise ImageRefused(413, f'too large to decode: a {width} x {height} {mode} image takes about '
                            f'{cost / 2**20:,.0f} MB of memory to decode and convert, over the limit of '
                            f'{max_decode_bytes / 2**20:,.0f} MB (--max_decode_mb)')
  return cost


def read_upload(data: bytes, image_size: int) -> np.ndarray:
  """Encoded image bytes (that `check_upload` accepted) -> the uint8 (image_size, image_size, 3) pixels
  the model sees: the same `images.load_image` + `images.resize_image` as
  `ImageCaptioner.caption(bytes)`, so the API and the Python API give the same captions."""
  try:
    image = images_lib.load_image(data, image_size)
  except Image.DecompressionBombError as e:
    raise ImageRefused(413, f'too many pixels: {e}') from e
  except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data after a valid header
    raise ImageRefused(415, f'the image cannot be decoded ({type(e).__name__}: {e})') from e
  return images_lib.resize_image(image, image_size)
