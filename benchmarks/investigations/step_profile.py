r"""Where a training step's time goes once the small-map convolutions are fixed: its parts timed alone,
capjax beside the torch reference, interleaved in one run.

  python -m benchmarks.investigations.step_profile      # 64 px, batch 32, ~4 min here
  python -m benchmarks.investigations.step_profile --image_size=224 --batch=4

Parts (capjax: each one jitted; torch: eager, float32, `--torch_threads`):
  full step           the whole train step (capjax.state.compile_train_step; torch as in cpu_gap.py)
  trunk               ResNet50 forward + backward (gradients of its parameters; BatchNorm in training
                      mode, statistics updated) from normalised float images, pooled output
  trunk, BatchNorm by hand
                      capjax only: the same with every BatchNorm computed by `batchnorm_by_hand`
                      (its backward written out: does XLA's differentiation of flax's leave time?)
  trunk, no BatchNorm the same with every BatchNorm removed (flax: intercepted to the identity; torch:
                      replaced by nn.Identity): the difference is what BatchNorm costs
  trunk convolutions  the trunk's 53 convolutions alone, forward + backward, one jitted call each
                      (resnet_convs.py's layers; capjax: as small_map_conv's rule computes each)
  max pool            the stem's 3x3/2 max pool, forward + backward
  head                projection + its BatchNorm, embedding, LSTM, vocabulary projection and the masked
                      cross-entropy from pooled trunk features, forward + backward (the 'cached' step's
                      work without its optimizer)
  LSTM                the 256-unit LSTM alone over 24 steps, forward + backward (inputs and parameters)
  optimizer           global-norm clipping + AdamW over all 27M parameters, given the gradients
  host to device      the host batch (uint8 images, tokens) to the device (capjax: `host_batch_to_global`;
                      torch has nothing to move on CPU)
  device augmentation capjax only: `device_augment`'s batch augmenter (data.augment.on_device), which
                      the step runs when augmentation is on the device
Every part is timed in the same rotated rounds (`structural_wins.time_interleaved`); 'sum of parts' is
trunk + head + optimizer, what the full step does apart from glue (loss, concatenation, casts).
"""

import contextlib
import copy
import functools
import os
import sys
import time

if __package__ in (None, ''):  # run as `python benchmarks/investigations/step_profile.py`
  sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import harness
from benchmarks import structural_wins
from benchmarks.investigations import cpu_gap
from benchmarks.investigations import resnet_convs
from capjax import device_augment
from capjax import input_pipeline
from capjax import mesh as mesh_lib
from capjax import state as state_lib
from capjax import vocab as vocab_lib
from capjax.models import captioner
from capjax.models import resnet

HIDDEN = 256


