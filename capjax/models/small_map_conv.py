"""`Conv`: `nn.Conv` for NHWC images, computed as a matrix product where XLA:CPU's convolution is slow.

XLA:CPU (jax 0.10.2) runs many of ResNet50's convolutions far slower than the same arithmetic written as
im2col + one dot, and some pathologically so (`benchmarks/investigations/xla_conv_repro.py`, a standalone
reproduction). `benchmarks/investigations/resnet_convs.py` times every convolution of the ResNet50 trunk
both ways (forward, and forward + backward with the gradients a training step needs). On the shared
2-core CPU, milliseconds of forward+backward (forward in brackets), lax.conv vs as a dot:

  at 64 px, batch 32 (results/resnet_convs.json)
    3x3/1 on 2x2 (stage 4, x2)          2,481 (2,546) vs 68 (35)   the pathology: 36x (73x forward)
    3x3/2 on 4x4 -> 2x2 (stage 4)       1,197 (59) vs 32 (21)      its input gradient is the same case
    3x3 with 8x8 and 4x4 outputs        80-104 (42-76) vs 60-76 (30-37)
    3x3/1 on 16x16 (stage 1, x3)        114 (48) vs 226 (131)      lax.conv wins
    1x1, every size                     38-348 (12-76) vs 16-92 (4-44): 1.6-7x, most of it the kernel
                                        gradient (a convolution with a map-sized window in XLA)
  at 224 px, batch 4 (results/resnet_convs_224px.json)
    3x3 with 14x14 and 7x7 outputs      109-142 (40-55) vs 64-84 (33-44): 1.4-1.9x (forward 0.9-1.6x)
    3x3/1 on 28x28, 3x3/2 56 -> 28      116-184 (36-39) vs 119-121 (54-59): training gains, forward loses
    3x3/1 on 56x56 (stage 1)            136 (33) vs 228 (164)      lax.conv wins
    1x1 on 56x56 (stages 1-2)           73-1,476 (13-40) vs 20-99 (9-39): up to 15x (kernel gradient)
  the trunk's 53 convolutions with the rule below, forward+backward: 12.1 s -> 3.0 s at 64 px, 8.8 s ->
  3.9 s at 224 px (torch's conv2d on one thread: 4.0 s); forward: 7.1 -> 1.1 s and 1.5 -> 1.3 s. Other
  jobs used 1.5 of the two cores during these runs: only ratios within a run mean much.

Rule (`uses_matmul`): a matrix product for every 1x1 kernel (a strided slice and one dot, no extra
memory), and for any kernel whose output map is at most `SMALL_OUTPUT` (14) on both sides: every such
case measured is faster in training (1.1x to 36x), and forward mostly faster, at worst 15% slower.
Larger outputs keep `lax.conv_general_dilated`, called exactly as `nn.Conv` calls it (bit-identical
results): the 7x7 stem, and 3x3 convolutions with 16x16 to 56x56 outputs, where im2col's 9x larger
operand loses forward. The stem's kernel gradient stays slow (380 ms vs torch's 77 at 224 px x 4; as a
dot 348 ms, with a 6x slower forward): left alone.

The rule applies on XLA:CPU only (`impl='auto'`, the default): GPUs and TPUs keep `lax.conv` (cuDNN and
the TPU compiler were not measured slow, and no accelerator was at hand to measure the alternative);
`impl='lax'` is `nn.Conv` everywhere, `impl='matmul'` the rule everywhere.

The im2col is done by hand (pad, kh*kw strided slices concatenated on the channel axis, one einsum with
the kernel reshaped in its own HWIO order) rather than with `lax.conv_general_dilated_patches`, which is
itself a (grouped) convolution and makes the backward pass 2-5x slower than the slices on 3x3-4x4 maps.

Parameters are those of `nn.Conv` (name 'kernel', shape (kh, kw, in, out), `lecun_normal`, float32; 'bias'
with zeros when `use_bias`), so a module of this class at the same path gets the same values from the
same rng, and checkpoints and imported weights are unchanged. Computation is in `dtype` as in `nn.Conv`;
results differ from it by float rounding only (the sums run in another order). Supports what the ResNet
uses: 4-D NHWC inputs, explicit or 'SAME'/'VALID' padding; no dilation or groups.
"""

from collections.abc import Sequence

import flax.linen as nn
from flax.linen import dtypes
from flax.linen.linear import canonicalize_padding
import jax
from jax import lax
import jax.numpy as jnp

