"""Two processes x 2 CPU devices under jax.distributed: per-host data, global step, one checkpoint."""

import json
import os
import subprocess
import sys

import socket

HERE = os.path.dirname(os.path.abspath(__file__))


def test_two_process_training_agrees_and_checkpoints(tmp_path):
  with socket.socket() as probe:  # a free local port for the coordinator (127.0.0.1 only)
    probe.bind(('127.0.0.1', 0))
    port = probe.getsockname()[1]
  workdir = str(tmp_path / 'workdir')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, 'multihost_worker.py'), str(i),
                             str(port), workdir], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  results = [json.load(open(os.path.join(workdir, f'process_{i}.json'))) for i in range(2)]
  assert [r['devices'] for r in results] == [4, 4]
  # The step is one global computation: both hosts see the same loss at every step.
  assert results[0]['step_losses'] == results[1]['step_losses']
  assert len(results[0]['step_losses']) == 16 * 5 // 16
  history = results[0]['history'][-1]
  assert history['val_loss'] > 0 and 'Bleu_4' in history
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', str(history['step'])))