def call_advancer(fn, *args):
  """`advance(steps)`: calls `fn(*args)` `steps` times; seconds per call."""
  def advance(steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps
  return advance


def _skip_batchnorm(next_fun, args, kwargs, context):
  if isinstance(context.module, nn.BatchNorm) and context.method_name == '__call__':
    return args[0]
  return next_fun(*args, **kwargs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batchnorm_by_hand(x, scale, bias, epsilon: float):
  """(y, batch mean, batch variance) of BatchNorm in training mode over every axis but the last, as
  flax computes it (variance as E[x^2] - E[x]^2), with the backward written out: both sums in one pass
  over (dy, x), dx in another. The statistics are outputs for the running averages; their cotangents
  are ignored (nothing differentiates through them)."""
  return _batchnorm_forward(x, scale, bias, epsilon)[0]


def _batchnorm_forward(x, scale, bias, epsilon):
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axes)
  var = jnp.maximum(jnp.mean(jnp.square(x), axes) - jnp.square(mean), 0.0)
  rstd = jax.lax.rsqrt(var + epsilon)
  return ((x - mean) * (rstd * scale) + bias, mean, var), (x, mean, rstd, scale)


def _batchnorm_backward(epsilon, residuals, cotangents):
  del epsilon
  x, mean, rstd, scale = residuals
  dy = cotangents[0]
  axes = tuple(range(x.ndim - 1))
  count = np.prod([x.shape[a] for a in axes])
  x_hat = (x - mean) * rstd
  dbias, dscale = jnp.sum(dy, axes), jnp.sum(dy * x_hat, axes)
  return (scale * rstd / count) * (count * dy - dbias - x_hat * dscale), dscale, dbias


batchnorm_by_hand.defvjp(_batchnorm_forward, _batchnorm_backward)


def _batchnorm_by_hand(next_fun, args, kwargs, context):
  """Every training-mode nn.BatchNorm computed by `batchnorm_by_hand`, with the same parameters and the
  same running-average update as flax's (the ResNet's BatchNorms: scale and bias, last axis, one device;
  anything else, and evaluation mode, is left to flax)."""
  module = context.module
  if not (isinstance(module, nn.BatchNorm) and context.method_name == '__call__'):
    return next_fun(*args, **kwargs)
  evaluating = kwargs.get('use_running_average', module.use_running_average)
  if evaluating or not (module.use_scale and module.use_bias) or module.axis != -1 or module.axis_name:
    return next_fun(*args, **kwargs)
  x, features = args[0], args[0].shape[-1]
  scale = module.param('scale', module.scale_init, (features,), module.param_dtype)
  bias = module.param('bias', module.bias_init, (features,), module.param_dtype)
  y, mean, var = batchnorm_by_hand(x, scale, bias, module.epsilon)
  running_mean = module.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
  running_var = module.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
  if not module.is_initializing():
    running_mean.value = module.momentum * running_mean.value + (1 - module.momentum) * mean
    running_var.value = module.momentum * running_var.value + (1 - module.momentum) * var
  return y


# How the trunk's BatchNorms are computed: flax's nn.BatchNorm (differentiated by JAX), removed, or
# `batchnorm_by_hand`.
BATCHNORMS = {'flax': contextlib.nullcontext, 'none': lambda: nn.intercept_methods(_skip_batchnorm),
              'by hand': lambda: nn.intercept_methods(_batchnorm_by_hand)}


def capjax_trunk(x, batchnorm: str = 'flax'):
  trunk = resnet.ResNet()
  with_batchnorm = BATCHNORMS[batchnorm]

  def init(key):
    with with_batchnorm():
      return trunk.init(key, x, train=False)

  def grads(variables, g):
    def loss(params):
      with with_batchnorm():
        y, updates = trunk.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
      return jnp.vdot(jnp.mean(y, axis=(1, 2)), g), updates
    return jax.grad(loss, has_aux=True)(variables['params'])

  variables = jax.jit(init)(jax.random.key(0))
  g = jax.random.normal(jax.random.key(1), (x.shape[0], 2048))
  return call_advancer(jax.jit(grads), variables, g)


def _head_loss(model, variables, trained, features, tokens):
  """The cached step's loss from pooled features, differentiated with respect to `trained` (the
  decoder, the projection and its BatchNorm)."""
  encoder = variables['params']['encoder']
  params = {'decoder': trained['decoder'], 'encoder': {
      **encoder, 'projection': trained['projection'], 'projection_bn': trained['projection_bn']}}
  logits, updates = model.apply({**variables, 'params': params}, features, tokens[:, :-1], train=True,
                                method=model.decode_from_features, mutable=['batch_stats'])
  loss_sum, count = state_lib.token_cross_entropy(logits, tokens)
  return loss_sum / count, updates


def capjax_trunk_convolutions(image_size: int, batch: int):
  calls = []
  for row in resnet_convs.trunk_convolutions(image_size, batch):
    label = f"{row['rule']} fwd+bwd"
    calls += [resnet_convs.jax_calls(row['rule'], row, *resnet_convs.layer_inputs(row))[label]] * row['count']

  def run_all():
    return [call() for call in calls]
  return call_advancer(run_all)


def _max_pool(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # as resnet.ResNet's stem


def capjax_max_pool(image_size: int, batch: int):
  x = jax.random.normal(jax.random.key(0), (batch, image_size // 2, image_size // 2, 64))
  g = jax.random.normal(jax.random.key(1), _max_pool(x).shape)
  return call_advancer(jax.jit(jax.grad(lambda x: jnp.vdot(_max_pool(x), g))), x)


def capjax_head(model, variables, features, tokens):
  encoder = variables['params']['encoder']
  trained = {'decoder': variables['params']['decoder'], 'projection': encoder['projection'],
             'projection_bn': encoder['projection_bn']}
  grads = jax.jit(jax.grad(lambda t: _head_loss(model, variables, t, features, tokens), has_aux=True))
  return call_advancer(grads, trained)


def capjax_lstm(batch: int):
  """The decoder's own LSTM (`CaptionDecoder.lstm`), alone."""
  decoder = captioner.CaptionDecoder(cpu_gap.VOCAB)
  inputs = jax.random.normal(jax.random.key(0), (batch, cpu_gap.MAX_LEN, HIDDEN))
  g = jax.random.normal(jax.random.key(1), inputs.shape[:2] + (HIDDEN,))

  def run_lstm(module, inputs):
    return module.lstm(module.lstm.zero_carry(inputs.shape[0]), inputs)[1]
  params = jax.jit(lambda k: decoder.init(k, inputs, method=run_lstm))(jax.random.key(2))

  def loss(params, inputs):
    return jnp.vdot(decoder.apply(params, inputs, method=run_lstm), g)
  return call_advancer(jax.jit(jax.grad(loss, argnums=(0, 1))), params, inputs)


def capjax_optimizer(params):
  """Clipping + AdamW as in `state.train_step` (grad norm included), the parameters and moments donated
  and carried from call to call."""
  tx = harness.default_optimizer('train')
  grads = jax.tree.map(lambda p: 1e-3 * p, params)

  def update(params, opt_state):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, optax.tree.norm(grads)
  step = jax.jit(update, donate_argnums=(0, 1))
  carried = [jax.tree.map(jnp.copy, params), jax.jit(tx.init)(params)]

  def advance(steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      carried[0], carried[1], norm = step(*carried)
    jax.block_until_ready((carried, norm))
    return (time.perf_counter() - start) / steps
  return advance


def capjax_transfer(host_batch, mesh):
  return call_advancer(lambda: mesh_lib.host_batch_to_global(host_batch, mesh))


def capjax_device_augmentation(host_batch, image_size: int):
  vocab = vocab_lib.build_vocabulary(['a dog left of a right cat'], min_count=1)
  augment = jax.jit(device_augment.make_batch_augmenter(input_pipeline.AugmentConfig(), image_size, vocab))
  return call_advancer(augment, jax.device_put(host_batch), jax.random.key(0))


def capjax_parts(args, mesh) -> dict:
  host_batch = harness.synthetic_batch('train', args.batch, args.image_size, cpu_gap.MAX_LEN, cpu_gap.VOCAB)
  model = captioner.Captioner(vocab_size=cpu_gap.VOCAB)
  variables = jax.jit(lambda k: captioner.init_variables(model, k, args.image_size, cpu_gap.MAX_LEN))(
      jax.random.key(0))
  images = captioner.normalize_images(jnp.asarray(host_batch['image']), jnp.float32)
  rng = np.random.default_rng(0)
  features = jnp.asarray(rng.random((args.batch, 2048), np.float32))
  return {
      'full step': cpu_gap.capjax_variant(model, host_batch, args.image_size, mesh)[0],
      'trunk': capjax_trunk(images),
      'trunk, BatchNorm by hand': capjax_trunk(images, batchnorm='by hand'),
      'trunk, no BatchNorm': capjax_trunk(images, batchnorm='none'),
      'trunk convolutions': capjax_trunk_convolutions(args.image_size, args.batch),
      'max pool': capjax_max_pool(args.image_size, args.batch),
      'head': capjax_head(model, variables, features, jnp.asarray(host_batch['tokens'])),
      'LSTM': capjax_lstm(args.batch),
      'optimizer': capjax_optimizer(variables['params']),
      'host to device': capjax_transfer(host_batch, mesh),
      'device augmentation': capjax_device_augmentation(host_batch, args.image_size),
  }


# ----------------------------------------------------------------------------------------------
# torch


def torch_parts(args) -> dict:
  import torch  # pylint: disable=g-import-not-at-top  (optional yardstick)
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
  threads = args.torch_threads

  def timed(fn):
    def advance(steps: int) -> float:
      torch.set_num_threads(threads)
      start = time.perf_counter()
      for _ in range(steps):
        fn()
      return (time.perf_counter() - start) / steps
    return advance

  host_batch = harness.synthetic_batch('train', args.batch, args.image_size, cpu_gap.MAX_LEN, cpu_gap.VOCAB)
  model = torch_reference.random_reference(cpu_gap.VOCAB, args.image_size).train()
  tokens = torch.from_numpy(host_batch['tokens']).long()
  images = torch.from_numpy(host_batch['image'])
  x = (images.permute(0, 3, 1, 2).float() - model.mean) / model.std
  g = torch.randn(args.batch, 2048)
  no_bn = copy.deepcopy(model.trunk)
  for name, module in list(no_bn.named_modules()):
    if isinstance(module, torch.nn.BatchNorm2d):
      parent, _, leaf = name.rpartition('.')
      setattr(no_bn.get_submodule(parent) if parent else no_bn, leaf, torch.nn.Identity())
  features = torch.rand(args.batch, 2048)
  lstm = torch.nn.LSTM(HIDDEN, HIDDEN, batch_first=True)
  lstm_in = torch.randn(args.batch, cpu_gap.MAX_LEN, HIDDEN, requires_grad=True)
  lstm_g = torch.randn(args.batch, cpu_gap.MAX_LEN, HIDDEN)
  params = list(model.parameters())
  optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)

  def cross_entropy(logits):
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(),
                                             ignore_index=vocab_lib.PAD_ID)

  def full_step():
    loss = cross_entropy(model(images, tokens[:, :-1]))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 5.0)
    optimizer.step()

  def head():
    image_vec = model.projection_bn(model.projection(features))
    hidden, _ = model.lstm(torch.cat([image_vec[:, None], model.embed(tokens[:, :-1])], dim=1))
    model.zero_grad(set_to_none=True)
    cross_entropy(model.readout(hidden[:, 1:])).backward()

  def optimizer_step():
    for p in params:
      p.grad = 1e-3 * p.detach() if p.grad is None else p.grad
    torch.nn.utils.clip_grad_norm_(params, 5.0)
    optimizer.step()

  def trunk(module):
    def run():
      module.zero_grad(set_to_none=True)
      module(x).backward(g)
    return run

  conv_calls = []
  for row in resnet_convs.trunk_convolutions(args.image_size, args.batch):
    conv_calls += [resnet_convs.torch_calls(row, *resnet_convs.layer_inputs(row), torch)['torch fwd+bwd']
                   ] * row['count']
  pool_in = torch.randn(args.batch, 64, args.image_size // 2, args.image_size // 2, requires_grad=True)
  pool_g = torch.randn(args.batch, 64, args.image_size // 4, args.image_size // 4)

  def max_pool():
    pool_in.grad = None
    torch.nn.functional.max_pool2d(pool_in, 3, 2, 1).backward(pool_g)

  def lstm_pass():
    lstm.zero_grad(set_to_none=True)
    lstm(lstm_in)[0].backward(lstm_g)

  return {'full step': timed(full_step), 'trunk': timed(trunk(model.trunk)),
          'trunk, no BatchNorm': timed(trunk(no_bn)),
          'trunk convolutions': timed(lambda: [call() for call in conv_calls]), 'max pool': timed(max_pool),
          'head': timed(head), 'LSTM': timed(lstm_pass),
          'optimizer': timed(optimizer_step)}


def define_flags() -> None:
  # Only when this file runs as the program: absl flags are process-global and the benchmarks import
  # one another (benchmarks/harness.py, "Flags").
  flags.DEFINE_integer('image_size', 64, 'Square image side.')
  flags.DEFINE_integer('batch', 32, 'Images per step.')
  flags.DEFINE_integer('rounds', 3, 'Interleaved timing rounds.')
  flags.DEFINE_integer('steps', 2, 'Calls per part per round.')
  flags.DEFINE_integer('torch_threads', 1, 'torch intra-op threads; 0: leave out torch.')
  flags.DEFINE_string('output', None, 'JSON path; default benchmarks/results/step_profile.json.')


def main(argv):
  harness.start(argv)
  args = harness.script_flags()
  mesh = mesh_lib.make_mesh()
  before = harness.idle_check()
  print(f'before the run: {harness.describe_load(before)}')
  monitor = harness.LoadMonitor()
  advancers = {f'capjax {k}': v for k, v in capjax_parts(args, mesh).items()}
  if args.torch_threads:
    advancers.update({f'torch {k}': v for k, v in torch_parts(args).items()})
  timings = structural_wins.time_interleaved(advancers, args.rounds, args.steps)
  load = monitor.report()
  parts = list(dict.fromkeys(name.split(' ', 1)[1] for name in timings))
  rows = []
  for part in parts:
    row = {'part': part}
    for impl in ('capjax', 'torch'):
      timing = timings.get(f'{impl} {part}')
      row[f'{impl}_ms'] = None if timing is None else 1e3 * timing['step_s']
      row[f'{impl}_range_ms'] = None if timing is None else (1e3 * timing['step_s_min'],
                                                              1e3 * timing['step_s_max'])
    if row['capjax_ms'] and row['torch_ms']:
      row['capjax/torch_time'] = row['capjax_ms'] / row['torch_ms']
    rows.append(row)
  summed = {'part': 'sum of parts (trunk + head + optimizer)'}
  for impl in ('capjax', 'torch'):
    if all(r[f'{impl}_ms'] is not None for r in rows if r['part'] in ('trunk', 'head', 'optimizer')):
      summed[f'{impl}_ms'] = sum(r[f'{impl}_ms'] for r in rows if r['part'] in ('trunk', 'head', 'optimizer'))
  rows.append(summed)
  print()
  harness.print_table(rows, ['part', 'capjax_ms', 'torch_ms', 'capjax/torch_time'])
  print(f'\n{harness.machine_info()}\n{harness.describe_load(load)}')
  harness.write_json(args.output or harness.default_output(__file__), {
      'benchmark': 'step_profile', 'argv': sys.argv, 'machine': harness.machine_info(),
      'load_before': before, 'load_during': load, 'settings': vars(args), 'rows': rows})


if __name__ == '__main__':
  define_flags()
  app.run(main)
