"""What the train and caption modes do, called by launch.py."""

import glob
import json
import os
import sys

from capjax import evaluation
from capjax import inference
from capjax import reporting
from capjax import train as train_lib

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')


def train(config, workdir: str) -> dict:
  """Train (or resume), then report held-out captions and BLEU-4 against a trivial baseline."""
  from capjax.data import sources  # pylint: disable=g-import-not-at-top
  splits = sources.open_dataset(config.data)
  result = train_lib.train_and_evaluate(config, workdir, splits)
  return evaluation.final_report(result, config, workdir, splits)


def find_images(pattern: str) -> list[str]:
  """A file, a directory (its files, sorted) or a glob -> paths; non-image files in a directory are
  kept so that each gets its own clear error."""
  if os.path.isdir(pattern):
    return sorted(os.path.join(pattern, n) for n in os.listdir(pattern)
                  if os.path.isfile(os.path.join(pattern, n)))
  paths = sorted(glob.glob(pattern)) if any(c in pattern for c in '*?[') else [pattern]
  if not paths:
    raise FileNotFoundError(f'--images={pattern!r} matches no file')
  return paths


def caption_images(workdir: str, images: str, *, output: str | None = None, beam_size: int = 3,
                   checkpoint: str = 'best', length_penalty: float = 0.0, temperature: float = 0.0,
                   top_k: int = 0) -> list[dict]:
  """Prints `filename<TAB>caption` per image; unreadable files get an error line, the rest still run."""
  if not images:
    raise ValueError('--images is required in caption mode (a file, directory or glob)')
  captioner = inference.ImageCaptioner.from_workdir(workdir, checkpoint=checkpoint, beam_size=beam_size,
                                                    length_penalty=length_penalty,
                                                    temperature=temperature, top_k=top_k)
  loaded, rows = [], []
  for path in find_images(images):
    try:
      loaded.append((path, inference.load_image(path)))
    except Exception as e:  # pylint: disable=broad-except
      print(f'{path}: error: not a readable image ({type(e).__name__}: {e})', file=sys.stderr)
      rows.append({'file': path, 'error': f'not a readable image: {e}'})
  captions = captioner.caption([image for _, image in loaded]) if loaded else []
  for (path, _), caption in zip(loaded, captions):
    print(f'{path}\t{caption}', flush=True)
    rows.append({'file': path, 'caption': caption})
  if output:
    with open(output, 'w', encoding='utf-8') as f:
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + '\n')
    reporting.say(f'Wrote {len(rows)} lines to {output}')
  return rows
