r"""Where an SCST step's time goes: sampling (device), the CIDEr-D reward (host), the update (device).

The demo config's SCST stage (configs/demo_scst.py: the demo's seed model at its image size, batch 32,
5 samples per image, its trunk mode and baseline unless --encoder_mode/--baseline say otherwise) on the
demo data, one process. Each step is `capjax.scst.ScstStep` with
`timed = True`, which waits for the update too and records the three parts' seconds; the first
`--warmup` steps (compilation) are not counted. A cross-entropy step on the same batches is timed beside
it for scale.

  python -m benchmarks.scst_step                                    # random init, ~3 min here
  python -m benchmarks.scst_step --init_from=workdirs/demo          # from the trained demo model
  python -m benchmarks.scst_step --init_from=workdirs/demo --encoder_mode=train --baseline=greedy

From random parameters samples rarely end, so every sample runs all max_caption_len words: the reward
then scores the longest captions it ever will (its worst case); a trained model (--init_from) gives the
sample lengths of a real SCST run. The demo data is built into --data_dir if it is not there.
"""

import dataclasses
import os
import sys
import time

if __package__ in (None, ''):  # run as `python benchmarks/scst_step.py`
  sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from absl import app
from absl import flags
import jax
import numpy as np

from benchmarks import harness
from capjax import inference
from capjax import input_pipeline
from capjax import mesh as mesh_lib
from capjax import scst
from capjax import state as state_lib
from capjax import vocab as vocab_lib
from capjax.data import prepare
from capjax.data import records as records_lib
from capjax.models import captioner
from configs import demo_scst


def define_flags() -> None:
  # Only when this file runs as the program: absl flags are process-global and the benchmarks import
  # one another (benchmarks/harness.py, "Flags").
  flags.DEFINE_string('data_dir', 'workdirs/data', 'Where the demo data is (or is built).')
  flags.DEFINE_string('init_from', '', 'A trained demo workdir (its best checkpoint); empty: random init.')
  flags.DEFINE_integer('batch', 0, "Images per step; 0: the config's.")
  flags.DEFINE_integer('samples', 0, "Samples per image; 0: the config's.")
  flags.DEFINE_string('encoder_mode', '', "'train' or 'frozen'; empty: the config's.")
  flags.DEFINE_string('baseline', '', "'greedy' or 'mean'; empty: the config's.")
  flags.DEFINE_integer('warmup', 2, 'Untimed steps first (compilation).')
  flags.DEFINE_integer('steps', 8, 'Timed steps.')
  flags.DEFINE_string('output', None, 'JSON path; default benchmarks/results/scst_step.json.')


def main(argv):
  harness.start(argv)
  args = harness.script_flags()
  config = demo_scst.get_config()
  config.data.data_dir = os.path.abspath(args.data_dir)
  if args.batch:
    config.train.batch_size = args.batch
  if args.samples:
    config.train.scst_samples = args.samples
  if args.encoder_mode:
    config.model.encoder_mode = args.encoder_mode
  if args.baseline:
    config.train.scst_baseline = args.baseline
  before = harness.idle_check()
  print(f'before the run: {harness.describe_load(before)}')
  splits = prepare.open_dataset(config.data)
  mesh = mesh_lib.make_mesh()
  if args.init_from:
    _, vocab, _, variables, init_step = inference.restore_variables(args.init_from, 'best', mesh)
  else:
    vocab = vocab_lib.build_vocabulary(records_lib.all_captions(splits['train']),
                                       min_count=config.data.min_word_count)
    variables, init_step = None, None
  model = captioner.build_captioner(config.model, len(vocab))
  tx = state_lib.make_optimizer(config.train, state_lib.make_schedule(config.train, 10, 100),
                                config.model.encoder_mode)
  state = state_lib.create_train_state(model, tx, 0, config.data.image_size, config.data.max_caption_len,
                                       mesh)
  if variables is not None:
    state = state.replace(params=variables['params'], batch_stats=variables.get('batch_stats', {}))
  # Both steps donate their input state: the cross-entropy step gets its own copy.
  xent_state = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
  reward = scst.CaptionReward.from_source(splits['train'], vocab, reward_end=config.train.scst_reward_end)
  cfg = scst.ScstConfig.from_config(config)
  step = scst.compile_scst_step(model, state_lib.teacher_forced_logits(model), tx, mesh, reward, cfg)
  step.timed = True
  xent_step = state_lib.compile_train_step(state_lib.teacher_forced_logits(model), tx, mesh)
  pipeline = input_pipeline.PipelineConfig.from_config(config)
  pipeline = dataclasses.replace(pipeline, image_index=True)
  iterator = input_pipeline.make_train_iterator(splits['train'], vocab, pipeline,
                                                host_batch_size=config.train.batch_size)
  monitor = harness.LoadMonitor()
  parts = {'sample': [], 'reward': [], 'update': [], 'scst step': [], 'xent step': []}
  lengths = []
  for i in range(args.warmup + args.steps):
    batch = mesh_lib.host_batch_to_global(next(iterator), mesh)
    start = time.perf_counter()
    state, _ = step(state, batch)
    total = time.perf_counter() - start
    start = time.perf_counter()
    xent_state, metrics = xent_step(xent_state, {k: v for k, v in batch.items() if k != 'image_index'})
    jax.block_until_ready(metrics)
    xent = time.perf_counter() - start
    if i >= args.warmup:
      for name, seconds in step.last_seconds.items():
        parts[name].append(seconds)
      parts['scst step'].append(total)
      parts['xent step'].append(xent)
      lengths.append(scst.sample_statistics(step.last['samples'])['sample_len'])
  load = monitor.report()
  scst_ms = 1e3 * float(np.median(parts['scst step']))
  rows = [{'part': name, 'median_ms': 1e3 * float(np.median(v)), 'min_ms': 1e3 * float(np.min(v)),
           'max_ms': 1e3 * float(np.max(v)), 'of_scst_step': float(np.median(v)) * 1e3 / scst_ms}
          for name, v in parts.items()]
  harness.print_table(rows, ['part', 'median_ms', 'min_ms', 'max_ms', 'of_scst_step'])
  print(f'\n{config.train.batch_size} images x {cfg.num_samples} samples per step, trunk '
        f'{config.model.encoder_mode}, {cfg.baseline} baseline, mean sample length '
        f'{np.mean(lengths):.1f} words, parameters: '
        f"{f'{args.init_from} (step {init_step})' if args.init_from else 'random init'}")
  print(f'{harness.machine_info()}\n{harness.describe_load(load)}')
  harness.write_json(args.output or harness.default_output(__file__), {
      'benchmark': 'scst_step', 'argv': sys.argv, 'machine': harness.machine_info(),
      'load_before': before, 'load_during': load, 'settings': vars(args),
      'images_per_step': config.train.batch_size, 'samples_per_image': cfg.num_samples,
      'encoder_mode': config.model.encoder_mode, 'baseline': cfg.baseline,
      'mean_sample_len': float(np.mean(lengths)), 'rows': rows})


if __name__ == '__main__':
  define_flags()
  app.run(main)
