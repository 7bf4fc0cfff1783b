"""small_map_conv.Conv is nn.Conv: same parameters, same outputs and gradients, sharded or not; and the
ResNet built from it is the nn.Conv ResNet (same parameter tree, outputs, statistics and gradients)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capjax import mesh as mesh_lib
from capjax.models import resnet
from capjax.models import small_map_conv

# (kernel, strides, padding, input size): every small-map convolution of a ResNet block, 1x1 convolutions
# on larger maps, 'SAME'/'VALID' padding and non-square maps (the matmul path on CPU).
MATMUL_CASES = [
    ((3, 3), 1, ((1, 1), (1, 1)), (2, 2)),
    ((3, 3), 1, ((1, 1), (1, 1)), (1, 1)),
    ((3, 3), 1, ((1, 1), (1, 1)), (4, 4)),
    ((3, 3), 2, ((1, 1), (1, 1)), (4, 4)),
    ((3, 3), 2, ((1, 1), (1, 1)), (3, 3)),
    ((3, 3), 2, ((1, 1), (1, 1)), (2, 2)),
    ((3, 3), 1, ((1, 1), (1, 1)), (7, 7)),
    ((3, 3), 2, ((1, 1), (1, 1)), (16, 15)),
    ((1, 1), 1, 'SAME', (2, 2)),
    ((1, 1), 2, 'SAME', (4, 4)),
    ((3, 3), 1, 'SAME', (2, 3)),
    ((3, 3), (2, 1), 'VALID', (4, 3)),
    ((1, 1), 1, 'SAME', (20, 20)),
    ((1, 1), 2, ((0, 0), (0, 0)), (31, 31)),
]
# Outputs larger than 14 in one dimension (the lax path, as in nn.Conv).
LAX_CASES = [((3, 3), 1, ((1, 1), (1, 1)), (15, 4)), ((3, 3), 2, ((1, 1), (1, 1)), (32, 9)),
             ((7, 7), 2, ((3, 3), (3, 3)), (32, 32))]
TOLERANCE = {'rtol': 1e-5, 'atol': 1e-5}


class Parent(nn.Module):
  """One convolution named like a ResNet block's, built from `conv_cls` (nn.Conv or ours)."""

  conv_cls: type
  features: int
  kernel_size: tuple
  strides: int | tuple
  padding: str | tuple
  dtype: jnp.dtype = jnp.float32
  use_bias: bool = False

  @nn.compact
  def __call__(self, x):
    return self.conv_cls(self.features, self.kernel_size, strides=self.strides, padding=self.padding,
                         use_bias=self.use_bias, dtype=self.dtype, name='conv2')(x)


def _pair(case, dtype=jnp.float32, use_bias=False, batch=4, cin=6, features=5):
  """nn.Conv and ours with the same settings, an input, and random variables for both (drawn with numpy:
  `init` compiles a truncated normal per shape, seconds each on the shared 2-core machine)."""
  kernel, strides, padding, size = case
  make = functools.partial(Parent, features=features, kernel_size=kernel, strides=strides, padding=padding,
                           dtype=dtype, use_bias=use_bias)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, *size, cin), np.float32)
  params = {'kernel': rng.standard_normal((*kernel, cin, features), np.float32) / np.sqrt(cin * 9)}
  if use_bias:
    params['bias'] = rng.standard_normal(features, np.float32)
  return make(conv_cls=nn.Conv), make(conv_cls=small_map_conv.Conv), x, {'params': {'conv2': params}}


@functools.partial(jax.jit, static_argnums=0)
def _values_and_grads(model, variables, x):
  def loss(params, x):
    y = model.apply({'params': params}, x).astype(jnp.float32)
    return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape)))
  return model.apply(variables, x), jax.grad(loss, argnums=(0, 1))(variables['params'], x)


def _conv_primitives(model, variables, x, **kwargs) -> int:
  """How many `conv_general_dilated` the traced forward pass contains."""
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, **kwargs))(variables, x)
  return str(jaxpr).count('conv_general_dilated')


