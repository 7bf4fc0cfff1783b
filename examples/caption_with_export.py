"""Caption images with a capjax export directory (launch.py --mode=export) and nothing of capjax: jax,
numpy and pillow only (jax.export's deserialization also needs the flatbuffers package).

  pip install jax numpy pillow flatbuffers        # jax[cuda12] for NVIDIA GPUs
  python caption_with_export.py EXPORT_DIR photo.jpg [more.png ...] [--function=greedy]

Prints `path<TAB>caption` per image. It checks the manifest's format version, the sha256 of every file it
reads and that the function was exported for this platform; loads weights.safetensors with numpy (an
8-byte header length, a JSON header, then the raw little-endian arrays); prepares each image by the rule
of preprocessing.json; and calls the serialized function, which takes (weights, uint8 images) and returns
(token ids, lengths). The vocabulary maps ids to words (0 <PAD> and 1 <START> are skipped).
"""

import argparse
import hashlib
import json
import os
import struct
import sys

import jax
import numpy as np
from PIL import Image

FORMAT_VERSION = 1
DTYPES = {'F32': np.float32, 'F16': np.float16, 'BF16': jax.numpy.bfloat16, 'I32': np.int32,
          'I64': np.int64, 'U8': np.uint8}


def fail(message: str):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(1)


def read_verified(directory: str, name: str, manifest: dict) -> bytes:
  path = os.path.join(directory, name)
  if name not in manifest['files'] or not os.path.isfile(path):
    fail(f'{path} is missing: copy the whole export directory')
  with open(path, 'rb') as f:
    data = f.read()
  if hashlib.sha256(data).hexdigest() != manifest['files'][name]['sha256']:
    fail(f'{path} was modified: its sha256 differs from the one manifest.json records')
  return data


def read_safetensors(data: bytes) -> dict:
  (size,) = struct.unpack('<Q', data[:8])
  header = json.loads(data[8:8 + size])
  header.pop('__metadata__', None)
  body = memoryview(data)[8 + size:]
  return {name: jax.device_put(np.frombuffer(body[start:end], DTYPES[info['dtype']]).reshape(info['shape']))
          for name, info in header.items() for start, end in [info['data_offsets']]}


def load_image(path: str, size: int) -> np.ndarray:
  """preprocessing.json's rule (capjax/images.py): JPEG draft, to RGB, bilinear resize to size x size."""
  with Image.open(path) as image:
    image.draft('RGB', (size, size))
    image.load()
    alpha = image.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La')
    if alpha or (image.mode == 'P' and 'transparency' in image.info):
      image = Image.alpha_composite(Image.new('RGBA', image.size, (255,) * 4), image.convert('RGBA'))
    elif image.mode == 'F':
      pixels = np.asarray(image)
      scale = 255.0 if pixels.size and float(np.nanmax(pixels)) <= 1.0 else 1.0
      image = Image.fromarray(np.clip(np.nan_to_num(pixels) * scale + 0.5, 0, 255).astype(np.uint8))
    elif image.mode.startswith('I'):
      pixels = np.round(np.asarray(image, np.float64) / 257.0)
      image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    image = image.convert('RGB')
  return np.asarray(image.resize((size, size), Image.BILINEAR), np.uint8)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('export_dir')
  parser.add_argument('images', nargs='+')
  parser.add_argument('--function', help="'greedy', 'beam3', ... (default: the export's decoding)")
  args = parser.parse_args()
  directory = args.export_dir
  manifest_path = os.path.join(directory, 'manifest.json')
  if not os.path.isfile(manifest_path):
    fail(f'{manifest_path} not found: not a capjax export directory')
  with open(manifest_path, encoding='utf-8') as f:
    manifest = json.load(f)
  if manifest.get('format') != 'capjax-export' or manifest.get('format_version', 0) > FORMAT_VERSION:
    fail(f"{manifest_path}: format version {manifest.get('format_version')} is newer than this script "
         f'reads ({FORMAT_VERSION})')
  beam = manifest['decoding']['beam_size']
  name = args.function or ('greedy' if beam == 1 else f'beam{beam}')
  if name not in manifest['functions']:
    fail(f"{manifest_path} has no function {name!r}; it has {sorted(manifest['functions'])}")
  function = manifest['functions'][name]
  here = jax.export.default_export_platform()
  if here not in function['platforms']:
    fail(f"{name} was exported for {', '.join(function['platforms'])}, but jax runs on {here} here")
  exported = {key: jax.export.deserialize(bytearray(read_verified(directory, file, manifest)))
              for key, file in function['files'].items()}
  weights = read_safetensors(read_verified(directory, 'weights.safetensors', manifest))
  words = json.loads(read_verified(directory, 'vocab.json', manifest))['words']
  size = json.loads(read_verified(directory, 'preprocessing.json', manifest))['image_size']

  paths, pixels = [], []
  for path in args.images:
    try:
      pixels.append(load_image(path, size))
      paths.append(path)
    except Exception as e:  # pylint: disable=broad-except
      print(f'{path}: error: not a readable image ({type(e).__name__}: {e})', file=sys.stderr)
  for start in range(0, len(paths), 32):
    batch = np.stack(pixels[start:start + 32])
    if function['batch'] == 'symbolic':
      tokens, lengths = exported['b'].call(weights, batch)
    else:  # fixed batch sizes: pad to the smallest that fits (padding rows are dropped)
      fits = min((n for n in function['batch'] if n >= len(batch)), default=max(function['batch']))
      padded = np.concatenate([batch, np.zeros((fits - len(batch),) + batch.shape[1:], np.uint8)])
      tokens, lengths = exported[str(fits)].call(weights, padded)
    for path, row, length in zip(paths[start:start + 32], np.asarray(tokens), np.asarray(lengths)):
      print(f"{path}\t{' '.join(words[t] for t in row[:length] if t > 1)}", flush=True)
  if not paths:
    fail('none of the images could be read')


if __name__ == '__main__':
  main()
