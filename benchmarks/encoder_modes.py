"""Train-step throughput of the three encoder modes for a config (default: the demo config).

  python -m benchmarks.encoder_modes [--config=configs/demo.py]

capjax's own train step for each mode (`capjax.state`), on random data from the shared harness, one
process, all local devices; steady state after one compiled step.
"""

import importlib.util
import os
import sys

if __package__ in (None, ''):  # run as `python benchmarks/encoder_modes.py`
  sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from absl import app
from absl import flags
import jax
import optax

from benchmarks import harness
from capjax import mesh as mesh_lib
from capjax import state as state_lib
from capjax.models import captioner

FLAGS = flags.FLAGS

VOCAB_SIZE = 40
CACHED_BATCH = 256  # decoder-only steps are cheap: a larger batch measures throughput, not overhead


def load_config(path: str):
  spec = importlib.util.spec_from_file_location('config_module', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def measure(config, mode: str, mesh, steps: int) -> tuple[int, float]:
  config.model.encoder_mode = mode
  size, length = config.data.image_size, config.data.max_caption_len
  batch_size = CACHED_BATCH if mode == 'cached' else config.train.batch_size
  model = captioner.build_captioner(config.model, VOCAB_SIZE)
  tx = state_lib.make_optimizer(config.train, optax.constant_schedule(1e-3), mode)
  state = state_lib.create_train_state(model, tx, 0, size, length, mesh)
  step = state_lib.compile_train_step(
      state_lib.teacher_forced_logits(model, from_features=mode == 'cached'), tx, mesh)
  batch = mesh_lib.host_batch_to_global(
      harness.synthetic_batch(mode, batch_size, size, length, VOCAB_SIZE), mesh)
  _, seconds, _ = harness.time_steps(step, state, harness.repeat_batch(batch), warmup=1, steps=steps)
  return batch_size, batch_size * steps / seconds


def define_flags() -> None:
  # Only when this file runs as the program: absl flags are process-global and the benchmarks import
  # one another (benchmarks/harness.py, "Flags").
  flags.DEFINE_string('config', 'configs/demo.py', 'Config file: its image size, batch and dtype are used.')


def main(argv):
  harness.start(argv)
  config_path = FLAGS.config
  config = load_config(config_path)
  mesh = mesh_lib.make_mesh()
  print(f'{config_path}: {config.data.image_size} px, {config.model.dtype}, {jax.device_count()} '
        f'{jax.devices()[0].platform} device(s)')
  for mode, steps in (('train', 5), ('frozen', 5), ('cached', 50)):
    batch_size, rate = measure(config, mode, mesh, steps)
    unit = 'captions/s (decoder on cached features)' if mode == 'cached' else 'images/s'
    print(f'{mode:7s} batch {batch_size:4d}: {rate:8.1f} {unit}', flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
