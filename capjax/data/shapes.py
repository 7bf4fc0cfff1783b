"""Built-in demo captioning data: procedurally drawn shapes with several differently worded captions.

Real captioning data cannot be downloaded everywhere, so the demo draws its own: one or two objects
(shape, colour, size, position) on a coloured, slightly noisy background, each image with five captions
from different templates. The records go through the same tfds builder, array_record files and grain
pipeline as Flickr8k. Positions use "left"/"right" from the viewer's side, so a horizontal flip with the
caption words swapped stays true.
"""

from collections.abc import Iterator
import io
import json

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ('circle', 'square', 'triangle')
COLOURS = {'red': (220, 40, 40), 'green': (40, 180, 60), 'blue': (40, 80, 220), 'yellow': (235, 210, 40)}
BACKGROUNDS = {'white': (235, 235, 235), 'black': (25, 25, 25), 'gray': (128, 128, 128)}
# Where a single object is drawn (centre as a fraction of the image) and how captions say it.
POSITIONS = {
    'left': ((0.27, 0.5), 'on the left'),
    'right': ((0.73, 0.5), 'on the right'),
    'top': ((0.5, 0.27), 'at the top'),
    'bottom': ((0.5, 0.73), 'at the bottom'),
    'middle': ((0.5, 0.5), 'in the middle'),
}
SIZES = {'small': 0.13, 'big': 0.22}
SPLIT_SEEDS = {'train': 0, 'validation': 1, 'test': 2}


def _shape_box(shape: str, centre, radius: float) -> list[float]:
  """[x0, y0, x1, y1] of what `_draw_shape` fills."""
  cx, cy = centre
  if shape == 'circle':
    return [cx - radius, cy - radius, cx + radius, cy + radius]
  if shape == 'square':
    r = radius * 0.9
    return [cx - r, cy - r, cx + r, cy + r]
  return [cx - radius, cy - radius, cx + radius, cy + radius * 0.8]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre, radius: float, fill) -> None:
  cx, cy = centre
  x0, y0, x1, y1 = _shape_box(shape, centre, radius)
  if shape == 'circle':
    draw.ellipse([x0, y0, x1, y1], fill=fill)
  elif shape == 'square':
    draw.rectangle([x0, y0, x1, y1], fill=fill)
  else:
    draw.polygon([(cx, y0), (x0, y1), (x1, y1)], fill=fill)


def _single_object_captions(obj: dict, background: str) -> list[str]:
  size, colour, shape = obj['size'], obj['colour'], obj['shape']
  where = POSITIONS[obj['position']][1]
  large = 'large' if size == 'big' else 'small'
  return [
      f'a {size} {colour} {shape} {where}',
      f'a {colour} {shape} {where} of a {background} background',
      f'there is a {large} {colour} {shape} {where}',
      f'a {colour} {shape} on a {background} background {where}',
      f'the {shape} {where} is {colour} and {size}',
  ]


def _pair_captions(left: dict, right: dict, background: str) -> list[str]:
  a = f"{left['colour']} {left['shape']}"
  b = f"{right['colour']} {right['shape']}"
  return [
      f'a {a} on the left and a {b} on the right',
      f'a {b} on the right and a {a} on the left',
      f'two shapes a {a} and a {b} on a {background} background',
      f'a {a} next to a {b}',
      f'a {background} background with a {a} on the left and a {b} on the right',
  ]


def _random_object(rng: np.random.Generator, position: str) -> dict:
  return {
      'shape': str(rng.choice(SHAPES)),
      'colour': str(rng.choice(list(COLOURS))),
      'size': str(rng.choice(list(SIZES))),
      'position': position
  }


def render_example(rng: np.random.Generator, image_size: int,
                   object_scale: float = 1.0) -> tuple[Image.Image, list[str], list[dict]]:
  """One random scene: the picture, its five captions, and its objects (the ground truth: shape,
  colour, size, position, and the drawn shape's box as fractions of the image, [x0, y0, x1, y1]).
  `object_scale` multiplies the drawn size of every object (SIZES are for 1.0)."""
  background = str(rng.choice(list(BACKGROUNDS)))
  noise = rng.normal(0.0, 10.0, (image_size, image_size, 3))
  pixels = np.clip(np.asarray(BACKGROUNDS[background], np.float32) + noise, 0, 255).astype(np.uint8)
  image = Image.fromarray(pixels)
  draw = ImageDraw.Draw(image)
  if rng.random() < 0.7:
    objects = [_random_object(rng, str(rng.choice(list(POSITIONS))))]
    captions = _single_object_captions(objects[0], background)
  else:
    objects = [_random_object(rng, 'left'), _random_object(rng, 'right')]
    captions = _pair_captions(objects[0], objects[1], background)
  for obj in objects:
    (fx, fy), _ = POSITIONS[obj['position']]
    jitter = rng.uniform(-0.05, 0.05, 2)
    centre = ((fx + jitter[0]) * image_size, (fy + jitter[1]) * image_size)
    radius = SIZES[obj['size']] * object_scale * image_size
    _draw_shape(draw, obj['shape'], centre, radius, COLOURS[obj['colour']])
    obj['box'] = [round(v / image_size, 4) for v in _shape_box(obj['shape'], centre, radius)]
  return image, captions, objects


def generate_records(split: str, num_images: int, image_size: int = 96, seed: int = 0,
                     object_scale: float = 1.0) -> Iterator[dict]:
  """Yields `{'image': JPEG bytes, 'image_id': str, 'captions': list[str], 'objects': JSON str}`,
  deterministic per split; 'objects' is the ground truth of `render_example` (for the content score)."""
  if split not in SPLIT_SEEDS:
    raise ValueError(f'split: expected one of {sorted(SPLIT_SEEDS)}, got {split!r}')
  rng = np.random.default_rng([seed, SPLIT_SEEDS[split]])
  for index in range(num_images):
    image, captions, objects = render_example(rng, image_size, object_scale)
    buffer = io.BytesIO()
    image.save(buffer, format='JPEG', quality=92)
    yield {'image': buffer.getvalue(), 'image_id': f'shapes_{split}_{index:05d}.jpg', 'captions': captions,
           'objects': json.dumps(objects)}
