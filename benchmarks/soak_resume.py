r"""Soak test of exact resume: SIGKILL a small training run at random moments, N times, then let it finish;
its epoch history and final test numbers must equal an uninterrupted run's.

Each attempt is `python launch.py` on configs/tiny.py (tiny ResNet, 32 px, 3 epochs, a checkpoint every 2
steps, validation caption metrics every epoch), killed after a random time drawn from the seeded range
(the kill lands anywhere: start-up, compile, a step, a checkpoint save, metrics, the final report).

  python -m benchmarks.soak_resume --kills=10            # ~6-8 min on the 2-core CPU machine

Writes benchmarks/results/soak_resume.json (kill times, what each attempt had printed last, and the
comparison); exits 1 when the runs differ.
"""

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ''):  # run as `python benchmarks/soak_resume.py`
  sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from absl import app
from absl import flags

from benchmarks import harness

_KILLS = flags.DEFINE_integer('kills', 10, 'How many times the run is killed before it may finish.')
_MIN_S = flags.DEFINE_float('min_seconds', 3.0, 'Earliest kill, seconds after the start of an attempt.')
_MAX_S = flags.DEFINE_float('max_seconds', 45.0, 'Latest kill, seconds after the start of an attempt.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the kill times.')
_OUTPUT = flags.DEFINE_string('output', None, 'JSON path; default benchmarks/results/soak_resume.json.')

_OVERRIDES = ['--config.train.num_epochs=3', '--config.train.checkpoint_every_steps=2',
              '--config.train.metrics_every_epochs=1', '--config.train.log_every_steps=1']


def _command(workdir: str, data_dir: str) -> list[str]:
  return [sys.executable, os.path.join(harness.REPO_ROOT, 'launch.py'),
          f'--config={os.path.join(harness.REPO_ROOT, "configs", "tiny.py")}', f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}', *_OVERRIDES]


def _run(command: list[str], log: str, kill_after: float | None) -> tuple[int, float]:
  """(exit code or -SIGKILL, seconds) of one attempt, its output appended to `log`."""
  start = time.perf_counter()
  with open(log, 'a', encoding='utf-8') as out:
    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=harness.REPO_ROOT,
                               env=dict(os.environ, JAX_PLATFORMS='cpu'))
    try:
      process.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
      process.send_signal(signal.SIGKILL)
      process.wait()
  return process.returncode, time.perf_counter() - start


def _outcome(workdir: str, log: str) -> dict:
  """What a finished run leaves: its epoch history and the final report's test lines (the last one
  printed: a killed attempt may have printed part of one)."""
  with open(os.path.join(workdir, 'history.json'), encoding='utf-8') as f:
    history = json.load(f)
  with open(log, encoding='utf-8') as f:
    lines = f.read().splitlines()
  starts = [i for i, line in enumerate(lines) if line.startswith('Test loss')]
  report = lines[starts[-1]:] if starts else []
  return {'history': history,
          'report': [line for line in report if line.startswith(('Test loss', 'Test BLEU-4', '    model:'))]}


def _last_line(log: str) -> str:
  with open(log, encoding='utf-8') as f:
    lines = [line for line in f.read().splitlines() if line.strip()]
  return lines[-1][:160] if lines else ''


def main(argv):
  del argv
  rng = random.Random(_SEED.value)
  with tempfile.TemporaryDirectory() as scratch:
    data_dir = os.path.join(scratch, 'data')
    reference_dir, soaked_dir = os.path.join(scratch, 'reference'), os.path.join(scratch, 'soaked')
    reference_log, soaked_log = reference_dir + '.log', soaked_dir + '.log'
    code, reference_s = _run(_command(reference_dir, data_dir), reference_log, None)
    if code:
      with open(reference_log, encoding='utf-8') as f:
        raise SystemExit(f'the uninterrupted run failed (exit {code}):\n{f.read()[-3000:]}')
    print(f'uninterrupted run: {reference_s:.0f} s', flush=True)
    attempts = []
    while sum(a['killed'] for a in attempts) < _KILLS.value:
      kill_after = rng.uniform(_MIN_S.value, _MAX_S.value)
      code, seconds = _run(_command(soaked_dir, data_dir), soaked_log, kill_after)
      attempts.append({'kill_after_s': round(kill_after, 2), 'killed': code == -signal.SIGKILL,
                       'exit_code': code, 'last_output': _last_line(soaked_log)})
      print(f"attempt {len(attempts)}: {'killed' if code == -signal.SIGKILL else f'exit {code}'} after "
            f"{seconds:.1f} s; last output: {attempts[-1]['last_output']}", flush=True)
      if code not in (0, -signal.SIGKILL):
        break
    code, _ = _run(_command(soaked_dir, data_dir), soaked_log, None)
    attempts.append({'kill_after_s': None, 'killed': False, 'exit_code': code,
                     'last_output': _last_line(soaked_log)})
    reference, soaked = _outcome(reference_dir, reference_log), _outcome(soaked_dir, soaked_log)
  equal = code == 0 and reference == soaked
  payload = {'kills': sum(a['killed'] for a in attempts), 'attempts': attempts,
             'uninterrupted_seconds': reference_s, 'equal': equal, 'reference': reference,
             'soaked': soaked, 'machine': harness.machine_info()}
  harness.write_json(_OUTPUT.value or harness.default_output(__file__), payload)
  print(f"{payload['kills']} kills; history and final test numbers {'EQUAL' if equal else 'DIFFERENT'} "
        'to the uninterrupted run', flush=True)
  if not equal:
    print(json.dumps({'reference': reference, 'soaked': soaked}, indent=1))
    raise SystemExit(1)


if __name__ == '__main__':
  app.run(main)
