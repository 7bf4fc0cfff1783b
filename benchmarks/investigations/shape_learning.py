"""Why the demo's seed captioner does not name shapes: can the same ResNet trunk learn shape at all?

  python -m benchmarks.investigations.shape_learning [--width=16] [--steps=250] [--variants=classifier,...]

The demo's seed model learns colours and positions but its shape-word loss stays at chance (ln 3) for
its whole budget (README "Decoders"). This trains capjax's own modules on the demo's scenes
(`capjax.data.shapes.render_example`, drawn at 96 px and resized to 64 px, in memory) with capjax's
optimizer (AdamW + clipping, warmup/cosine, the demo's learning rate), from the same random init, and
reports held-out shape accuracy every `--eval_every` steps, for each variant:

  classifier           ResNet trunk -> global average pool -> Dense(3), cross-entropy on the true
                       shape (single-object scenes): what a direct shape signal teaches the trunk.
  caption              the seed Captioner, teacher-forced on all five captions (the demo's loss).
  caption_shape_words  the same captioner and captions, the loss on shape-word targets only: how
                       fast shape flows through the image vector -> LSTM path with nothing competing.
  caption_word_loss    the demo's loss plus the captioner's auxiliary word-presence loss
                       (config.model.word_loss_weight, --word_loss_weight): a head on the image
                       vector predicts which words the image's captions use.

Caption variants are scored on the single-object scenes of the held-out set: at each target position
whose true word is a shape, the argmax over the three shape words' logits (teacher forcing) against
the truth; chance is 1/3. Scenes with two objects train the caption variants as in the demo.
"""

import os
import sys
import time

if __package__ in (None, ''):  # run as `python benchmarks/investigations/shape_learning.py`
  sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from PIL import Image

from benchmarks import harness
from capjax import state as state_lib
from capjax import vocab as vocab_lib
from capjax.data import shapes
from capjax.models import captioner
from capjax.models import resnet

VARIANTS = ('classifier', 'caption', 'caption_shape_words', 'caption_word_loss')
DRAW_SIZE = 96  # the demo stores its images at 96 px and trains at 64


def render_scenes(num: int, seed: int, image_size: int) -> dict:
  """`num` demo scenes: uint8 images (N, S, S, 3), their five captions, and the shape index of
  single-object scenes (-1 for two objects)."""
  rng = np.random.default_rng([seed, 7])
  images, captions, shape_ids = [], [], []
  for _ in range(num):
    image, scene_captions, objects = shapes.render_example(rng, DRAW_SIZE)
    images.append(np.asarray(image.resize((image_size, image_size), Image.BILINEAR)))
    captions.append(scene_captions)
    shape_ids.append(shapes.SHAPES.index(objects[0]['shape']) if len(objects) == 1 else -1)
  return {'image': np.stack(images), 'captions': captions, 'shape': np.asarray(shape_ids, np.int32)}


class ShapeClassifier(nn.Module):
  """The captioner's trunk and pooling with a 3-way shape head instead of the caption decoder."""
  stage_sizes: tuple
  width: int

  @nn.compact
  def __call__(self, images, *, train: bool):
    features = resnet.ResNet(self.stage_sizes, self.width, name='trunk')(
        captioner.normalize_images(images, jnp.float32), train=train)
    return nn.Dense(len(shapes.SHAPES), name='head')(jnp.mean(features, axis=(1, 2)))


def shape_word_ids(vocab: vocab_lib.Vocabulary) -> np.ndarray:
  return np.asarray([vocab.encode(word, 3)[1] for word in shapes.SHAPES], np.int32)


