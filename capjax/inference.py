"""Jitted, batched captioning: restore a trained captioner from a workdir (or an export directory, see
capjax/export.py) and caption images.

Notebook use:
    from capjax import inference
    captioner = inference.ImageCaptioner.from_workdir('workdirs/demo', beam_size=3)
    captioner = inference.ImageCaptioner.from_export('exports/demo')  # no orbax; the export's decoding
    captioner.caption(['photo.jpg', pil_image, uint8_array])  # -> list[str]
    captioner.caption_with_attention(images)  # attention model -> list[AttendedCaption]
"""

from collections.abc import Sequence
import dataclasses
import functools
from typing import Any

import jax
import numpy as np

from capjax import checkpointing
from capjax import decoding
from capjax import export as export_lib
from capjax import images as images_lib
from capjax import input_pipeline
from capjax import mesh as mesh_lib
from capjax import vocab as vocab_lib
from capjax import workdir as workdir_lib
from capjax.data import records as records_lib
from capjax.models import captioner


@dataclasses.dataclass(frozen=True)
class AttendedCaption:
  """A caption and where each of its words looked: `words` are the caption's words (`<END>` excluded),
  `attention` float32 (len(words), grid, grid) the weights over the image grid each word was produced
  with (each map sums to 1)."""
  caption: str
  words: list[str]
  attention: np.ndarray


@dataclasses.dataclass(frozen=True)
class CaptionedImage:
  """One image of a split with its generated caption: `index` is its position in the split (image ids
  need not be unique), `references` its reference captions; `attended` is set when the caption was
  decoded with attention maps."""
  index: int
  image_id: str
  references: list[str]
  caption: str
  attended: AttendedCaption | None = None


def generate_tokens(model, variables, images, *, max_len: int, beam_size: int = 1,
                    length_penalty: float = 0.0, temperature: float = 0.0, top_k: int = 0,
                    no_repeat_ngram: int = 0):
  """uint8 images (N, S, S, 3) -> token ids (N, max_len): `<END>` kept, `<PAD>` after it.
  Beam size 1 is greedy decoding; larger beams return the best hypothesis. temperature > 0 samples
  instead (optionally from the top_k words), for diverse captions. no_repeat_ngram=n > 0 never
  repeats an n-gram within a caption (3: trigram blocking)."""
  return generate_from_encoded(model, variables, model.apply(variables, images, method=model.encode),
                               max_len=max_len, beam_size=beam_size, length_penalty=length_penalty,
                               temperature=temperature, top_k=top_k, no_repeat_ngram=no_repeat_ngram)


def generate_from_encoded(model, variables, encoded, *, max_len: int, beam_size: int = 1,
                          length_penalty: float = 0.0, temperature: float = 0.0, top_k: int = 0,
                          no_repeat_ngram: int = 0):
  """`generate_tokens` after the encoder: from the encoded images (N, ...) the decoder starts from.
  Sampling (temperature > 0) uses a fixed key, so a caption call is repeatable."""
  # Per-image tensors (the attention decoder's projected grid) are computed once here and closed over:
  # every step and every beam reads them, none recomputes them.
  context = model.apply(variables, encoded, method=model.prepare)
  carry = model.apply(variables, encoded, method=model.start)
  step_fn = lambda c, t: model.apply(variables, c, t, context, method=model.step)  # noqa: E731
  kwargs = dict(batch_size=encoded.shape[0], start_id=vocab_lib.START_ID, end_id=vocab_lib.END_ID,
                pad_id=vocab_lib.PAD_ID, max_len=max_len, no_repeat_ngram=no_repeat_ngram)
  if temperature > 0:
    return decoding.sample_decode(step_fn, carry, jax.random.PRNGKey(0), temperature=temperature,
                                  top_k=top_k, **kwargs)
  if beam_size == 1:
    return decoding.greedy_decode(step_fn, carry, **kwargs)
  result = decoding.beam_search(step_fn, carry, beam_size=beam_size, length_penalty=length_penalty,
                                **kwargs)
  return result.tokens[:, 0]


def generate_with_attention(model, variables, images, **decode_options):
  """`generate_tokens` plus, for the attention decoder, the attention each generated word was produced
  with: (tokens (N, L), alphas (N, L, G) float32)."""
  encoded = model.apply(variables, images, method=model.encode)
  tokens = generate_from_encoded(model, variables, encoded, **decode_options)
  return tokens, model.apply(variables, encoded, tokens, method=model.attention_weights)