def _max_diff(a, b):
  return max(float(jnp.max(jnp.abs(jnp.asarray(u, jnp.float32) - jnp.asarray(v, jnp.float32))))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _output_shape(case):
  kernel, strides, padding, size = case
  strides = (strides,) * 2 if isinstance(strides, int) else strides
  return small_map_conv.output_shape(size, kernel, strides, padding)


def test_the_rule_is_1x1_kernels_and_outputs_up_to_14x14():
  uses_matmul = small_map_conv.uses_matmul
  assert uses_matmul((3, 3), (14, 14)) and uses_matmul((3, 3), (1, 2)) and uses_matmul((1, 1), (56, 56))
  assert not uses_matmul((3, 3), (15, 14)) and not uses_matmul((7, 7), (16, 16))
  assert small_map_conv.output_shape((4, 3), (3, 3), (2, 1), 'VALID') == (1, 1)
  assert small_map_conv.output_shape((16, 15), (3, 3), (2, 2), ((1, 1), (1, 1))) == (8, 8)
  assert small_map_conv.output_shape((5, 5), (1, 1), (2, 2), 'SAME') == (3, 3)
  assert all(small_map_conv.uses_matmul(case[0], _output_shape(case)) for case in MATMUL_CASES)
  assert not any(small_map_conv.uses_matmul(case[0], _output_shape(case)) for case in LAX_CASES)


@pytest.mark.parametrize('use_bias', [False, True])
def test_parameters_are_nn_convs_bit_for_bit(use_bias):
  nn_conv, conv, x, _ = _pair(MATMUL_CASES[0], use_bias=use_bias)
  theirs, ours = nn_conv.init(jax.random.key(0), x), conv.init(jax.random.key(0), x)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  assert ours['params']['conv2']['kernel'].shape == (3, 3, 6, 5)
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(ours))


@pytest.mark.parametrize('case', MATMUL_CASES, ids=str)
def test_matmul_path_matches_nn_conv_in_value_and_gradient(case):
  theirs, ours, x, variables = _pair(case, use_bias=True)
  (y_theirs, g_theirs), (y_ours, g_ours) = [_values_and_grads(m, variables, x) for m in (theirs, ours)]
  assert y_ours.shape == y_theirs.shape and y_ours.dtype == y_theirs.dtype
  np.testing.assert_allclose(y_ours, y_theirs, **TOLERANCE)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOLERANCE), g_ours, g_theirs)
  print(f'{case}: max abs difference {_max_diff((y_ours, g_ours), (y_theirs, g_theirs)):.2g}')


@pytest.mark.parametrize('case', LAX_CASES, ids=str)
def test_lax_path_is_nn_conv_exactly(case):
  theirs, ours, x, variables = _pair(case, use_bias=True)
  jax.tree.map(np.testing.assert_array_equal, _values_and_grads(ours, variables, x),
               _values_and_grads(theirs, variables, x))


def test_realistic_channels_stay_within_tolerance():
  """512 channels as in ResNet50's stage 4: the sum over 4608 products is where rounding shows."""
  theirs, ours, x, variables = _pair(MATMUL_CASES[0], batch=2, cin=512, features=64)
  (y_theirs, g_theirs), (y_ours, g_ours) = [_values_and_grads(m, variables, x) for m in (theirs, ours)]
  np.testing.assert_allclose(y_ours, y_theirs, **TOLERANCE)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOLERANCE), g_ours, g_theirs)
  print(f'512 channels: max abs difference {_max_diff((y_ours, g_ours), (y_theirs, g_theirs)):.2g}')


@pytest.mark.parametrize('case', [MATMUL_CASES[0], MATMUL_CASES[3]], ids=str)
def test_bfloat16_compute(case):
  theirs, ours, x, variables = _pair(case, dtype=jnp.bfloat16)
  (y_theirs, g_theirs), (y_ours, g_ours) = [_values_and_grads(m, variables, x) for m in (theirs, ours)]
  assert y_ours.dtype == jnp.bfloat16 and g_ours[0]['conv2']['kernel'].dtype == jnp.float32
  np.testing.assert_allclose(np.float32(y_ours), np.float32(y_theirs), rtol=2e-2, atol=5e-2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=2e-2, atol=1e-1),
               g_ours, g_theirs)


def test_jit_with_the_batch_sharded_over_8_devices():
  mesh = mesh_lib.make_mesh()
  assert mesh.devices.size == 8
  _, ours, x, variables = _pair(MATMUL_CASES[0], batch=16)
  expected = _values_and_grads(ours, variables, x)
  sharded_x = jax.device_put(x, mesh_lib.batch_sharded(mesh))
  variables = mesh_lib.tree_replicate(variables, mesh)
  y, grads = _values_and_grads(ours, variables, sharded_x)
  assert y.sharding.is_equivalent_to(mesh_lib.batch_sharded(mesh), y.ndim)
  np.testing.assert_allclose(y, expected[0], **TOLERANCE)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOLERANCE), grads, expected[1])


