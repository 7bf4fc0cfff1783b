"""Tests of the on-device augmentations: their distributions, exact geometric cases, parity with the host's
PIL path, and sharded == unsharded.

Statistical checks use N = 4,000 draws; a mean is held to 5 standard errors and a distribution to the
Kolmogorov-Smirnov distance 1.95 / sqrt(N) = 0.031 (the 0.1% critical value). The keys are fixed, so the
tests are deterministic; a correct sampler would fail a check for about one key in a thousand, while a
wrong range or transform (e.g. a uniform aspect instead of a log-uniform one) is far outside.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from capjax import device_augment, input_pipeline, mesh as mesh_lib
from capjax.input_pipeline import AugmentConfig

N = 4000
KS_LIMIT = 1.95 / math.sqrt(N)
OFF = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0, brightness=0.0,
                    contrast=0.0, rotation_degrees=0.0)


def ks_distance_to_uniform(samples, low, high) -> float:
  x = np.sort((np.asarray(samples, np.float64) - low) / (high - low))
  n = len(x)
  return max(np.max(np.arange(1, n + 1) / n - x), np.max(x - np.arange(n) / n))


def smooth_image(height, width, seed=0) -> np.ndarray:
  """uint8 (H, W, 3) of slow waves: interpolation errors stay small, and no two pixels are alike."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width].astype(np.float64)
  channels = [127 + 100 * np.sin(x / rng.uniform(7, 11) + y / rng.uniform(11, 15) + rng.uniform(0, 6))
              for _ in range(3)]
  return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def numpy_bilinear_resize(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """Reference: output centre i + 0.5 samples source centre (i + 0.5) * n / out, edges clamped."""
  def axis(n, out):
    s = (np.arange(out) + 0.5) * n / out - 0.5
    lo = np.floor(s).astype(int)
    return np.clip(lo, 0, n - 1), np.clip(lo + 1, 0, n - 1), s - lo

  r0, r1, fy = axis(image.shape[0], out_h)
  c0, c1, fx = axis(image.shape[1], out_w)
  image = image.astype(np.float64)
  rows = image[r0] * (1 - fy)[:, None, None] + image[r1] * fy[:, None, None]
  return rows[:, c0] * (1 - fx)[None, :, None] + rows[:, c1] * fx[None, :, None]


def make_params(crop, angle=0.0, flip=False, brightness=1.0, contrast=1.0):
  return device_augment.AugmentParams(
      crop=jnp.array([crop], jnp.float32), angle=jnp.array([angle], jnp.float32),
      flip=jnp.array([flip]), brightness=jnp.array([brightness], jnp.float32),
      contrast=jnp.array([contrast], jnp.float32))


@functools.partial(jax.jit, static_argnames=('batch_size', 'height', 'width', 'cfg'))
def jit_sample(rng, batch_size, height, width, cfg):
  return device_augment.sample_params(rng, batch_size, height, width, cfg)


# Compiling dominates the run time here (about 2 s a shape on a busy CPU), so tests share shapes.
jit_augment = jax.jit(device_augment.augment_images, static_argnames=('cfg', 'out_size'))
jit_apply = jax.jit(device_augment.apply_params, static_argnames=('out_size',))
BATCH = np.stack([smooth_image(40, 40, s) for s in range(16)])
ROTATE_10 = AugmentConfig(rotation_degrees=10.0)
# Scale * aspect <= 0.5 * 4/3 < 1: every first try fits, so no retry skews the distributions. Rounding
# w and h of a 1000 x 1000 image to integers moves the area fraction by < 0.3%.
BIG_IMAGE_CFG = AugmentConfig(crop_scale=(0.25, 0.5), crop_ratio=(3 / 4, 4 / 3), flip_prob=0.3,
                              brightness=0.2, contrast=0.4, rotation_degrees=7.0)


@pytest.fixture(scope='module')
def big_image_params():
  return jit_sample(jax.random.key(0), N, 1000, 1000, BIG_IMAGE_CFG)


# ----------------------------------------------------------------------------- distributions

def test_crop_area_and_aspect_follow_the_configured_uniforms(big_image_params):
  size = 1000
  crop = np.asarray(big_image_params.crop, np.float64)
  x0, y0, w, h = crop.T
  area = w * h / size**2
  log_aspect = np.log(w / h)
  lo, hi = math.log(3 / 4), math.log(4 / 3)
  assert area.min() > 0.25 - 0.005 and area.max() < 0.5 + 0.005
  assert log_aspect.min() > lo - 0.005 and log_aspect.max() < hi + 0.005
  assert abs(area.mean() - 0.375) < 5 * (0.25 / math.sqrt(12 * N))
  assert abs(log_aspect.mean()) < 5 * ((hi - lo) / math.sqrt(12 * N))
  assert ks_distance_to_uniform(area, 0.25, 0.5) < KS_LIMIT
  assert ks_distance_to_uniform(log_aspect, lo, hi) < KS_LIMIT
  # The corner is uniform over the valid positions 0 .. size - w.
  assert ks_distance_to_uniform((x0 + 0.5) / (size - w + 1), 0, 1) < KS_LIMIT
  assert ks_distance_to_uniform((y0 + 0.5) / (size - h + 1), 0, 1) < KS_LIMIT


def test_crop_retries_match_the_host_sampler():
  # The default scale (0.8, 1) with aspects up to 4/3 often overflows a 48 x 40 image: retries and
  # fallbacks matter. Compare with the host's `_random_crop_box` on the same image size.
  cfg, width, height = AugmentConfig(), 48, 40
  crop = np.asarray(jit_sample(jax.random.key(1), N, height, width, cfg).crop)
  x0, y0, w, h = crop.T
  assert (w > 0).all() and (h > 0).all() and (x0 >= 0).all() and (y0 >= 0).all()
  assert (x0 + w <= width).all() and (y0 + h <= height).all()
  assert np.array_equal(crop, np.round(crop))
  rng = np.random.default_rng(1)
  host = np.array([input_pipeline._random_crop_box(rng, width, height, cfg.crop_scale, cfg.crop_ratio)
                   for _ in range(N)], np.float64)
  host_w, host_h = host[:, 2] - host[:, 0], host[:, 3] - host[:, 1]
  for device, reference in ((w, host_w), (h, host_h)):
    spread = math.sqrt((device.var() + reference.var()) / N)
    assert abs(device.mean() - reference.mean()) < 5 * spread
  full = lambda ww, hh: np.mean((ww == width) & (hh == height))
  assert abs(full(w, h) - full(host_w, host_h)) < 5 * math.sqrt(2 * 0.25 / N)


def test_crop_that_never_fits_falls_back_to_the_whole_image():
  cfg = AugmentConfig(crop_scale=(1.5, 2.0))
  crop = np.asarray(jit_sample(jax.random.key(2), 64, 30, 40, cfg).crop)
  np.testing.assert_array_equal(crop, np.tile([0, 0, 40, 30], (64, 1)))


def test_angle_flip_brightness_contrast_distributions(big_image_params):
  params = big_image_params
  angle = np.asarray(params.angle)
  assert angle.min() >= -7 and angle.max() <= 7
  assert ks_distance_to_uniform(angle, -7, 7) < KS_LIMIT
  assert abs(np.asarray(params.flip).mean() - 0.3) < 5 * math.sqrt(0.3 * 0.7 / N)
  for factors, strength in ((params.brightness, 0.2), (params.contrast, 0.4)):
    factors = np.asarray(factors)
    assert factors.min() >= 1 - strength and factors.max() <= 1 + strength
    assert ks_distance_to_uniform(factors, 1 - strength, 1 + strength) < KS_LIMIT


# ----------------------------------------------------------------------------- tokens

def test_swap_left_right_ids_is_exact_where_flipped():
  left, right = 7, 9
  tokens = jnp.array([[1, 7, 5, 9, 2, 0], [1, 7, 9, 9, 2, 0]], jnp.int32)
  flipped = jnp.array([True, False])
  out = device_augment.swap_left_right_ids(tokens, flipped, left, right)
  np.testing.assert_array_equal(out, [[1, 9, 5, 7, 2, 0], [1, 7, 9, 9, 2, 0]])
  assert out.dtype == jnp.int32

  stacked = jnp.stack([tokens, tokens[::-1]], axis=0)  # (B=2, K=2, L=6): both captions of row 0 flip
  out = device_augment.swap_left_right_ids(stacked, flipped, left, right)
  np.testing.assert_array_equal(out[0], [[1, 9, 5, 7, 2, 0], [1, 9, 7, 7, 2, 0]])
  np.testing.assert_array_equal(out[1], stacked[1])


def test_swap_left_right_ids_without_the_words_is_identity():
  tokens = jnp.array([[1, 7, 9, 2]], jnp.int32)
  for left, right in ((None, 9), (7, None), (None, None)):
    out = device_augment.swap_left_right_ids(tokens, jnp.array([True]), left, right)
    np.testing.assert_array_equal(out, tokens)


# ----------------------------------------------------------------------------- images

def test_same_key_same_output_and_different_key_different_output():
  images = jnp.asarray(BATCH)
  a, flip_a = jit_augment(jax.random.key(5), images, ROTATE_10, 32)
  b, flip_b = jit_augment(jax.random.key(5), images, ROTATE_10, 32)
  c, _ = jit_augment(jax.random.key(6), images, ROTATE_10, 32)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(flip_a, flip_b)
  assert a.shape == (16, 32, 32, 3) and a.dtype == jnp.float32 and flip_a.shape == (16,)
  assert float(a.min()) >= 0 and float(a.max()) <= 255
  assert float(jnp.abs(a - c).mean(axis=(1, 2, 3)).min()) > 1.0  # every example changed


def test_disabled_config_is_a_plain_bilinear_resize():
  square = np.stack([smooth_image(40, 40, s) for s in range(2)])
  same, flipped = jit_augment(jax.random.key(7), jnp.asarray(square), OFF, 40)
  np.testing.assert_allclose(same, square, atol=1e-3)
  assert not np.asarray(flipped).any()

  wide = np.stack([smooth_image(40, 48, s) for s in range(2)])  # non-square: H and W must not swap
  for out_size in (20, 64):  # down by 2-2.4x and up
    resized, _ = jit_augment(jax.random.key(7), jnp.asarray(wide), OFF, out_size)
    for got, image in zip(np.asarray(resized), wide):
      np.testing.assert_allclose(got, numpy_bilinear_resize(image, out_size, out_size), atol=1e-3)
  # For upscaling PIL's bilinear resize is plain interpolation too (it rounds to uint8, <= 1 grey level).
  pil = np.asarray(Image.fromarray(wide[0]).resize((64, 64), Image.BILINEAR), np.float32)
  assert np.abs(np.asarray(resized[0]) - pil).max() <= 1.0


def test_pure_flip_mirrors_the_columns():
  images = np.stack([smooth_image(24, 24, s) for s in range(3)])
  flip_only = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=1.0, brightness=0.0,
                            contrast=0.0, rotation_degrees=0.0)
  out, flipped = jit_augment(jax.random.key(8), jnp.asarray(images), flip_only, 24)
  assert np.asarray(flipped).all()
  np.testing.assert_allclose(out, images[:, :, ::-1], atol=1e-3)


