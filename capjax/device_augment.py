"""The seed's training augmentations as one jittable, per-example JAX function.

Device counterpart of `input_pipeline.augment_image` (PIL on the host): the host ships fixed-size uint8
images and the jitted train step calls

    images, flipped = augment_images(rng, batch['image'], cfg, out_size)
    tokens = swap_left_right_ids(batch['tokens'], flipped, left_id, right_id)

Distributions are the host's (`AugmentConfig`): angle ~ U(-deg, +deg); an Inception-style random resized
crop of the rotated image (area fraction ~ U(crop_scale), aspect = exp(U(log crop_ratio)), integer
w = round(sqrt(area * aspect)), h = round(sqrt(area / aspect)), the first of 10 tries that fits, else the
whole image; integer top-left corner uniform over the valid positions); flip with probability flip_prob;
brightness factor ~ U(1 - b, 1 + b) multiplies the pixels, contrast factor ~ U(1 - c, 1 + c) scales them
around the image's mean over all pixels and channels; clip to [0, 255]. The 10 crop tries are drawn at
once and the first valid one kept, so the shapes are static. Each example has its own key
(`jax.random.split(rng, B)[i]`), so the result does not depend on how the batch is sharded. Draws come
from `jax.random`, not the host's numpy stream: the distributions match, single draws do not.

Coordinates (PIL's): continuous (x, y) with x to the right and y down, pixel (row i, column j) covering
[j, j + 1) x [i, i + 1), so its centre is (j + 0.5, i + 0.5). Rotation, crop, resize and flip are
composed into ONE affine map from an output pixel centre to a source point, and the source is sampled
once with bilinear interpolation, which is sharper than the host's two resamplings (rotate, then resize):
- resize of the box (x0, y0, w, h) to out x out: output x -> x0 + x * w / out (as PIL's `resize(box=...)`);
- rotation by +angle degrees is counter-clockwise on screen (PIL's `rotate`, expand=False, about the
  centre (W / 2, H / 2)): a point p of the rotated image comes from c + R(angle) (p - c) with
  R = [[cos, -sin], [sin, cos]];
- flip: output x -> out - x.
Sampling follows PIL's bilinear `transform`: a source point outside [0, W) x [0, H) is black (0); inside,
the four neighbouring pixel centres are blended, with indices clamped to the edge. Without rotation every
sample point lies inside, so a disabled config is a plain bilinear resize. With rotation the edge of the
black corners is hard here, where the host's second resampling softens it over about a pixel.

Bilinear sampling has no antialiasing: shrinking by 2x or more aliases (PIL's `resize` widens its filter
instead). Store images near the training size (e.g. shorter side 256 for 224). Measured against the host
path with the same draws, mean absolute difference in grey levels: 0.75 for a smooth 96 px image rotated
6 degrees, cropped to 80 x 72 and resized to 64; 0.44 for a plain 256 -> 224 resize; but 5.3 for a
noise-textured 256 -> 224 (PIL's filter is a little wider than bilinear even at 1.1x) and 8.3 for a
noise-textured 256 -> 64 (aliasing).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from capjax.input_pipeline import AugmentConfig

_CROP_TRIES = 10  # as the host's `_random_crop_box`


class AugmentParams(NamedTuple):
  """Per-example draws for a batch of B images of one size H x W.

  crop:       float32 (B, 4): [x0, y0, w, h] in pixels of the rotated image; integers, as on the host.
  angle:      float32 (B,): degrees, counter-clockwise.
  flip:       bool (B,): mirror left-right.
  brightness: float32 (B,): multiplies the pixels.
  contrast:   float32 (B,): scales the pixels around their mean.
  """
  crop: jax.Array
  angle: jax.Array
  flip: jax.Array
  brightness: jax.Array
  contrast: jax.Array


# ----------------------------------------------------------------------------- sampling

def _crop_disabled(cfg: AugmentConfig) -> bool:
  # The host's 'disabled' crop (scale (1, 1), ratio (1, 1)) still cuts a round(sqrt(W * H)) square out
  # of a near-square image (e.g. 63 x 63 of 64 x 63); here a full-area crop means no crop at all.
  return tuple(cfg.crop_scale) == (1.0, 1.0) and tuple(cfg.crop_ratio) == (1.0, 1.0)


def _between(u: jax.Array, low: float, high: float) -> jax.Array:
  return low + u * (high - low)  # exactly `low` when low == high


def _crop_box(u: jax.Array, height: int, width: int, cfg: AugmentConfig) -> jax.Array:
  """One example's box [x0, y0, w, h] from uniforms u (4, 10): the first of the 10 tries that fits,
  else the whole image."""
  full = jnp.array([0, 0, width, height], jnp.float32)
  if _crop_disabled(cfg):
    return full
  area = height * width * _between(u[0], *cfg.crop_scale)
  aspect = jnp.exp(_between(u[1], math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])))
  # jnp.round and Python's round both round half to even.
  w = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  h = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  # Corner uniform over 0 .. W - w; the clip guards u * n rounding up to n in float32. Tries that do
  # not fit get nonsense here but are never chosen.
  x0 = jnp.clip(jnp.floor(u[2] * (width - w + 1)), 0, width - w)
  y0 = jnp.clip(jnp.floor(u[3] * (height - h + 1)), 0, height - h)
  first = jnp.argmax(fits)  # index of the first True (0 when none fits; replaced below)
  box = jnp.stack([x0[first], y0[first], w[first], h[first]]).astype(jnp.float32)
  return jnp.where(fits.any(), box, full)


def _sample_one(rng: jax.Array, height: int, width: int, cfg: AugmentConfig) -> AugmentParams:
  # One call of the PRNG per example: XLA compiles each threefry call separately, and a dozen of them
  # took seconds to compile on CPU. Uniforms [0:40] are the crop tries, then angle, flip, b, c.
  u = jax.random.uniform(rng, (4 * _CROP_TRIES + 4,))
  deg, b, c = cfg.rotation_degrees, cfg.brightness, cfg.contrast
  return AugmentParams(
      crop=_crop_box(u[:4 * _CROP_TRIES].reshape(4, _CROP_TRIES), height, width, cfg),
      angle=_between(u[-4], -deg, deg),
      flip=u[-3] < cfg.flip_prob,
      brightness=_between(u[-2], 1 - b, 1 + b),
      contrast=_between(u[-1], 1 - c, 1 + c))


def sample_params(rng: jax.Array, batch_size: int, height: int, width: int,
                  cfg: AugmentConfig) -> AugmentParams:
  """Draws every example's augmentation from its own key, `jax.random.split(rng, batch_size)[i]`."""
  keys = jax.random.split(rng, batch_size)
  return jax.vmap(lambda k: _sample_one(k, height, width, cfg))(keys)