def make_caption_fn(model, mesh, *, max_len: int, beam_size: int = 1, length_penalty: float = 0.0,
                    temperature: float = 0.0, top_k: int = 0, no_repeat_ngram: int = 0,
                    return_attention: bool = False):
  """(variables, images) -> tokens (or (tokens, alphas) with `return_attention`, attention decoder
  only), compiled once; the batch is sharded over the mesh."""
  if return_attention and not model.has_attention:
    raise ValueError('return_attention: this model has no attention (config.model.decoder is seed)')
  fn = functools.partial(generate_with_attention if return_attention else generate_tokens, model,
                         max_len=max_len, beam_size=beam_size, length_penalty=length_penalty,
                         temperature=temperature, top_k=top_k, no_repeat_ngram=no_repeat_ngram)
  return jax.jit(fn, in_shardings=(mesh_lib.replicated(mesh), mesh_lib.batch_sharded(mesh)),
                 out_shardings=mesh_lib.replicated(mesh))


def caption_source(caption_fn, variables, source, vocab, mesh, *, image_size: int, batch_size: int,
                   max_images: int | None = None) -> list[CaptionedImage]:
  """Captions images of a split. Returns, on every process, one `CaptionedImage` per image in source
  order; with a `caption_fn` made with `return_attention`, each carries its `AttendedCaption`."""
  limited = source if not max_images else _Prefix(source, max_images)
  outputs = caption_tokens(caption_fn, variables, limited, mesh, image_size=image_size,
                           batch_size=batch_size)
  results = []
  for i in sorted(outputs):
    attended = attended_caption(vocab, *outputs[i]) if isinstance(outputs[i], tuple) else None
    results.append(CaptionedImage(
        index=i, image_id=records_lib.as_text(limited[i]['image_id']),
        references=records_lib.record_captions(limited[i]),
        caption=attended.caption if attended else vocab.decode(outputs[i]), attended=attended))
  return results


def caption_tokens(caption_fn, variables, source, mesh, *, image_size: int,
                   batch_size: int) -> dict[int, np.ndarray]:
  """{index: generated token row} for every image of `source`, on every process (each process
  decodes its share of the images; `batch_size` is global)."""
  batches = input_pipeline.caption_batches(
      source, image_size=image_size,
      host_batch_size=mesh_lib.per_host_batch_size(batch_size, mesh, 'eval_batch_size'),
      process_index=jax.process_index(), process_count=jax.process_count())
  return mesh_lib.apply_to_host_batches(caption_fn, variables, batches, mesh)


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


class _LoadedImages:
  """Images given to the Python API as a record source: each is loaded (by the one rule of
  capjax/images.py) only when its batch is built, so memory stays bounded by the batch size."""

  def __init__(self, images: Sequence[Any], image_size: int):
    self._images, self._size = images, image_size

  def __len__(self):
    return len(self._images)

  def __getitem__(self, i):
    image = images_lib.load_image(self._images[i], self._size)
    return {'pixels': np.asarray(image, np.uint8), 'image_id': str(i), 'captions': []}


# ----------------------------------------------------------------------------------------------
# Restoring a trained captioner
# ----------------------------------------------------------------------------------------------


