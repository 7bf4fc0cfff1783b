"""One process of a 2-process (simulated 2-host) training run; started by test_multihost.py.

Usage: python tests/multihost_worker.py PROCESS_ID PORT WORKDIR
"""

import json
import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
os.environ['JAX_PLATFORMS'] = 'cpu'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402  pylint: disable=g-import-not-at-top
import jax  # noqa: E402  pylint: disable=g-import-not-at-top


def main(process_id: int, port: int, workdir: str) -> None:
  flags.FLAGS.mark_as_parsed()
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2,
                             process_id=process_id)
  from capjax import train  # pylint: disable=g-import-not-at-top
  from capjax.data import shapes  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.train.num_epochs = 1
  splits = {s: list(shapes.generate_records(s, n, 48))
            for s, n in [('train', 16), ('validation', 8), ('test', 8)]}
  result = train.train_and_evaluate(config, workdir, splits)
  out = {'process_index': jax.process_index(), 'devices': jax.device_count(),
         'step_losses': result.step_losses, 'history': result.history}
  with open(os.path.join(workdir, f'process_{process_id}.json'), 'w') as f:
    json.dump(out, f)


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