# ----------------------------------------------------------------------------- resampling

def affine_matrices(params: AugmentParams, height: int, width: int, out_size: int) -> jax.Array:
  """float32 (B, 2, 3) M with source point = M @ [x, y, 1] for an output point (x, y); see the module
  docstring for the conventions (output pixel (i, j) has its centre at (j + 0.5, i + 0.5))."""
  x0, y0, w, h = (params.crop[:, k] for k in range(4))
  sx, sy = w / out_size, h / out_size
  # Flip first (x -> out - x), then box resize: crop point = (x0 + sx * (a x + t), y0 + sy * y).
  a = jnp.where(params.flip, -1.0, 1.0)
  t = jnp.where(params.flip, float(out_size), 0.0)
  radians = jnp.deg2rad(params.angle)
  cos, sin = jnp.cos(radians), jnp.sin(radians)
  cx, cy = width / 2, height / 2
  # Rotation about the centre: source = c + R (p - c), p the crop point.
  px, py = x0 + sx * t - cx, y0 - cy  # p - c at output (0, 0)
  row_x = jnp.stack([cos * sx * a, -sin * sy, cx + cos * px - sin * py], axis=-1)
  row_y = jnp.stack([sin * sx * a, cos * sy, cy + sin * px + cos * py], axis=-1)
  return jnp.stack([row_x, row_y], axis=1).astype(jnp.float32)