@pytest.mark.parametrize('case, impl, backend, convolutions', [
    (MATMUL_CASES[0], 'auto', 'cpu', 0), (MATMUL_CASES[0], 'lax', 'cpu', 1),
    (MATMUL_CASES[0], 'auto', 'gpu', 1), (MATMUL_CASES[0], 'matmul', 'gpu', 0),
    (LAX_CASES[0], 'auto', 'cpu', 1), (LAX_CASES[0], 'matmul', 'cpu', 1),
], ids=str)
def test_impl_chooses_the_computation(monkeypatch, case, impl, backend, convolutions):
  """'auto' applies the rule only on XLA:CPU, 'lax' never, 'matmul' on every backend."""
  monkeypatch.setattr(small_map_conv, '_on_cpu', lambda: backend == 'cpu')
  _, _, x, variables = _pair(case)
  kernel, strides, padding, _ = case
  model = Parent(functools.partial(small_map_conv.Conv, impl=impl), 5, kernel, strides, padding)
  assert _conv_primitives(model, variables, x) == convolutions


def test_unknown_impl_is_refused():
  _, _, x, variables = _pair(MATMUL_CASES[0])
  model = Parent(functools.partial(small_map_conv.Conv, impl='cudnn'), 5, (3, 3), 1, ((1, 1), (1, 1)))
  with pytest.raises(ValueError, match='cudnn'):
    model.apply(variables, x)


def _nn_conv(*args, impl=None, **kwargs):
  """What resnet.py built before small_map_conv: nn.Conv with the same arguments."""
  del impl
  return nn.Conv(*args, **kwargs)


def _trunk_train_outputs(model, variables, images):
  """Feature map, updated BatchNorm statistics and parameter gradients of one training forward pass,
  traced afresh (a new jit each call: the two ResNets are equal as flax modules)."""
  def loss(params):
    features, updates = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, images,
                                    train=True, mutable=['batch_stats'])
    weights = jnp.cos(jnp.arange(features.size, dtype=jnp.float32)).reshape(features.shape)
    return jnp.sum(features * weights), (features, updates['batch_stats'])
  grads, (features, stats) = jax.jit(jax.grad(loss, has_aux=True))(variables['params'])
  return features, stats, grads


def _random_variables(abstract):
  """Variables of these shapes drawn with numpy (an `init` compiles an initialiser per shape: tens of
  seconds for a trunk on the shared 2-core machine); running variances positive."""
  rng = np.random.default_rng(1)
  def draw(path, leaf):
    if path[-1].key == 'var':
      return rng.uniform(0.5, 2.0, leaf.shape).astype(leaf.dtype)
    scale = 1 / np.sqrt(np.prod(leaf.shape[:-1])) if leaf.ndim == 4 else 0.1
    return (rng.standard_normal(leaf.shape) * scale + (path[-1].key == 'scale')).astype(leaf.dtype)
  return jax.tree_util.tree_map_with_path(draw, abstract)


def test_resnet_is_the_nn_conv_resnet(monkeypatch):
  """At 64 px, stages 3 and 4 run on 4x4 and 2x2 maps: every kind of convolution of the rule is in this
  trunk (1x1 at every size, 3x3 strided and not, with small outputs and large). The same variables tree as
  the nn.Conv trunk (names, shapes, dtypes; values from the same key are tested per Conv above), and the
  same features, BatchNorm statistics and gradients up to rounding."""
  model = resnet.ResNet(stage_sizes=(1, 1, 1, 2), width=8)
  images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 3)), jnp.float32)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
  variables = _random_variables(abstract)
  with monkeypatch.context() as patch:
    patch.setattr(small_map_conv, 'Conv', _nn_conv)
    assert jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False)) == abstract
    assert _conv_primitives(model, variables, images, train=False) == 20
    expected = _trunk_train_outputs(model, variables, images)
  # Left to lax.conv: the stem (32x32 output) and stage 1's 3x3 convolution (16x16).
  assert _conv_primitives(model, variables, images, train=False) == 2
  got = _trunk_train_outputs(model, variables, images)
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  # Rounding differs in the sums (a dot's order vs the convolution's) and BatchNorm's divisions pass it on:
  # compare each array against its own scale (gradients reach hundreds here). Measured: 5e-6 at most; a
  # wrong convolution would be off by O(1).
  ratios = []
  for path, a, b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(got),
                        jax.tree.leaves(expected)):
    error, scale = float(np.max(np.abs(a - b))), float(np.max(np.abs(b)))
    assert error <= 5e-5 * scale, (jax.tree_util.keystr(path[0]), error, scale)
    ratios.append(error / scale)
  print(f'trunk: largest difference {max(ratios):.2g} of the array\'s largest value')
