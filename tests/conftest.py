"""Test setup: 8 simulated CPU devices (set before JAX is imported) and parsed absl flags."""

import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402  pylint: disable=g-import-not-at-top

# grain worker processes and absl-logging code read flags; pytest does not parse them.
flags.FLAGS.mark_as_parsed()