# Largest output height and width for which every kernel takes the matrix-product path.
SMALL_OUTPUT = 14
DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')
# 'auto': the rule on XLA:CPU, `lax.conv_general_dilated` on accelerators (cuDNN and the TPU compiler were
# never measured slow there, and im2col multiplies a 3x3 convolution's input traffic by 9); 'lax': always
# `lax.conv_general_dilated` (exactly nn.Conv); 'matmul': the rule on every backend.
IMPLS = ('auto', 'lax', 'matmul')


def _on_cpu() -> bool:
  """Whether the function being traced is for XLA:CPU (the default backend; jit compiles for it)."""
  return jax.default_backend() == 'cpu'


def uses_matmul(kernel_size: Sequence[int], output_shape: Sequence[int]) -> bool:
  """Whether a convolution with this kernel and an output map of this (static) height and width is
  computed as a matrix product on XLA:CPU (see the module docstring for the measurements behind it)."""
  return tuple(kernel_size) == (1, 1) or max(output_shape) <= SMALL_OUTPUT


def explicit_padding(spatial_shape, kernel_size, strides, padding) -> list[tuple[int, int]]:
  """'SAME'/'VALID' as (low, high) pairs per spatial dimension; pairs unchanged."""
  if isinstance(padding, str):
    return lax.padtype_to_pads(spatial_shape, kernel_size, strides, padding)
  return [tuple(p) for p in padding]


def output_shape(spatial_shape, kernel_size, strides, padding) -> tuple[int, int]:
  pads = explicit_padding(spatial_shape, kernel_size, strides, padding)
  return tuple((size + lo + hi - k) // s + 1
               for size, (lo, hi), k, s in zip(spatial_shape, pads, kernel_size, strides))


def conv_as_matmul(x, kernel, strides: Sequence[int], padding, precision=None):
  """`lax.conv_general_dilated(x, kernel, strides, padding)` (NHWC, HWIO) as im2col + one einsum."""
  kh, kw, cin, cout = kernel.shape
  ho, wo = output_shape(x.shape[1:3], (kh, kw), strides, padding)
  x = jnp.pad(x, ((0, 0), *explicit_padding(x.shape[1:3], (kh, kw), strides, padding), (0, 0)))
  n, sh, sw = x.shape[0], *strides
  cols = [lax.slice(x, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, cin), (1, sh, sw, 1))
          for i in range(kh) for j in range(kw)]
  cols = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)  # features ordered (i, j, c)
  return jnp.einsum('nhwk,ko->nhwo', cols, kernel.reshape(kh * kw * cin, cout), precision=precision)


class Conv(nn.Module):
  """`nn.Conv(features, kernel_size, strides, padding, use_bias, dtype)` for NHWC inputs; see the module
  docstring for when it computes with a matrix product instead of `lax.conv_general_dilated`."""

  features: int
  kernel_size: Sequence[int]
  strides: int | Sequence[int] = 1
  padding: str | int | Sequence[tuple[int, int]] = 'SAME'
  use_bias: bool = True
  dtype: jnp.dtype | None = None
  param_dtype: jnp.dtype = jnp.float32
  precision: lax.Precision | None = None
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
  impl: str = 'auto'  # one of IMPLS

  def _as_matmul(self, kernel_size, out_shape) -> bool:
    if self.impl not in IMPLS:
      raise ValueError(f'impl: expected one of {IMPLS}, got {self.impl!r}')
    wanted = self.impl == 'matmul' or (self.impl == 'auto' and _on_cpu())
    return wanted and uses_matmul(kernel_size, out_shape)

  @nn.compact
  def __call__(self, inputs):
    if inputs.ndim != 4:
      raise ValueError(f'expected NHWC inputs, got shape {inputs.shape}')
    kernel_size = tuple(self.kernel_size)
    strides = 1 if self.strides is None else self.strides  # None means 1, as in nn.Conv
    strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
    padding = canonicalize_padding(self.padding, 2)
    if padding in ('CIRCULAR', 'REFLECT', 'CAUSAL'):
      raise ValueError(f'padding {padding!r} is not supported; use nn.Conv')
    kernel = self.param('kernel', self.kernel_init, kernel_size + (inputs.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    inputs, kernel, bias = dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    if self._as_matmul(kernel_size, output_shape(inputs.shape[1:3], kernel_size, strides, padding)):
      y = conv_as_matmul(inputs, kernel, strides, padding, self.precision)
    else:  # The call nn.Conv makes.
      y = lax.conv_general_dilated(inputs, kernel, strides, padding, lhs_dilation=(1, 1), rhs_dilation=(1, 1),
                                   dimension_numbers=lax.conv_dimension_numbers(
                                       inputs.shape, kernel.shape, DIMENSION_NUMBERS),
                                   feature_group_count=1, precision=self.precision)
    return y if bias is None else y + bias
