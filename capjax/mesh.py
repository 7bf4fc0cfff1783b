"""The device mesh and every sharding the project uses (data parallel over one 'data' axis).

Params and optimizer state are replicated; batches are split over 'data'. Under plain `jax.jit` with a
batch sharded this way, BatchNorm statistics are computed over the global batch (XLA inserts the
all-reduce), so the sharded step matches the single-device step.
"""

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = 'data'


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all (global) devices. Built with `Mesh`, whose axes are Auto: the Explicit
  default of `jax.make_mesh` breaks flax linen's `nn.Embed` and `nn.scan`."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def per_host_batch_size(global_batch_size: int, mesh: Mesh, field: str = 'batch_size') -> int:
  """This host's share of a global batch, or a clear error when the batch cannot be split evenly."""
  num_devices = mesh.devices.size
  if global_batch_size % num_devices:
    raise ValueError(f'config.{field}={global_batch_size} must be divisible by the number of devices '
                     f'({num_devices})')
  return global_batch_size // jax.process_count()


def host_batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This host's slice of the batch -> global arrays sharded over 'data' (works on 1..N hosts)."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def apply_to_host_batches(fn: Callable, variables: Any, batches: Iterable[Mapping[str, np.ndarray]],
                          mesh: Mesh) -> dict[int, Any]:
  """Runs `fn(variables, images)` (jitted: batch sharded in, replicated out) over every process's host
  batches `{'image': (b, ...), 'index': (b,)}` (index -1 = padding) and returns, on every process,
  {index: that example's output} for the real examples of all processes. Every process must yield the
  same number of batches (see `input_pipeline.caption_batches`). Outputs may be arrays or tuples."""
  rows = {}
  for batch in batches:
    images = host_batch_to_global({'image': batch['image']}, mesh)['image']
    outputs = jax.tree.map(np.asarray, jax.device_get(fn(variables, images)))
    indices = multihost_utils.process_allgather(batch['index'], tiled=True)
    for position, index in enumerate(indices):
      if index >= 0:
        rows[int(index)] = jax.tree.map(lambda x: x[position], outputs)  # noqa: B023
  return rows


def prefetch_to_mesh(items, mesh: Mesh, size: int = 2):
  """(host batch, tag) pairs -> (global batch, tag), keeping `size` batches in flight to the devices
  so the copy overlaps the running step. The tag travels untouched (the training loop pairs each
  batch with the data-iterator state taken right after it)."""
  queue = []
  for batch, tag in items:
    queue.append((host_batch_to_global(batch, mesh), tag))
    if len(queue) > size:
      yield queue.pop(0)
  yield from queue


def tree_replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))
