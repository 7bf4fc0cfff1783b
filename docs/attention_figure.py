r"""README's attention-map picture, made as a user makes one: `launch.py --mode=caption --attention_maps`.

  python launch.py --config=configs/demo_attention.py --workdir=workdirs/demo_attention   # once
  python docs/attention_figure.py                     # -> docs/images/attention_maps.png
  python docs/attention_figure.py --index=7 --output=/tmp/maps.png

Writes held-out test image --index of the model's dataset to a JPEG file (its stored bytes), captions it
with caption mode (greedy unless --beam_size) and saves the PNG that mode wrote (the image, then each
word over its upsampled attention map) to --output. Prints the caption and the image's ground truth, so
what the figure claims can be checked against what is in the picture.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

from PIL import Image

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path[0] = str(REPO)

from capjax import workdir as workdir_lib  # noqa: E402
from capjax.data import prepare  # noqa: E402
from capjax.data import records as records_lib  # noqa: E402


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='workdirs/demo_attention')
  parser.add_argument('--index', type=int, default=88, help='which held-out test image (88: two objects)')
  parser.add_argument('--beam_size', type=int, default=1)
  parser.add_argument('--output', default=str(REPO / 'docs' / 'images' / 'attention_maps.png'))
  return parser.parse_args()


def main():
  args = parse_args()
  config = workdir_lib.load_config(args.workdir)
  record = prepare.open_dataset(config.data, build_demo=False)['test'][args.index]
  with tempfile.TemporaryDirectory() as tmp:
    image = pathlib.Path(tmp) / os.path.basename(records_lib.as_text(record['image_id']))
    image.write_bytes(record['image'])
    maps = pathlib.Path(tmp) / 'maps'
    out = pathlib.Path(tmp) / 'captions.jsonl'
    subprocess.run([sys.executable, str(REPO / 'launch.py'), '--mode=caption', f'--workdir={args.workdir}',
                    f'--images={image}', f'--beam_size={args.beam_size}', f'--attention_maps={maps}',
                    f'--output={out}'], check=True, cwd=REPO)
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    # A 256-colour palette keeps the committed picture small (the maps are gray ramps over flat colour).
    Image.open(rows[0]['attention_map']).convert('RGB').quantize(colors=256).save(args.output, optimize=True)
  print(f"caption: {rows[0]['caption']}")
  for obj in records_lib.record_objects(record) or []:
    print(f"  truth: {obj['size']} {obj['colour']} {obj['shape']} ({obj['position']}), box {obj['box']}")
  print(f'wrote {args.output}')


if __name__ == '__main__':
  main()