def _bilinear_sample(image: jax.Array, xs: jax.Array, ys: jax.Array) -> jax.Array:
  """image (H, W, C) at continuous points (xs, ys) of any shape S -> float32 (*S, C); PIL's rule."""
  height, width = image.shape[:2]
  inside = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
  # Pixel centres sit at +0.5: shift so that integer positions are centres.
  fx, fy = xs - 0.5, ys - 0.5
  left, top = jnp.floor(fx), jnp.floor(fy)
  dx, dy = (fx - left)[..., None], (fy - top)[..., None]
  left, top = left.astype(jnp.int32), top.astype(jnp.int32)
  flat = image.reshape(height * width, -1)

  def pixel(row, col):
    row, col = jnp.clip(row, 0, height - 1), jnp.clip(col, 0, width - 1)
    return flat[row * width + col].astype(jnp.float32)

  upper = pixel(top, left) * (1 - dx) + pixel(top, left + 1) * dx
  lower = pixel(top + 1, left) * (1 - dx) + pixel(top + 1, left + 1) * dx
  return jnp.where(inside[..., None], upper * (1 - dy) + lower * dy, 0.0)


def _apply_one(image: jax.Array, matrix: jax.Array, brightness: jax.Array, contrast: jax.Array,
               out_size: int) -> jax.Array:
  centres = jnp.arange(out_size, dtype=jnp.float32) + 0.5
  x, y = centres[None, :], centres[:, None]
  xs = matrix[0, 0] * x + matrix[0, 1] * y + matrix[0, 2]
  ys = matrix[1, 0] * x + matrix[1, 1] * y + matrix[1, 2]
  pixels = _bilinear_sample(image, xs, ys) * brightness
  mean = pixels.mean()
  # As on the host: contrast works on the brightened pixels and only the end result is clipped.
  return jnp.clip((pixels - mean) * contrast + mean, 0, 255)


def apply_params(images: jax.Array, params: AugmentParams, out_size: int) -> jax.Array:
  """uint8 (or float) (B, H, W, C) -> float32 (B, out_size, out_size, C) in [0, 255]."""
  height, width = images.shape[1:3]
  matrices = affine_matrices(params, height, width, out_size)
  return jax.vmap(lambda im, m, b, c: _apply_one(im, m, b, c, out_size))(
      images, matrices, params.brightness, params.contrast)


def augment_images(rng: jax.Array, images: jax.Array, cfg: AugmentConfig,
                   out_size: int) -> tuple[jax.Array, jax.Array]:
  """uint8 (B, H, W, 3) -> (float32 (B, out_size, out_size, 3) in [0, 255], flipped bool (B,)).

  Under `jax.jit`, pass `cfg` and `out_size` as static arguments (`AugmentConfig` is frozen, so hashable).
  """
  batch, height, width = images.shape[:3]
  params = sample_params(rng, batch, height, width, cfg)
  return apply_params(images, params, out_size), params.flip


# ----------------------------------------------------------------------------- captions

def swap_left_right_ids(tokens: jax.Array, flipped: jax.Array, left_id: int | None,
                        right_id: int | None) -> jax.Array:
  """Swaps the ids of 'left' and 'right' in the captions of flipped images.

  tokens: int (B, L), or (B, K, L) for K captions of the same image (they share its flip).
  left_id / right_id: the words' ids (e.g. `vocab.words.index('left')`), None when a word is not in
  the vocabulary; then nothing is swapped (the host would swap the word into <UNK>, which is no help).
  """
  if left_id is None or right_id is None:
    return tokens
  flipped = jnp.reshape(flipped, flipped.shape + (1,) * (tokens.ndim - 1))
  swapped = jnp.where(tokens == left_id, right_id, jnp.where(tokens == right_id, left_id, tokens))
  return jnp.where(flipped, swapped.astype(tokens.dtype), tokens)


def make_batch_augmenter(cfg: AugmentConfig, out_size: int, vocab) -> Callable[[dict, jax.Array], dict]:
  """The train step's batch transform: augment `batch['image']` to out_size and swap 'left'/'right' in
  the captions of flipped images (`vocab`: a capjax Vocabulary; words it lacks are not swapped)."""
  index = {w: i for i, w in enumerate(vocab.words)}
  left_id, right_id = index.get('left'), index.get('right')

  def augment(batch: dict, rng: jax.Array) -> dict:
    images, flipped = augment_images(rng, batch['image'], cfg, out_size)
    return {**batch, 'image': images,
            'tokens': swap_left_right_ids(batch['tokens'], flipped, left_id, right_id)}
  return augment
