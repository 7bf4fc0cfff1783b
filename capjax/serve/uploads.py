"""Uploaded bytes -> the pixels the model sees, or why they cannot be captioned (`ImageRefused`).

Each image is checked for its pixel count from its header before it is decoded (decompression bombs);
empty, unreadable and oversized images are refused one by one, with the HTTP status the API answers.
Nothing here knows about HTTP requests: `capjax.serve.app` calls `read_upload` in its decode threads.
"""

import io

import numpy as np
from PIL import Image

from capjax import images as images_lib


class ImageRefused(Exception):
  """One uploaded image that cannot be captioned; the others of its request still are."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status, self.message = status, message



def read_upload(data: bytes, image_size: int, max_pixels: int) -> np.ndarray:
  """Encoded image bytes -> the uint8 (image_size, image_size, 3) pixels the model sees: the same
  `images.load_image` + `images.resize_image` as `ImageCaptioner.caption(bytes)`, so the API and the
  Python API give the same captions. The pixel count is read from the header before any decoding."""
  if not data:
    raise ImageRefused(400, 'empty file (0 bytes)')
  try:
    with Image.open(io.BytesIO(data)) as header:
      width, height = header.size
  except Image.DecompressionBombError as e:  # PIL's own limit, when it is below ours
    raise ImageRefused(413, f'too many pixels: {e}') from e
  except Image.UnidentifiedImageError as e:
    raise ImageRefused(415, 'not an image: no image format this server reads (JPEG, PNG, GIF, WebP, '
                            'BMP, TIFF...) recognises the data') from e
  except (OSError, SyntaxError, ValueError) as e:
    raise ImageRefused(415, f'not an image file this server can read ({type(e).__name__}: {e})') from e
  if width * height > max_pixels:
    raise ImageRefused(413, f'too many pixels: {width} x {height} = {width * height:,} is over the '
                            f'limit of {max_pixels:,} (--max_image_pixels)')
  try:
    image = images_lib.load_image(data, image_size)
  except Image.DecompressionBombError as e:
    raise ImageRefused(413, f'too many pixels: {e}') from e
  except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data after a valid header
    raise ImageRefused(415, f'the image cannot be decoded ({type(e).__name__}: {e})') from e
  return images_lib.resize_image(image, image_size)
