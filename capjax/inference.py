"""Jitted, batched captioning: restore a trained captioner from a workdir and caption images.

Notebook use:
    from capjax import inference
    captioner = inference.ImageCaptioner.from_workdir('workdirs/demo', beam_size=3)
    captioner.caption(['photo.jpg', pil_image, uint8_array])  # -> list[str]
"""

from collections.abc import Sequence
import dataclasses
import functools
import io
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
from PIL import Image

from capjax import checkpointing
from capjax import decoding
from capjax import input_pipeline
from capjax import mesh as mesh_lib
from capjax import vocab as vocab_lib
from capjax import workdir as workdir_lib
from capjax.models import captioner


def decode_images(model, variables, images, *, max_len: int, beam_size: int = 1,
                  length_penalty: float = 0.0, temperature: float = 0.0, top_k: int = 0, seed: int = 0):
  """uint8 images (N, S, S, 3) -> token ids (N, max_len): `<END>` kept, `<PAD>` after it.
  Beam size 1 is greedy decoding; larger beams return the best hypothesis. temperature > 0 samples
  instead (optionally from the top_k words), for diverse captions."""
  image_vec = model.apply(variables, images, method=model.encode)
  carry = model.apply(variables, image_vec, method=model.start)
  step_fn = lambda c, t: model.apply(variables, c, t, method=model.step)  # noqa: E731
  kwargs = dict(batch_size=images.shape[0], start_id=vocab_lib.START_ID, end_id=vocab_lib.END_ID,
                pad_id=vocab_lib.PAD_ID, max_len=max_len)
  if temperature > 0:
    return decoding.sample_decode(step_fn, carry, jax.random.PRNGKey(seed), temperature=temperature,
                                  top_k=top_k, **kwargs)
  if beam_size == 1:
    return decoding.greedy_decode(step_fn, carry, **kwargs)
  result = decoding.beam_search(step_fn, carry, beam_size=beam_size, length_penalty=length_penalty,
                                **kwargs)
  return result.tokens[:, 0]


def make_caption_fn(model, mesh, *, max_len: int, beam_size: int = 1, length_penalty: float = 0.0,
                    temperature: float = 0.0, top_k: int = 0):
  """(variables, images) -> tokens, compiled once; the batch is sharded over the mesh."""
  fn = functools.partial(decode_images, model, max_len=max_len, beam_size=beam_size,
                         length_penalty=length_penalty, temperature=temperature, top_k=top_k)
  return jax.jit(fn, in_shardings=(mesh_lib.replicated(mesh), mesh_lib.batch_sharded(mesh)),
                 out_shardings=mesh_lib.replicated(mesh))


def caption_source(caption_fn, variables, source, vocab, mesh, *, image_size: int, batch_size: int,
                   max_images: int | None = None) -> list[dict]:
  """Captions images of a split. Returns, on every process, one dict per image in source order:
  {'index', 'image_id', 'caption', 'references'}."""
  host_batch = mesh_lib.check_batch_size(batch_size, mesh, 'eval_batch_size')
  limited = source if not max_images else _Prefix(source, max_images)
  results = []
  for batch in input_pipeline.caption_batches(limited, image_size=image_size, host_batch_size=host_batch,
                                              process_index=jax.process_index(),
                                              process_count=jax.process_count()):
    images = mesh_lib.host_batch_to_global({'image': batch['image']}, mesh)['image']
    tokens = caption_fn(variables, images)
    indices = multihost_utils.process_allgather(batch['index'], tiled=True)
    for index, row in zip(indices, np.asarray(jax.device_get(tokens))):
      if index >= 0:
        results.append((int(index), vocab.decode(row)))
  results.sort()
  return [{'index': i, 'image_id': input_pipeline.as_text(limited[i]['image_id']), 'caption': c,
           'references': input_pipeline.record_captions(limited[i])} for i, c in results]


class _Prefix:
  """The first n records of a source (random access, like the source itself)."""

  def __init__(self, source, n: int):
    self._source, self._n = source, min(n, len(source))

  def __len__(self):
    return self._n

  def __getitem__(self, i):
    if not 0 <= i < self._n:
      raise IndexError(i)
    return self._source[i]


