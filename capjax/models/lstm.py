"""The LSTM both decoders use: gate order i, f, g, o (torch.nn.LSTM's), a float32 cell state under bf16
compute, and a forget-gate bias initialised to 1."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

LSTMCarry = tuple[jax.Array, jax.Array]  # (c, h)


class RecurrentStep(nn.Module):
  """One LSTM step given the precomputed input projection; gate order i, f, g, o (as torch.nn.LSTM)."""

  hidden_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, carry: LSTMCarry, input_gates):
    c, h = carry
    gates = input_gates + nn.Dense(4 * self.hidden_size, use_bias=False, dtype=self.dtype,
                                   name='recurrent')(h)
    i, f, g, o = jnp.split(gates.astype(jnp.float32), 4, axis=-1)
    # The cell state stays float32 under bf16 compute: it integrates over the whole caption.
    c = nn.sigmoid(f) * c + nn.sigmoid(i) * jnp.tanh(g)
    h = (nn.sigmoid(o) * jnp.tanh(c)).astype(self.dtype)
    return (c, h), h


def forget_gate_bias_init(value: float):
  """Gate biases (i, f, g, o): zeros, with `value` on the forget gate. A forget bias of 1 makes the
  cell keep what it read (here: the image, seen only at t=0) until it learns to let go; with 0 the
  cell halves its memory every step (Jozefowicz et al., 2015)."""
  def init(key, shape, dtype=jnp.float32):
    del key
    hidden = shape[0] // 4
    return jnp.zeros(shape, dtype).at[hidden:2 * hidden].set(value)
  return init


class LSTM(nn.Module):
  """LSTM over a whole sequence: the input projection of every step is one matmul outside the scan,
  so only the (hidden x 4 hidden) recurrent matmul is sequential."""

  hidden_size: int = 256
  unroll: int = 1
  dtype: Any = jnp.float32
  forget_bias: float = 1.0

  def setup(self):
    self.input_projection = nn.Dense(4 * self.hidden_size, dtype=self.dtype, name='input',
                                     bias_init=forget_gate_bias_init(self.forget_bias))
    self.recurrence = nn.scan(
        RecurrentStep, variable_broadcast='params', split_rngs={'params': False},
        in_axes=1, out_axes=1, unroll=self.unroll)(self.hidden_size, self.dtype, name='cell')

  def zero_carry(self, batch_size: int) -> LSTMCarry:
    return (jnp.zeros((batch_size, self.hidden_size), jnp.float32),
            jnp.zeros((batch_size, self.hidden_size), self.dtype))

  def __call__(self, carry: LSTMCarry, inputs):
    """inputs (N, T, D) -> (final carry, hidden states (N, T, hidden))."""
    return self.recurrence(carry, self.input_projection(inputs))