def test_rotation_is_counter_clockwise_like_pil():
  image = smooth_image(32, 32)
  full = [0, 0, 32, 32]
  quarter = jit_apply(jnp.asarray(image[None]), make_params(full, angle=90.0), 32)[0]
  np.testing.assert_allclose(quarter, np.rot90(image), atol=1e-2)  # PIL's rotate(90) is rot90 too
  np.testing.assert_array_equal(np.asarray(Image.fromarray(image).rotate(90)), np.rot90(image))

  # A general angle: PIL's bilinear rotate, black outside, truncated to uint8 (so up to 1 grey level).
  image = smooth_image(48, 48)
  for angle in (17.0, -6.5):
    pil = np.asarray(Image.fromarray(image).rotate(angle, resample=Image.BILINEAR), np.float32)
    ours = jit_apply(jnp.asarray(image[None]), make_params([0, 0, 48, 48], angle), 48)
    diff = np.abs(np.asarray(ours[0]) - pil)
    assert (pil == 0).all(axis=-1).mean() > 0.02  # the black corners are there
    assert diff.mean() < 0.6
    # Beyond 1 level only where float32 and PIL's doubles disagree on inside / outside at the border.
    assert (diff > 1.01).mean() < 0.002


def host_augment(image, cfg, size, box, fractions, flip_draw, monkeypatch):
  """The host's `augment_image` with its draws fixed: `box` for the crop, uniform draws at
  `low + fraction * (high - low)` (angle, brightness, contrast in that order), `flip_draw` for the flip."""

  class ScriptedRng:
    def __init__(self):
      self._fractions = iter(fractions)

    def uniform(self, low, high):
      return low + next(self._fractions) * (high - low)

    def random(self):
      return flip_draw

  monkeypatch.setattr(input_pipeline, '_random_crop_box', lambda *args: box)
  return input_pipeline.augment_image(Image.fromarray(image), ScriptedRng(), size, cfg)