def restore_variables(workdir: str, checkpoint: str | int | None, mesh):
  """Restores the model variables (params and batch_stats, not the optimizer state) saved in
  `workdir` onto the devices of `mesh` (any device count). Returns (config, vocab, model, variables,
  step). 'latest' and 'best' fall back to the newest checkpoint that restores, saying which failed; an
  explicit step that fails is an error in one line. A vocab.json that is not the one the checkpoint was
  trained with is refused."""
  config = workdir_lib.load_config(workdir)
  vocab = workdir_lib.load_vocab(workdir)
  model = captioner.build_captioner(config.model, len(vocab))
  checkpointer = checkpointing.Checkpointer(
      workdir_lib.checkpoint_dir(workdir), best_metric=config.train.best_metric,
      best_mode=config.train.best_mode, read_only=True)
  shapes = captioner.abstract_variables(model, config.data.image_size, config.data.max_caption_len)
  target = checkpointing.abstract_like(shapes, mesh_lib.replicated(mesh))
  identity = workdir_lib.run_identity(config, vocab)

  def restore(step):
    info = checkpointer.run_info(step)
    if info is not None:  # config.json may differ by allowed changes; the vocabulary may not
      workdir_lib.check_vocabulary(info['identity'], identity,
                                   where=f'checkpoint {step} in {checkpointer.directory}')
    return checkpointer.restore_variables(step, target)

  try:
    step, variables = checkpointer.restore_first_readable(checkpointer.candidates(checkpoint), restore)
  finally:
    checkpointer.close()
  return config, vocab, model, variables, step


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
  no_repeat_ngram: int = 0

  @classmethod
  def from_workdir(cls, workdir: str, *, checkpoint: str | int = 'best', beam_size: int = 1,
                   length_penalty: float = 0.0, batch_size: int = 32, temperature: float = 0.0,
                   top_k: int = 0, no_repeat_ngram: int = 0) -> 'ImageCaptioner':
    mesh = mesh_lib.make_mesh()
    config, vocab, model, variables, step = restore_variables(workdir, checkpoint, mesh)
    return cls(model, variables, vocab, config.data.image_size, config.data.max_caption_len - 1, mesh,
               beam_size, length_penalty, batch_size, step, temperature, top_k, no_repeat_ngram)

  @classmethod
  def from_export(cls, export_dir: str, *, beam_size: int | None = None,
                  length_penalty: float | None = None, no_repeat_ngram: int | None = None,
                  batch_size: int = 32, temperature: float = 0.0, top_k: int = 0) -> 'ImageCaptioner':
    """The Flax model rebuilt from an export directory's config.json and weights.safetensors (every file
    checked against the manifest's sha256). Decode settings left None are the export's."""
    mesh = mesh_lib.make_mesh()
    loaded = export_lib.read(export_dir)
    config, vocab = loaded.config, loaded.vocab
    model = captioner.build_captioner(config.model, len(vocab))
    export_lib.check_variables(loaded, captioner.abstract_variables(model, config.data.image_size,
                                                                    config.data.max_caption_len))
    variables = jax.device_put(loaded.variables, mesh_lib.replicated(mesh))
    exported = loaded.manifest.get('decoding', {})
    pick = lambda value, key, default: value if value is not None else exported.get(key, default)  # noqa: E731
    return cls(model, variables, vocab, config.data.image_size, config.data.max_caption_len - 1, mesh,
               pick(beam_size, 'beam_size', 1), pick(length_penalty, 'length_penalty', 0.0), batch_size,
               int(loaded.manifest.get('source', {}).get('step', -1)), temperature, top_k,
               pick(no_repeat_ngram, 'no_repeat_ngram', 0))

  @property
  def has_attention(self) -> bool:
    return self.model.has_attention

  @functools.cached_property
  def _caption_fn(self):
    return self._make_caption_fn(return_attention=False)

  @functools.cached_property
  def _caption_with_attention_fn(self):
    return self._make_caption_fn(return_attention=True)

  def _make_caption_fn(self, *, return_attention: bool):
    return make_caption_fn(self.model, self.mesh, max_len=self.max_len, beam_size=self.beam_size,
                           length_penalty=self.length_penalty, temperature=self.temperature,
                           top_k=self.top_k, no_repeat_ngram=self.no_repeat_ngram,
                           return_attention=return_attention)

  def caption(self, images: Sequence[Any]) -> list[str]:
    """Captions for paths, encoded bytes, PIL images or uint8 arrays, in order. With several
    processes, every process passes the same images; each captions its share of them."""
    outputs = self._generate(self._caption_fn, images)
    return [self.vocab.decode(outputs[i]) for i in range(len(images))]

  def caption_with_attention(self, images: Sequence[Any]) -> list[AttendedCaption]:
    """`caption`, each with the attention map of every word (attention decoder only)."""
    if not self.has_attention:
      raise ValueError('caption_with_attention: this model has no attention (config.model.decoder is seed)')
    outputs = self._generate(self._caption_with_attention_fn, images)
    return [attended_caption(self.vocab, *outputs[i]) for i in range(len(images))]

  def _generate(self, caption_fn, images: Sequence[Any]) -> dict[int, Any]:
    if not len(images):
      return {}
    return caption_tokens(caption_fn, self.variables, _LoadedImages(images, self.image_size), self.mesh,
                          image_size=self.image_size, batch_size=self._batch_size())

  def _batch_size(self) -> int:
    """`batch_size` rounded down to a multiple of the device count (at least one per device)."""
    devices = self.mesh.devices.size
    return max(devices, self.batch_size // devices * devices)


def attended_caption(vocab: vocab_lib.Vocabulary, tokens: np.ndarray, alphas: np.ndarray) -> AttendedCaption:
  """One generated row and its attention -> its `AttendedCaption`, the grid square (the trunk's map, or
  config.model.attention_grid)."""
  grid = int(round(alphas.shape[-1] ** 0.5))
  if grid * grid != alphas.shape[-1]:
    raise ValueError(f'attention over {alphas.shape[-1]} cells is not a square grid')
  # The words `vocab.decode` keeps, each with the attention of the step that produced it.
  kept = []
  for position, token in enumerate(np.asarray(tokens)):
    if int(token) == vocab_lib.END_ID:
      break
    if int(token) not in (vocab_lib.PAD_ID, vocab_lib.START_ID):
      kept.append(position)
  words = [vocab.decode([tokens[p]]) for p in kept]
  attention = np.asarray(alphas, np.float32)[kept].reshape(len(kept), grid, grid)
  return AttendedCaption(caption=' '.join(words), words=words, attention=attention)