def shape_targets(tokens: jax.Array, shape_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """For teacher-forced targets `tokens[..., 1:]` flattened to (N * K, T): a mask of the positions
  whose target is a shape word, and that word's index in `shapes.SHAPES` (0 elsewhere)."""
  targets = tokens.reshape(-1, tokens.shape[-1])[:, 1:]
  matches = targets[..., None] == shape_ids
  return jnp.any(matches, axis=-1), jnp.argmax(matches, axis=-1)


def train_config(learning_rate: float) -> ml_collections.ConfigDict:
  """The optimizer settings of configs/default.py (the demo overrides only the learning rate)."""
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config().train
  config.learning_rate = learning_rate
  return config


def run_variant(variant: str, train: dict, test: dict, vocab, args) -> list[dict]:
  stages = tuple(int(s) for s in args.stage_sizes.split(','))
  ids = jnp.asarray(shape_word_ids(vocab))
  single = np.flatnonzero(train['shape'] >= 0)
  test_single = np.flatnonzero(test['shape'] >= 0)
  if variant == 'classifier':
    model = ShapeClassifier(stages, args.width)
    variables = model.init(jax.random.PRNGKey(args.seed), train['image'][:2], train=False)
  else:
    word_loss_weight = args.word_loss_weight if variant == 'caption_word_loss' else 0.0
    model = captioner.Captioner(len(vocab), stages, args.width, word_loss_weight=word_loss_weight)
    variables = model.init(jax.random.PRNGKey(args.seed), train['image'][:2],
                           train['tokens'][:2, :, :-1], train=False)
  train_cfg = train_config(args.learning_rate)
  steps_per_epoch = max(1, len(single if variant == 'classifier' else train['image']) // args.batch_size)
  tx = state_lib.make_optimizer(train_cfg, state_lib.make_schedule(train_cfg, steps_per_epoch, args.steps),
                                'train')
  params, batch_stats = variables['params'], variables['batch_stats']
  opt_state = tx.init(params)

  def loss_fn(params, batch_stats, images, labels):
    out, updates = model.apply(
        {'params': params, 'batch_stats': batch_stats}, images,
        *(() if variant == 'classifier' else (labels[:, :, :-1],)), train=True,
        mutable=['batch_stats', 'losses'])
    if variant == 'classifier':
      return optax.softmax_cross_entropy_with_integer_labels(out, labels).mean(), updates
    if variant in ('caption', 'caption_word_loss'):
      loss_sum, count = state_lib.token_cross_entropy(out, labels)
      extra = state_lib.sown_loss(updates)
      return loss_sum / count + (0.0 if extra is None else extra), updates
    is_shape, _ = shape_targets(labels, ids)
    targets = labels.reshape(-1, labels.shape[-1])[:, 1:]
    losses = optax.softmax_cross_entropy_with_integer_labels(out, targets)
    return jnp.sum(losses * is_shape) / jnp.maximum(jnp.sum(is_shape), 1), updates

  @jax.jit
  def step(params, batch_stats, opt_state, images, labels):
    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, images, labels)
    deltas, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, deltas), updates['batch_stats'], opt_state, loss

  @jax.jit
  def correct(params, batch_stats, images, labels, true_shape):
    """(right, counted) shape predictions on single-object scenes."""
    variables = {'params': params, 'batch_stats': batch_stats}
    if variant == 'classifier':
      return jnp.sum(jnp.argmax(model.apply(variables, images, train=False), -1) == true_shape), len(images)
    logits = model.apply(variables, images, labels[:, :, :-1], train=False)
    is_shape, which = shape_targets(labels, ids)
    predicted = jnp.argmax(logits[..., ids], axis=-1)
    return jnp.sum((predicted == which) & is_shape), jnp.sum(is_shape)

  def accuracy():
    right = counted = 0
    for start in range(0, len(test_single), 100):
      rows = test_single[start:start + 100]
      labels = test['shape'][rows] if variant == 'classifier' else test['tokens'][rows]
      r, c = correct(params, batch_stats, test['image'][rows], labels, test['shape'][rows])
      right, counted = right + int(r), counted + int(c)
    return right / max(counted, 1)

  pool = single if variant == 'classifier' else np.arange(len(train['image']))
  rng = np.random.default_rng(args.seed)
  curve, losses, start = [], [], time.perf_counter()
  for i in range(1, args.steps + 1):
    rows = rng.choice(pool, args.batch_size, replace=False)
    labels = train['shape'][rows] if variant == 'classifier' else train['tokens'][rows]
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, train['image'][rows], labels)
    losses.append(float(loss))
    if i % args.eval_every == 0 or i == args.steps:
      point = {'variant': variant, 'step': i, 'train_loss': float(np.mean(losses[-args.eval_every:])),
               'test_shape_accuracy': accuracy(), 'seconds': time.perf_counter() - start}
      curve.append(point)
      print(f"{variant:20s} step {i:4d}  train loss {point['train_loss']:.3f}  held-out shapes right "
            f"{point['test_shape_accuracy']:.1%}  ({point['seconds']:.0f} s)", flush=True)
  return curve


