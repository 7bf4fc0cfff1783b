"""Encoder modes: frozen trunk untouched, cached features train exactly like the frozen trunk, warm-up."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from capjax import state as state_lib
from capjax import train
from capjax.data import shapes
from configs import tiny


def _params():
  return {'encoder': {'trunk': {'conv': {'kernel': jnp.ones((3, 3))}},
                      'projection': {'kernel': jnp.ones((3, 3))}},
          'decoder': {'readout': {'kernel': jnp.ones((3, 3)), 'bias': jnp.ones(3)}}}


@pytest.mark.parametrize('mode', ['frozen', 'cached'])
def test_fixed_trunk_gets_no_update_not_even_weight_decay(mode):
  config = tiny.get_config()
  params = _params()
  tx = state_lib.make_optimizer(config.train, optax.constant_schedule(0.1), mode)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(jnp.abs(updates['encoder']['trunk']['conv']['kernel']).max()) == 0
  assert float(jnp.abs(updates['encoder']['projection']['kernel']).max()) > 0


def test_warmup_freezes_the_trunk_then_trains_it_slower():
  config = tiny.get_config()
  config.train.encoder_lr_factor = 0.1
  params = _params()
  tx = state_lib.make_optimizer(config.train, optax.constant_schedule(0.1), 'train', frozen_steps=2)
  grads = jax.tree.map(jnp.ones_like, params)
  opt_state = tx.init(params)
  trunk, head = [], []
  for _ in range(3):
    updates, opt_state = tx.update(grads, opt_state, params)
    trunk.append(float(jnp.abs(updates['encoder']['trunk']['conv']['kernel']).max()))
    head.append(float(jnp.abs(updates['encoder']['projection']['kernel']).max()))
  assert trunk[:2] == [0.0, 0.0] and trunk[2] > 0
  np.testing.assert_allclose(trunk[2], 0.1 * head[2], rtol=1e-5)


def test_cached_features_train_exactly_like_the_frozen_trunk(tmp_path):
  """Without augmentation, training the decoder on cached pooled features is the frozen-trunk run."""
  splits = {s: list(shapes.generate_records(s, n, 48))
            for s, n in [('train', 16), ('validation', 8), ('test', 8)]}
  losses = {}
  for mode in ('frozen', 'cached'):
    config = tiny.get_config()
    config.model.encoder_mode = mode
    config.data.augment.enabled = False
    config.train.num_epochs = 1
    config.train.metrics_every_epochs = 0
    result = train.train_and_evaluate(config, str(tmp_path / mode), splits)
    losses[mode] = [result.step_losses[s] for s in sorted(result.step_losses)]
    losses[mode + '_val'] = result.history[-1]['val_loss']
  np.testing.assert_allclose(losses['cached'], losses['frozen'], rtol=2e-4)
  np.testing.assert_allclose(losses['cached_val'], losses['frozen_val'], rtol=2e-4)
  assert (tmp_path / 'cached' / 'features' / 'train.npy').exists()
