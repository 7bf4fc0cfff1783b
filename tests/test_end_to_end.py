"""The real path: tfds array_record demo data -> train -> orbax checkpoint -> eval / caption modes."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from capjax import cli
from capjax import inference
from configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  base = tmp_path_factory.mktemp('e2e')
  config = tiny.get_config()
  config.data.data_dir = str(base / 'data')
  workdir = str(base / 'workdir')
  summary = cli.train(config, workdir)
  return config, workdir, summary


def test_training_writes_everything_eval_needs(trained):
  _, workdir, summary = trained
  step = summary.evaluation.provenance.checkpoint_step
  for name in ('config.json', 'vocab.json', 'history.json', 'loss_curves.png',
               f'eval_test_{step}_greedy.png'):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  history = json.load(open(os.path.join(workdir, 'history.json')))
  assert [h['epoch'] for h in history] == [1, 2]
  assert all('Bleu_4' in h and 'CIDEr' in h for h in history)
  # The demo data's validation loss by word class (which words the model has not learnt yet).
  assert all({'colour', 'shape', 'other'} <= set(h['val_loss_by_word']) for h in history), history
  assert 0.0 <= summary.evaluation.metrics['Bleu_4'] <= 1.0
  assert len(summary.evaluation.captioned) == 16


def test_best_checkpoint_is_the_best_validation_cider(trained):
  config, workdir, _ = trained
  history = json.load(open(os.path.join(workdir, 'history.json')))
  top = max(h['CIDEr'] for h in history)
  best_steps = {h['step'] for h in history if h['CIDEr'] == top}
  mesh = inference.mesh_lib.make_mesh()
  assert inference.restore_variables(workdir, 'best', mesh)[-1] in best_steps
  assert inference.restore_variables(workdir, 'latest', mesh)[-1] == history[-1]['step']


def test_eval_restores_an_eight_device_checkpoint_on_one_device(trained):
  _, workdir, _ = trained
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, 'launch.py', '--mode=eval', f'--workdir={workdir}', '--split=test',
       '--beam_size=2', '--checkpoint_step=latest'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  step = max(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())
  result = json.load(open(os.path.join(workdir, f'eval_test_{step}_beam2.json')))
  assert result['beam_size'] == 2 and len(result['captions']) == 16
  assert {'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr'} <= set(result['metrics'])
  assert os.path.exists(os.path.join(workdir, f'eval_test_{step}_beam2.png'))


def test_caption_mode_survives_a_non_image_file(trained, tmp_path, capsys):
  _, workdir, _ = trained
  folder = tmp_path / 'mine'
  folder.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (70, 50, 4), dtype=np.uint8), 'RGBA').save(folder / 'a.png')
  Image.fromarray(rng.integers(0, 255, (40, 90), dtype=np.uint8), 'L').save(folder / 'b.jpg')
  Image.new('CMYK', (30, 30), (10, 200, 30, 0)).save(folder / 'c.jpg')
  (folder / 'notes.txt').write_text('not an image')
  output = tmp_path / 'captions.jsonl'
  rows = cli.caption_images(workdir, str(folder), output=str(output), beam_size=1,
                            checkpoint='latest')
  by_file = {os.path.basename(r['file']): r for r in rows}
  assert 'error' in by_file['notes.txt']
  assert all(isinstance(by_file[n]['caption'], str) for n in ('a.png', 'b.jpg', 'c.jpg'))
  assert len(output.read_text().splitlines()) == 4
  printed = capsys.readouterr()
  assert 'a.png\t' in printed.out and 'notes.txt' in printed.err


def test_python_api_captions_in_batches(trained):
  _, workdir, _ = trained
  captioner = inference.ImageCaptioner.from_workdir(workdir, checkpoint='latest', beam_size=1,
                                                    batch_size=8)
  images = [np.full((20 + i, 30, 3), 25 * i, np.uint8) for i in range(10)]  # 2 batches, one padded
  captions = captioner.caption(images)
  assert len(captions) == 10 and all(isinstance(c, str) for c in captions)
  assert captions[:8] == captioner.caption(images[:8])