def run(args) -> dict:
  """Trains and scores every variant of `args.variants` (`args`: the flags' values as attributes)."""
  variants = args.variants.split(',')
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    raise SystemExit(f'--variants: unknown {unknown}; expected some of {VARIANTS}')
  train = render_scenes(args.num_train, 0, args.image_size)
  test = render_scenes(args.num_test, 1, args.image_size)
  vocab = vocab_lib.build_vocabulary((c for cs in train['captions'] for c in cs), min_count=1)
  for scenes in (train, test):  # (N, 5, L): every scene's five captions, encoded once for all variants
    scenes['tokens'] = np.stack([[vocab.encode(c, args.max_caption_len) for c in captions]
                                 for captions in scenes['captions']])
  curves = {v: run_variant(v, train, test, vocab, args) for v in variants}
  payload = {'args': vars(args), 'machine': harness.machine_info(), 'curves': curves}
  if args.output:
    harness.write_json(args.output, payload)
  return payload


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  # Only when this file runs as the program: absl flags are process-global and the benchmarks import
  # one another (benchmarks/harness.py, "Flags"). The test defines them in a FlagValues of its own.
  flags.DEFINE_string('variants', ','.join(VARIANTS), f'Comma-separated, some of {VARIANTS}.',
                      flag_values=flag_values)
  flags.DEFINE_integer('width', 16, 'ResNet width (64: ResNet50 proper).', flag_values=flag_values)
  flags.DEFINE_string('stage_sizes', '3,4,6,3', 'ResNet blocks per stage, comma-separated.',
                      flag_values=flag_values)
  flags.DEFINE_integer('image_size', 64, 'Square image side the models see.', flag_values=flag_values)
  flags.DEFINE_integer('steps', 250, 'Training steps per variant.', flag_values=flag_values)
  flags.DEFINE_integer('batch_size', 32, 'Scenes per step.', flag_values=flag_values)
  flags.DEFINE_float('learning_rate', 2e-3, "Peak learning rate (the demo's).", flag_values=flag_values)
  flags.DEFINE_integer('num_train', 1000, 'Training scenes.', flag_values=flag_values)
  flags.DEFINE_integer('num_test', 300, 'Held-out scenes.', flag_values=flag_values)
  flags.DEFINE_integer('max_caption_len', 20, 'Tokens per caption incl. <START>/<END>.',
                       flag_values=flag_values)
  flags.DEFINE_integer('eval_every', 50, 'Held-out accuracy every this many steps (and after the last).',
                       flag_values=flag_values)
  flags.DEFINE_float('word_loss_weight', 1.0, "caption_word_loss's weight of the word-presence loss.",
                     flag_values=flag_values)
  flags.DEFINE_integer('seed', 0, 'Seed of the initialisation and the batches.', flag_values=flag_values)
  flags.DEFINE_string('output', harness.default_output(__file__), 'JSON path; empty: write none.',
                      flag_values=flag_values)


def main(argv):
  harness.start(argv)
  run(harness.script_flags())


if __name__ == '__main__':
  define_flags()
  app.run(main)
