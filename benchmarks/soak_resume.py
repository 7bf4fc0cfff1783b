r"""Soak test of exact resume: SIGKILL a small training run at random moments, N times, then let it finish;
its epoch history and final test numbers must equal an uninterrupted run's.

Each attempt is `python launch.py` on configs/tiny.py (tiny ResNet, 32 px, 3 epochs, a checkpoint every 2
steps, validation caption metrics every epoch, a progress line every step). Once an attempt has started
training (its first progress line is out: start-up and compilation are done), it is killed after a
random delay drawn from U(0, 2 T / N) (T: the uninterrupted run's time from its first step to the end,
N: the number of kills), so that the N attempts together cover about one whole run and the kills land
in steps, checkpoint saves, epoch-end metrics and the final report. Before those, --metric_kills
attempts are each killed while an epoch's validation caption metrics are being computed: once a new
epoch-end checkpoint appears in the workdir, after a random delay drawn from U(0, --metric_kill_window_s). The
comparison includes the checkpoints left on disk and the one `--checkpoint_step=best` picks.

  python -m benchmarks.soak_resume --kills=10 --metric_kills=3   # ~8-10 min on the 2-core CPU machine

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
from capjax import checkpointing

FLAGS = flags.FLAGS


def define_flags() -> None:
  # Only when this file runs as the program: absl flags are process-global and the benchmarks import
  # one another (benchmarks/harness.py, "Flags").
  flags.DEFINE_integer('kills', 10, 'How many times the run is killed at random moments.')
  flags.DEFINE_integer('metric_kills', 3, 'Then, how many times it is killed during epoch-end caption '
                       'metrics.')
  flags.DEFINE_float('metric_kill_window_s', 2.0, 'A metric kill lands this many seconds at most after '
                     'the epoch-end checkpoint appears (the tiny run computes its metrics in ~1-3 s).')
  flags.DEFINE_integer('seed', 0, 'Seed of the kill times.')
  flags.DEFINE_string('output', None, 'JSON path; default benchmarks/results/soak_resume.json.')


_OVERRIDES = ['--config.train.num_epochs=3', '--config.train.checkpoint_every_steps=2',
              '--config.train.metrics_every_epochs=1', '--config.train.log_every_steps=1']
_STEPS_PER_EPOCH = 15  # configs/tiny.py: 48 images x 5 captions / batch 16


def _command(workdir: str, data_dir: str) -> list[str]:
  return [sys.executable, os.path.join(harness.REPO_ROOT, 'launch.py'),
          f'--config={os.path.join(harness.REPO_ROOT, "configs", "tiny.py")}', f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}', *_OVERRIDES]


_STARTED = ('step ',)  # the first progress line: imports, data and compilation are done


def _run(command: list[str], log: str, kill_after: float | None,
         kill_in_metrics_of: str | None = None) -> tuple[int, float, float]:
  """(exit code or -SIGKILL, seconds until training started, seconds in all) of one attempt, its output
  appended to `log`; with `kill_after`, SIGKILL that many seconds after training started, or with
  `kill_in_metrics_of` (the workdir), that many seconds after a new epoch-end checkpoint appears in it
  (its caption metrics are then being computed). An attempt with nothing left to train (it only
  reports) is never killed."""
  start = time.perf_counter()
  offset = os.path.getsize(log) if os.path.exists(log) else 0
  started = epoch_saved = None
  epochs_before = _epoch_checkpoints(kill_in_metrics_of)
  with open(log, 'a', encoding='utf-8') as out:
    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=harness.REPO_ROOT,
                               env=dict(os.environ, JAX_PLATFORMS='cpu'))
    while process.poll() is None:
      if started is None:
        with open(log, encoding='utf-8') as f:
          f.seek(offset)
          if any(line.startswith(_STARTED) for line in f.read().splitlines()):
            started = time.perf_counter()
      elif kill_in_metrics_of and epoch_saved is None:
        if _epoch_checkpoints(kill_in_metrics_of) - epochs_before:
          epoch_saved = time.perf_counter()
      elif kill_after is not None and time.perf_counter() - (epoch_saved or started) >= kill_after:
        process.send_signal(signal.SIGKILL)
        process.wait()
        break
      time.sleep(0.05)
  started = started or time.perf_counter()
  return process.returncode, started - start, time.perf_counter() - start


def _epoch_checkpoints(workdir: str | None) -> set[int]:
  """The epoch-end steps with a finished checkpoint in `workdir` (orbax renames a save when complete)."""
  folder = os.path.join(workdir or '', 'checkpoints')
  if not workdir or not os.path.isdir(folder):
    return set()
  return {int(n) for n in os.listdir(folder) if n.isdigit() and int(n) % _STEPS_PER_EPOCH == 0}


def _outcome(workdir: str, log: str) -> dict:
  """What a finished run leaves: its epoch history and the final report's test lines (the last one
  printed: a killed attempt may have printed part of one)."""
  with open(os.path.join(workdir, 'history.json'), encoding='utf-8') as f:
    history = json.load(f)
  with open(log, encoding='utf-8') as f:
    lines = f.read().splitlines()
  starts = [i for i, line in enumerate(lines) if line.startswith('Test loss')]
  report = lines[starts[-1]:] if starts else []
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'), best_metric='CIDEr',
                                            best_mode='max', read_only=True)
  try:
    kept, best = checkpointer.all_steps(), checkpointer.best_step()
  finally:
    checkpointer.close()
  return {'history': history, 'checkpoints': kept, 'best_checkpoint': best,
          'report': [line for line in report if line.startswith(('Test loss', 'Test BLEU-4', '    model:'))]}


def _last_line(log: str) -> str:
  with open(log, encoding='utf-8') as f:
    lines = [line for line in f.read().splitlines() if line.strip()]
  return lines[-1][:160] if lines else ''


def main(argv):
  harness.start(argv)
  rng = random.Random(FLAGS.seed)
  with tempfile.TemporaryDirectory() as scratch:
    data_dir = os.path.join(scratch, 'data')
    reference_dir, soaked_dir = os.path.join(scratch, 'reference'), os.path.join(scratch, 'soaked')
    reference_log, soaked_log = reference_dir + '.log', soaked_dir + '.log'
    code, startup_s, reference_s = _run(_command(reference_dir, data_dir), reference_log, None)
    if code:
      with open(reference_log, encoding='utf-8') as f:
        raise SystemExit(f'the uninterrupted run failed (exit {code}):\n{f.read()[-3000:]}')
    print(f'uninterrupted run: {reference_s:.0f} s, {reference_s - startup_s:.0f} s after its first step',
          flush=True)
    attempts = []
    for _ in range(FLAGS.metric_kills):
      if attempts and attempts[-1]['exit_code'] != -signal.SIGKILL:
        break  # finished, or failed
      kill_after = rng.uniform(0.0, FLAGS.metric_kill_window_s)
      code, _, seconds = _run(_command(soaked_dir, data_dir), soaked_log, kill_after,
                              kill_in_metrics_of=soaked_dir)
      attempts.append({'kill_after_epoch_checkpoint_s': round(kill_after, 2),
                       'killed': code == -signal.SIGKILL, 'exit_code': code,
                       'last_output': _last_line(soaked_log)})
      print(f"attempt {len(attempts)}: {'killed' if code == -signal.SIGKILL else f'exit {code}'} "
            f"{kill_after:.1f} s after an epoch-end checkpoint ({seconds:.1f} s in all); last output: "
            f"{attempts[-1]['last_output']}", flush=True)
    while sum(a['killed'] for a in attempts) < FLAGS.metric_kills + FLAGS.kills:
      kill_after = rng.uniform(0.0, 2 * (reference_s - startup_s) / FLAGS.kills)
      if attempts and attempts[-1]['exit_code'] != -signal.SIGKILL:
        break  # the run finished (or failed) before all kills were spent
      code, _, seconds = _run(_command(soaked_dir, data_dir), soaked_log, kill_after)
      attempts.append({'kill_after_start_s': round(kill_after, 2), 'killed': code == -signal.SIGKILL,
                       'exit_code': code, 'last_output': _last_line(soaked_log)})
      print(f"attempt {len(attempts)}: {'killed' if code == -signal.SIGKILL else f'exit {code}'} "
            f"{kill_after:.1f} s after its first step ({seconds:.1f} s in all); last output: "
            f"{attempts[-1]['last_output']}", flush=True)
      if code not in (0, -signal.SIGKILL):
        break
    code, _, _ = _run(_command(soaked_dir, data_dir), soaked_log, None)
    attempts.append({'kill_after_start_s': None, 'killed': False, 'exit_code': code,
                     'last_output': _last_line(soaked_log)})
    reference, soaked = _outcome(reference_dir, reference_log), _outcome(soaked_dir, soaked_log)
  equal = code == 0 and reference == soaked
  payload = {'kills': sum(a['killed'] for a in attempts), 'attempts': attempts,
             'uninterrupted_seconds': reference_s, 'equal': equal, 'reference': reference,
             'soaked': soaked, 'machine': harness.machine_info()}
  harness.write_json(FLAGS.output or harness.default_output(__file__), payload)
  print(f"{payload['kills']} kills; history, checkpoints, best checkpoint and final test numbers "
        f"{'EQUAL' if equal else 'DIFFERENT'} to the uninterrupted run's", flush=True)
  if not equal:
    print(json.dumps({'reference': reference, 'soaked': soaked}, indent=1))
    raise SystemExit(1)


if __name__ == '__main__':
  define_flags()
  app.run(main)
