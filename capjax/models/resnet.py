"""ResNet v1.5 trunk (He et al. 2016, with the stride on the 3x3 conv as in torchvision).

`ResNet(stage_sizes=(3, 4, 6, 3), width=64)` is ResNet50 without its classifier: a 224 px image gives a
(7, 7, 2048) feature map. Tests shrink `stage_sizes` and `width`; the code path is the same.

Parameter names follow torchvision's layout (`stem_conv`, `stem_bn`, `stage{i}_block{j}/conv{1,2,3}`,
`bn{1,2,3}`, `proj_conv`, `proj_bn`) so that imported ImageNet weights map one to one.

Convolutions are `small_map_conv.Conv`: `nn.Conv`'s parameters and results (up to float rounding), but
on XLA:CPU the 1x1 convolutions and every convolution with an output of at most 14x14 (stages 3-4 at
224 px, 2-4 at 64 px) run as a matrix product, because XLA:CPU's own convolution is up to 36x slower
there in training (see that module). `conv_impl='lax'` gives plain `nn.Conv` arithmetic everywhere.
"""

from collections.abc import Sequence
import functools

import flax.linen as nn
import jax.numpy as jnp

from capjax.models import small_map_conv

# torchvision's BatchNorm2d defaults: eps 1e-5, running-average momentum 0.1 (0.9 in flax's convention).
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9
BOTTLENECK_EXPANSION = 4


class BottleneckBlock(nn.Module):
  """1x1 reduce -> 3x3 (strided) -> 1x1 expand, plus a projection shortcut when shapes change."""

  filters: int
  strides: int = 1
  dtype: jnp.dtype = jnp.float32
  conv_impl: str = 'auto'  # see small_map_conv.Conv.impl

  @nn.compact
  def __call__(self, x, *, train: bool):
    conv = functools.partial(small_map_conv.Conv, use_bias=False, dtype=self.dtype, impl=self.conv_impl)
    norm = functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
        dtype=self.dtype)
    out_filters = self.filters * BOTTLENECK_EXPANSION

    y = nn.relu(norm(name='bn1')(conv(self.filters, (1, 1), name='conv1')(x)))
    y = conv(self.filters, (3, 3), strides=self.strides, padding=((1, 1), (1, 1)), name='conv2')(y)
    y = nn.relu(norm(name='bn2')(y))
    y = conv(out_filters, (1, 1), name='conv3')(y)
    # Zero-initialised last BN scale: each block starts as the identity, which stabilises early training.
    y = norm(scale_init=nn.initializers.zeros, name='bn3')(y)

    shortcut = x
    if x.shape[-1] != out_filters or self.strides != 1:
      shortcut = conv(out_filters, (1, 1), strides=self.strides, name='proj_conv')(x)
      shortcut = norm(name='proj_bn')(shortcut)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """Convolutional trunk: returns the last feature map (N, H/32, W/32, width * 8 * 4)."""

  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  dtype: jnp.dtype = jnp.float32
  conv_impl: str = 'auto'  # see small_map_conv.Conv.impl

  @nn.compact
  def __call__(self, images, *, train: bool):
    x = small_map_conv.Conv(self.width, (7, 7), strides=2, padding=((3, 3), (3, 3)), use_bias=False,
                            dtype=self.dtype, impl=self.conv_impl, name='stem_conv')(images)
    x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                     dtype=self.dtype, name='stem_bn')(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BottleneckBlock(self.width * 2**stage, strides=strides, dtype=self.dtype,
                            conv_impl=self.conv_impl,
                            name=f'stage{stage + 1}_block{block + 1}')(x, train=train)
    return x
