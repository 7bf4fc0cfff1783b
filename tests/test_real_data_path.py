"""A user's Flickr8k download (Kaggle layout, with real-file quirks) -> prepare command -> training."""

import os
import subprocess
import sys

from capjax import train
from capjax.data import prepare
from configs import tiny
import flickr_fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_prepare_command_then_train_on_the_prepared_flickr8k(tmp_path):
  fixture = flickr_fixtures.make_kaggle_csv(tmp_path / 'download')
  data_dir = tmp_path / 'prepared'
  proc = subprocess.run(
      [sys.executable, 'launch.py', '--mode=prepare', '--config=configs/flickr8k.py',
       f'--config.data.manual_dir={fixture.root}', f'--config.data.data_dir={data_dir}'],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Skipped' in proc.stdout  # the build summary names what was left out, and why

  config = tiny.get_config()
  config.data.name = 'flickr8k'
  config.data.data_dir = str(data_dir)
  config.data.min_word_count = 1
  config.train.batch_size = 8
  config.train.eval_batch_size = 8
  config.train.num_epochs = 1
  config.train.metrics_every_epochs = 0
  splits = prepare.open_dataset(config.data)
  expected = fixture.split_sizes(without_bad=True)
  assert {s: len(splits[s]) for s in expected} == expected
  result = train.train_and_evaluate(config, str(tmp_path / 'workdir'), splits)
  assert result.history[0]['val_loss'] > 0
  assert len(result.step_losses) == len(splits['train']) * 5 // 8
