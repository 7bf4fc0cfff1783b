"""The 'cached' encoder mode: trunk features extracted once per split, stored in the workdir.

With a frozen (ImageNet) trunk, the ResNet forward pass is the same every epoch, so it is computed
once: `<workdir>/features/<split>.npy` (one row per image, source order; the model's
`cached_features`: pooled float32 vectors for the seed decoder, the float16 annotation grid for the
attention decoder) plus a JSON that says what produced it. The decoder then trains on these with no
image augmentation (an augmented image would need a new forward pass, which is what this mode avoids).
A stale file (other dataset size, image size or trunk weights) is re-extracted, and
`config.model.reextract_features` forces it.
"""

import hashlib
import os

import jax
import numpy as np

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


def extract_features(model, variables, source, mesh, *, image_size: int, batch_size: int) -> np.ndarray:
  """The model's `cached_features` for every image of `source`, in source order."""
  extract = jax.jit(lambda v, images: model.apply(v, images, method=model.cached_features),
                    in_shardings=(mesh_lib.replicated(mesh), mesh_lib.batch_sharded(mesh)),
                    out_shardings=mesh_lib.replicated(mesh))
  batches = input_pipeline.caption_batches(
      source, image_size=image_size,
      host_batch_size=mesh_lib.per_host_batch_size(batch_size, mesh, 'eval_batch_size'),
      process_index=jax.process_index(), process_count=jax.process_count())
  rows = mesh_lib.apply_to_host_batches(extract, variables, batches, mesh)
  return np.stack([rows[i] for i in range(len(source))])


def load_or_extract(workdir: str, split: str, model, variables, source, mesh, *, image_size: int,
                    batch_size: int, reextract: bool = False) -> np.ndarray:
  folder = os.path.join(workdir, 'features')
  path = os.path.join(folder, f'{split}.npy')
  meta = {'num_images': len(source), 'image_size': image_size,
          'trunk': _trunk_fingerprint(variables['params']['encoder']['trunk'])}
  if model.has_attention:  # a grid, not pooled vectors (seed caches keep their old description)
    meta['annotation_grid'] = model.attention_grid
  if not reextract and os.path.exists(path) and os.path.exists(path + '.json'):
    if fileio.read_json(path + '.json') == meta:
      return np.load(path)
    progress.say(f'{path} was made from other data or trunk weights: extracting again.')
  progress.say(f'Extracting trunk features for {len(source)} {split} images ...')
  features = extract_features(model, variables, source, mesh, image_size=image_size,
                              batch_size=batch_size)
  if jax.process_index() == 0:
    os.makedirs(folder, exist_ok=True)
    fileio.write_npy(path, features)
    fileio.write_json(path + '.json', meta)  # written last: it vouches for the .npy
  return features


class FeatureSource:
  """Random-access records {'features': (C,), 'captions': [...]} built from a split's captions and
  its cached features; the grain pipeline reads it like an image source."""

  def __init__(self, features: np.ndarray, source):
    if len(features) != len(source):
      raise ValueError(f'{len(features)} cached feature rows for {len(source)} images')
    self._features = features
    self._captions = [records_lib.record_captions(source[i]) for i in range(len(source))]

  def __len__(self):
    return len(self._captions)

  def __getitem__(self, index):
    return {'features': self._features[index], 'captions': self._captions[index]}