# ----------------------------------------------------------------------------------------------
# Restoring a trained captioner
# ----------------------------------------------------------------------------------------------


def restore_variables(workdir: str, checkpoint: str | int | None, mesh, *, config=None):
  """Restores the train state saved in `workdir` onto the devices of `mesh` (any device count).
  Returns (config, vocab, model, variables, step)."""
  from capjax import train  # pylint: disable=g-import-not-at-top
  config = config or workdir_lib.load_config(workdir)
  vocab = workdir_lib.load_vocab(workdir)
  model = captioner.build_captioner(config.model, len(vocab))
  checkpointer = checkpointing.Checkpointer(
      workdir_lib.checkpoint_dir(workdir), best_metric=config.train.best_metric,
      best_mode=config.train.best_mode, read_only=True)
  step = checkpointer.resolve_step(checkpoint)
  target = train.abstract_train_state(config, model, mesh)
  try:
    state = checkpointer.restore(step, target)
  except ValueError as e:
    raise ValueError(f'checkpoint {step} in {workdir} does not match its config.json/vocab.json '
                     f'(vocabulary of {len(vocab)} tokens): {e}') from e
  checkpointer.close()
  return config, vocab, model, state.variables, step


def load_image(image: Any) -> Image.Image:
  """A path, bytes, PIL image or uint8 array -> RGB PIL image (grayscale/CMYK/alpha converted)."""
  if isinstance(image, Image.Image):
    return image.convert('RGB')
  if isinstance(image, np.ndarray):
    return Image.fromarray(image.astype(np.uint8)).convert('RGB')
  if isinstance(image, bytes):
    image = io.BytesIO(image)
  with Image.open(image) as opened:
    if opened.mode in ('RGBA', 'LA', 'P'):
      opened = opened.convert('RGBA')
      background = Image.new('RGBA', opened.size, (255, 255, 255, 255))
      return Image.alpha_composite(background, opened).convert('RGB')
    return opened.convert('RGB')


@dataclasses.dataclass
class ImageCaptioner:
  """A trained captioner loaded once; `caption(images)` runs jitted batched decoding."""
  model: Any
  variables: Any
  vocab: vocab_lib.Vocabulary
  image_size: int
  max_len: int
  mesh: Any
  beam_size: int = 1
  length_penalty: float = 0.0
  batch_size: int = 32
  step: int = -1
  temperature: float = 0.0
  top_k: int = 0

  @classmethod
  def from_workdir(cls, workdir: str, *, checkpoint: str | int = 'best', beam_size: int = 1,
                   length_penalty: float = 0.0, batch_size: int = 32, temperature: float = 0.0,
                   top_k: int = 0) -> 'ImageCaptioner':
    mesh = mesh_lib.make_mesh()
    config, vocab, model, variables, step = restore_variables(workdir, checkpoint, mesh)
    return cls(model, variables, vocab, config.data.image_size, config.data.max_caption_len - 1, mesh,
               beam_size, length_penalty, batch_size, step, temperature, top_k)

  @functools.cached_property
  def _caption_fn(self):
    return make_caption_fn(self.model, self.mesh, max_len=self.max_len, beam_size=self.beam_size,
                           length_penalty=self.length_penalty, temperature=self.temperature,
                           top_k=self.top_k)

  def _batch_size(self) -> int:
    devices = self.mesh.devices.size
    return max(devices, self.batch_size // devices * devices)

  def caption(self, images: Sequence[Any]) -> list[str]:
    pixels = [input_pipeline.resize_image(load_image(im), self.image_size) for im in images]
    size = self._batch_size()
    captions = []
    for start in range(0, len(pixels), size):
      chunk = pixels[start:start + size]
      batch = np.stack(chunk + [chunk[-1]] * (size - len(chunk)))  # one static shape
      tokens = jax.device_get(self._caption_fn(self.variables, jnp.asarray(batch)))
      captions.extend(self.vocab.decode(row) for row in tokens[:len(chunk)])
    return captions
