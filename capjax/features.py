"""The 'cached' encoder mode: trunk features extracted once per split, stored in the workdir.

With a frozen (ImageNet) trunk, the ResNet forward pass is the same every epoch, so it is computed
once: `<workdir>/features/<split>.npy` (one row per image, source order; the model's
`cached_features`: pooled float32 vectors for the seed decoder, the float16 annotation grid for the
attention decoder) plus a JSON that says what produced it. The decoder then trains on these with no
image augmentation (an augmented image would need a new forward pass, which is what this mode avoids).
A stale file (other dataset size, image size or trunk weights) is re-extracted, and
`config.model.reextract_features` forces it.

The file is bounded by disk, not memory: rows are written into it as the batches come and it is read back
memory-mapped (`np.load(mmap_mode='r')`), so a COCO-sized grid (113k x 49 x 2048 float16, 22 GB) never
has to fit in RAM. Processes other than 0 keep their own copy, `<split>.process<k>.npy`.
"""

import errno
import hashlib
import os

import jax
import numpy as np

from capjax import errors
from capjax import fileio
from capjax import input_pipeline
from capjax import mesh as mesh_lib
from capjax import progress
from capjax.data import records as records_lib


def _trunk_fingerprint(trunk_params) -> str:
  """Changes whenever the trunk weights change (hash of a few leaves' bytes; cheap and stable)."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(trunk_params))[:8]:
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()[:16]


def extract_features(model, variables, source, mesh, *, image_size: int, batch_size: int, path: str) -> None:
  """Writes the model's `cached_features` for every image of `source`, in source order, to the .npy file
  `path`, each batch's rows as they come: all the features are never in memory at once."""
  extract = jax.jit(lambda v, images: model.apply(v, images, method=model.cached_features),
                    in_shardings=(mesh_lib.replicated(mesh), mesh_lib.batch_sharded(mesh)),
                    out_shardings=mesh_lib.replicated(mesh))
  batches = input_pipeline.caption_batches(
      source, image_size=image_size,
      host_batch_size=mesh_lib.per_host_batch_size(batch_size, mesh, 'eval_batch_size'),
      process_index=jax.process_index(), process_count=jax.process_count())
  rows, written = None, 0
  for batch in batches:
    # One batch at a time: this batch's rows from every process, then they go to disk.
    for index, row in mesh_lib.apply_to_host_batches(extract, variables, [batch], mesh).items():
      if rows is None:
        rows = _reserved_npy(path, row.dtype, (len(source), *row.shape))
      rows[index] = row
      written += 1
  if written != len(source):
    raise RuntimeError(f'{path}: extracted {written} feature rows for {len(source)} images')
  rows.flush()


def _reserved_npy(path: str, dtype, shape: tuple[int, ...]) -> np.memmap:
  """A writable memory-mapped .npy whose disk space is allocated now: a full disk is an error here,
  not a SIGBUS when a page of a sparse file is first written."""
  rows = np.lib.format.open_memmap(path, mode='w+', dtype=dtype, shape=shape)
  with open(path, 'r+b') as f:
    try:
      os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
    except OSError as e:
      if e.errno == errno.ENOSPC:
        raise errors.DiskFull(f'{path} needs {os.path.getsize(path) / 2**30:.1f} GiB for the cached '
                              'features: no space left on its disk') from None
      if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without fallocate: go on sparse
        raise
  return rows


def feature_path(workdir: str, split: str) -> str:
  name = split if jax.process_index() == 0 else f'{split}.process{jax.process_index()}'
  return os.path.join(workdir, 'features', f'{name}.npy')


def load_or_extract(workdir: str, split: str, model, variables, source, mesh, *, image_size: int,
                    batch_size: int, reextract: bool = False) -> np.memmap:
  """The split's cached features, memory-mapped read-only; extracted first when absent or stale."""
  path = feature_path(workdir, split)
  meta = {'num_images': len(source), 'image_size': image_size,
          'trunk': _trunk_fingerprint(variables['params']['encoder']['trunk'])}
  if model.has_attention:  # a grid, not pooled vectors (seed caches keep their old description)
    meta['annotation_grid'] = model.attention_grid
  if not reextract and os.path.exists(path) and os.path.exists(path + '.json'):
    if fileio.read_json(path + '.json') == meta:
      return np.load(path, mmap_mode='r')
    progress.say(f'{path} was made from other data or trunk weights: extracting again.')
  progress.say(f'Extracting trunk features for {len(source)} {split} images ...')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  partial = f'{path}.tmp{os.getpid()}'
  try:
    extract_features(model, variables, source, mesh, image_size=image_size, batch_size=batch_size,
                     path=partial)
    os.replace(partial, path)
  finally:
    if os.path.exists(partial):
      os.remove(partial)
  fileio.write_json(path + '.json', meta)  # written last: it vouches for the .npy
  return np.load(path, mmap_mode='r')


class FeatureSource:
  """Random-access records {'features': (C,), 'captions': [...]} built from a split's captions (its
  captions file: no image is read) and its cached features; the grain pipeline reads it like an image
  source. Pickled (for grain's worker processes) with the memory-mapped file's name, not its contents."""

  def __init__(self, features: np.ndarray, source):
    if len(features) != len(source):
      raise ValueError(f'{len(features)} cached feature rows for {len(source)} images')
    self._features = features
    self._captions = records_lib.split_captions(source)

  def __len__(self):
    return len(self._captions)

  def __getitem__(self, index):
    return {'features': np.asarray(self._features[index]), 'captions': self._captions[index]}

  def __getstate__(self):
    state = dict(self.__dict__)
    if isinstance(self._features, np.memmap) and self._features.filename:
      state['_features'] = self._features.filename
    return state

  def __setstate__(self, state):
    if isinstance(state['_features'], str):
      state['_features'] = np.load(state['_features'], mmap_mode='r')
    self.__dict__.update(state)
