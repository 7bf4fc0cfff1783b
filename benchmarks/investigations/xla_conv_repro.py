"""XLA:CPU: convolutions on tiny spatial maps (and 1x1 kernel gradients) run 10-80x slower than im2col + dot.

Standalone (needs only jax, numpy and absl-py), for the XLA issue tracker:
`python xla_conv_repro.py [--reps=5]`.

Each case is one `lax.conv_general_dilated` (NHWC input, HWIO kernel, float32, jit-compiled) and the same
function written as im2col (zero padding, kh*kw strided slices concatenated on the channel axis, one dot).
Both give the same numbers (max abs difference ~1e-5, checked below). 'fwd' is the convolution, 'grad'
the gradients that training needs (input and kernel) of <conv(x, w), g>. Median of `reps` calls after a
compiling one. These shapes occur in ResNet50 (stage 4 at 48-64 px inputs; every 1x1 convolution):

  a. 3x3, stride 1, padding 1 on a 2x2 map (batch 32, 512 -> 512 channels): slow forward and backward.
  a'. the same shapes with the padding already in the input: a 4x4 map, 'VALID' (-> 2x2). Forward only
     4x slower than the dot, but its input gradient (a 3x3 convolution of the 2x2 output gradient with
     padding 2) is slow again. (`jnp.pad` + 'VALID' inside the jitted function is as slow as a: XLA folds
     the pad into the convolution.) So the slow operation is a convolution whose padded input is 2x2.
  b. 3x3, stride 2, padding 1 on a 4x4 map (-> 2x2): fast forward, slow gradient (the input gradient is
     a 3x3 convolution of a 2x2 map back to 4x4).
  c. 1x1 on a 16x16 map (batch 32, 64 -> 256): fast forward, slow kernel gradient (XLA computes it as a
     convolution whose window is the whole 16x16 map; as a dot it is `einsum('nhwc,nhwo->co')`).

Observed on a 2-core AMD EPYC KVM guest, jax/jaxlib 0.10.2, `python xla_conv_repro.py --reps=5`, while
other jobs kept the machine busy (load average 7); ms wall / ms CPU of the process, conv vs im2col + dot:
  a.  fwd 2015 / 991 vs 16.2 / 13.5   grad 2007 / 1024 vs 50.3 / 23.2   (73x, 44x in CPU time)
  a'. fwd   98 /  48 vs 24.5 / 12.7   grad 3674 / 1764 vs 83.7 / 41.8   (3.8x, 42x)
  b.  fwd  101 /  50 vs 26.7 / 12.9   grad 2149 / 1065 vs 51.4 / 25.0   (3.9x, 43x)
  c.  fwd   15 / 7.2 vs 11.9 /  5.7   grad  203 /  102 vs  104 / 34.4   (1.3x, 3.0x)
On the same machine when it was quiet, case a took 181 ms forward and 361 ms grad against 7 / 11.5 ms (and
torch 2.14's conv2d 1.6 ms forward). Pinned to one core (`taskset -c 0`) case a is as slow (1879 ms, busy
machine), so it is not thread scheduling. Case a's convolution on 1x1, 3x3, 4x4 and 7x7 maps is 1.0-5.4x
slower than the dot, not 30-70x. `--xla_cpu_use_onednn=true`, `--xla_cpu_use_xnnpack=true` and
`--xla_cpu_multi_thread_eigen=false` change nothing (case a forward: 1.9-2.0 s each, busy machine);
bfloat16 is as slow (1.87 s). Expected: about the time of the equivalent dot (both do the same FLOPs).
"""

import time

from absl import app
from absl import flags
from absl import logging
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

FLAGS = flags.FLAGS

DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')

# name: (batch, map size, input channels, output channels, kernel size, stride, padding)
CASES = {
    'a. 3x3/1 on 2x2': (32, 2, 512, 512, 3, 1, 1),
    "a'. 3x3/1 on 4x4 VALID": (32, 4, 512, 512, 3, 1, 0),  # case a's shapes, the padding in the input
    'b. 3x3/2 on 4x4': (32, 4, 512, 512, 3, 2, 1),
    'c. 1x1/1 on 16x16': (32, 16, 64, 256, 1, 1, 0),
}


def conv(x, w, stride, pad):
  return lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                  dimension_numbers=DIMENSION_NUMBERS)


def im2col_dot(x, w, stride, pad):
  k, _, cin, cout = w.shape
  x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  n, h, _, _ = x.shape
  out = (h - k) // stride + 1
  end = (out - 1) * stride + 1
  cols = [lax.slice(x, (0, i, j, 0), (n, i + end, j + end, cin), (1, stride, stride, 1))
          for i in range(k) for j in range(k)]
  return jnp.concatenate(cols, axis=-1) @ w.reshape(k * k * cin, cout)


def median_ms(fn, *args, reps):
  """Median wall and CPU (all threads of the process) milliseconds per call, after a compiling call."""
  jax.block_until_ready(fn(*args))
  wall, cpu = [], []
  for _ in range(reps):
    start, start_cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  return 1e3 * float(np.median(wall)), 1e3 * float(np.median(cpu))


def define_flags() -> None:
  # Only when this file runs as the program (absl flags are process-global), as in capjax's benchmarks.
  flags.DEFINE_integer('reps', 5, 'Timed calls per case and implementation (median reported).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}: the repetitions are --reps=N')
  if not FLAGS['verbosity'].present:  # app.run turns on jax's INFO logs
    logging.set_verbosity(logging.WARNING)
  reps = FLAGS.reps
  print(f'jax {jax.__version__}, {jax.devices()[0].device_kind}, median of {reps}; ms wall / ms CPU')
  for name, (batch, size, cin, cout, k, stride, pad) in CASES.items():
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (batch, size, size, cin))
    w = jax.random.normal(kw, (k, k, cin, cout)) / np.sqrt(k * k * cin)
    g = jax.random.normal(kg, conv(x, w, stride, pad).shape)
    cells = []
    for impl in (conv, im2col_dot):
      forward = jax.jit(lambda x, w, impl=impl: impl(x, w, stride, pad))
      grad = jax.jit(jax.grad(lambda x, w, impl=impl: jnp.vdot(impl(x, w, stride, pad), g), argnums=(0, 1)))
      for fn in (forward, grad):
        cells.append('%7.1f / %7.1f' % median_ms(fn, x, w, reps=reps))
    diff = float(jnp.max(jnp.abs(conv(x, w, stride, pad) - im2col_dot(x, w, stride, pad))))
    print(f'{name:<18} conv: fwd {cells[0]}, grad {cells[1]}   im2col+dot: fwd {cells[2]}, '
          f'grad {cells[3]}   max |diff| {diff:.1e}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