def test_matches_the_host_pil_path_for_a_modest_downscale(monkeypatch):
  cfg = AugmentConfig(flip_prob=0.5, brightness=0.2, contrast=0.2, rotation_degrees=10.0)
  image = smooth_image(96, 96, seed=3)
  box = (10, 6, 10 + 80, 6 + 72)  # left, top, right, bottom: 80 x 72 -> 64 x 64
  fractions = (0.8, 0.9, 0.25)  # angle +6 deg, brightness 1.16, contrast 0.9
  host, flipped = host_augment(image, cfg, 64, box, fractions, 0.1, monkeypatch)
  assert flipped
  params = make_params([10, 6, 80, 72], angle=6.0, flip=True, brightness=1.16, contrast=0.9)
  ours = np.asarray(jit_apply(jnp.asarray(image[None]), params, 64)[0])
  diff = np.abs(ours - host.astype(np.float32))
  # Measured 0.75 mean, 2.2 at the 99th percentile: the host resamples twice and rounds to uint8 twice.
  assert diff.mean() < 1.0, diff.mean()
  assert np.quantile(diff, 0.99) < 4.0
  # Not flipped the other way, not rotated the other way: either would be far off.
  assert np.abs(ours[:, ::-1] - host).mean() > 10
  wrong_angle = make_params([10, 6, 80, 72], angle=-6.0, flip=True, brightness=1.16, contrast=0.9)
  wrong = np.asarray(jit_apply(jnp.asarray(image[None]), wrong_angle, 64)[0])
  assert np.abs(wrong - host).mean() > 3


def test_sharded_batch_matches_unsharded():
  mesh = mesh_lib.make_mesh()
  assert mesh.devices.size == 8
  rng = jax.random.key(9)
  expected, expected_flip = jit_augment(rng, jnp.asarray(BATCH), ROTATE_10, 32)
  sharded = jax.device_put(BATCH, mesh_lib.batch_sharded(mesh))
  got, got_flip = jit_augment(rng, sharded, ROTATE_10, 32)
  np.testing.assert_allclose(got, expected, atol=1e-3)
  np.testing.assert_array_equal(got_flip, expected_flip)
  assert 0 < np.asarray(got_flip).sum() < 16  # some of each, so the flip is exercised
