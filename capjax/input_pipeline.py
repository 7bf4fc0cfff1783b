"""grain input pipelines: (image, caption) pairs for training, images with all references for evaluation.

Sources are injected: production passes `tfds.data_source(...)` splits (array_record, random access),
tests may pass a plain list of records. A record is `{'image': encoded bytes, 'image_id': str|bytes,
'captions': sequence of str|bytes}`.

Training chain (deterministic given seed; each epoch reshuffled by grain):
  range(num_images * captions_per_image)          # pair index -> (image, caption k)
  -> [process_index::process_count]                # per-host slice
  -> shuffle(seed) -> repeat() -> map(lookup) -> random_map(decode + augment + tokenize)
  -> batch(host_batch, drop_remainder) -> to_iter_dataset() [-> mp_prefetch(workers)]
Images leave the host as uint8; normalisation happens on the device.
"""

from collections.abc import Iterator, Sequence
import dataclasses
import math
from typing import Any

import grain
import numpy as np
from PIL import Image

from capjax import images
from capjax import vocab as vocab_lib
from capjax.data import records as records_lib

_SWAP_ON_FLIP = {'left': 'right', 'right': 'left'}


def read_options(threads: int, buffer: int) -> grain.ReadOptions:
  """grain's default (16 threads, 500 elements ahead) decodes far ahead of a slow step and, with
  whole batches as elements, can hold many GB; a few threads and a short buffer keep up."""
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """The seed's per-epoch augmentations; each off when its strength is 0."""
  crop_scale: tuple[float, float] = (0.8, 1.0)  # area fraction of the random resized crop
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip_prob: float = 0.5
  brightness: float = 0.2  # factor drawn from [1 - b, 1 + b]
  contrast: float = 0.2
  rotation_degrees: float = 5.0

  @classmethod
  def from_config(cls, cfg) -> 'AugmentConfig':
    if not cfg.enabled:
      return cls(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0, brightness=0.0,
                 contrast=0.0, rotation_degrees=0.0)
    return cls(tuple(cfg.crop_scale), tuple(cfg.crop_ratio), cfg.flip_prob, cfg.brightness,
               cfg.contrast, cfg.rotation_degrees)


class DecodedImageCache:
  """Wraps a source; each image is decoded once, resized so its shorter side is `min_side`, and
  kept in memory as uint8, so epochs after the first skip JPEG decoding. For datasets that fit in
  RAM (Flickr8k at shorter side 256: about 8,000 x 256 x 341 x 3 = 2.1 GB). Each grain worker
  process holds its own cache."""

  def __init__(self, source, min_side: int = 256):
    self._source, self._min_side, self._cache = source, min_side, {}
    self._length = len(source)

  def __len__(self):
    return self._length

  def __getitem__(self, index):
    index = int(index)
    if not 0 <= index < self._length:
      raise IndexError(f'record {index} of {self._length}')
    if index not in self._cache:
      record = self._source[index]
      image = images.load_image(records_lib.as_bytes(record['image']), self._min_side)
      scale = self._min_side / min(image.size)
      if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.BILINEAR)
      self._cache[index] = {'pixels': np.asarray(image, np.uint8), 'image_id': record['image_id'],
                            'captions': records_lib.record_captions(record)}
    return self._cache[index]


def swap_left_right(caption: str) -> str:
  """Mirror the words of a caption whose image was flipped horizontally."""
  words = caption.split(' ')
  return ' '.join(_SWAP_ON_FLIP.get(w.lower(), w) for w in words)


def _random_crop_box(rng: np.random.Generator, width: int, height: int,
                     scale: tuple[float, float], ratio: tuple[float, float]):
  """Inception-style random resized crop box (left, top, right, bottom)."""
  area = width * height
  for _ in range(10):
    target_area = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      left = int(rng.integers(0, width - w + 1))
      top = int(rng.integers(0, height - h + 1))
      return (left, top, left + w, top + h)
  return (0, 0, width, height)


def augment_image(image: Image.Image, rng: np.random.Generator, size: int,
                  cfg: AugmentConfig) -> tuple[np.ndarray, bool]:
  """Random rotation, resized crop, flip, brightness/contrast -> uint8 (size, size, 3), flipped?"""
  if cfg.rotation_degrees:
    image = image.rotate(rng.uniform(-cfg.rotation_degrees, cfg.rotation_degrees),
                         resample=Image.BILINEAR)
  box = _random_crop_box(rng, image.width, image.height, cfg.crop_scale, cfg.crop_ratio)
  image = image.resize((size, size), Image.BILINEAR, box=box)
  flipped = bool(rng.random() < cfg.flip_prob)
  if flipped:
    image = image.transpose(Image.FLIP_LEFT_RIGHT)
  pixels = np.asarray(image, np.float32)
  if cfg.brightness:
    pixels = pixels * rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
  if cfg.contrast:
    mean = pixels.mean()
    pixels = (pixels - mean) * rng.uniform(1 - cfg.contrast, 1 + cfg.contrast) + mean
  return np.clip(pixels + 0.5, 0, 255).astype(np.uint8), flipped


class LookupExample(grain.transforms.Map):
  """Example index -> (image index, record, caption group g). An epoch visits every image `groups` times;
  group g of an image with n captions holds its captions g*K .. g*K + K - 1 (mod n), K = seq_per_img.
  With `random_caption`, one example per image whose K captions are drawn at random (g = -1)."""

  def __init__(self, source, groups: int, random_caption: bool = False):
    self._source, self._groups, self._random = source, groups, random_caption

  def map(self, index):
    image_index, group = divmod(int(index), self._groups)
    return image_index, self._source[image_index], (-1 if self._random else group)


def _pick_captions(record: dict, group: int, per_image: int, rng: np.random.Generator | None) -> list[str]:
  """The captions of one example: group g's (see LookupExample), or for g < 0 drawn with `rng`
  (without replacement when the image has enough)."""
  captions = records_lib.record_captions(record)
  n = len(captions)
  if group >= 0:
    return [captions[(group * per_image + j) % n] for j in range(per_image)]
  if per_image == 1:
    return [captions[int(rng.integers(n))]]
  return [captions[int(i)] for i in rng.choice(n, size=per_image, replace=n < per_image)]


class _ExampleMaker:
  """What every training example type shares: caption choice and tokenisation. `tokens` is (L,) for one
  caption per example (K = 1, the classic pair) and (K, L) for the K captions of a shared encoder pass."""

  def __init__(self, vocab: vocab_lib.Vocabulary, cfg: 'PipelineConfig'):
    self._vocab, self._cfg = vocab, cfg

  def _captions(self, record, group, rng) -> list[str]:
    return _pick_captions(record, group, self._cfg.seq_per_img, rng)

  def _tokens(self, captions: list[str]) -> np.ndarray:
    rows = [self._vocab.encode(c, self._cfg.max_caption_len) for c in captions]
    return rows[0] if self._cfg.seq_per_img == 1 else np.stack(rows)

  def _indexed(self, example: dict, image_index) -> dict:
    """With `image_index` (SCST looks up the image's references), the example says which image it is."""
    if self._cfg.image_index:
      example['image_index'] = np.int32(image_index)
    return example


class TrainExample(_ExampleMaker, grain.transforms.RandomMap):
  """(image index, record, group) -> {'image': uint8, 'tokens'}. On the host (default): augmented with
  PIL to (S, S, 3), S = image_size, 'left'/'right' swapped in the captions of a flipped image. With
  `augment_on_device`: the image at the fixed store size, not augmented (the train step does it)."""

  def random_map(self, element, rng: np.random.Generator):
    image_index, record, group = element
    cfg = self._cfg
    captions = self._captions(record, group, rng)
    if cfg.augment_on_device:
      return self._indexed({'image': _fixed_size(record, cfg.stored_size), 'tokens': self._tokens(captions)},
                           image_index)
    pixels, flipped = augment_image(records_lib.record_image(record, cfg.image_size), rng, cfg.image_size,
                                    cfg.augment)
    if flipped:
      captions = [swap_left_right(c) for c in captions]
    return self._indexed({'image': pixels, 'tokens': self._tokens(captions)}, image_index)


class IndexTrainExample(_ExampleMaker, grain.transforms.RandomMap):
  """Device-resident images: (image index, record, group) -> {'index', 'tokens'}; the step looks the
  image up in the table on the devices (the source only needs captions)."""

  def random_map(self, element, rng: np.random.Generator):
    image_index, record, group = element
    return self._indexed({'index': np.int32(image_index),
                          'tokens': self._tokens(self._captions(record, group, rng))}, image_index)


class FeatureTrainExample(_ExampleMaker, grain.transforms.RandomMap):
  """(record with cached 'features', group) -> {'features', 'tokens'}: no image, so no augmentation."""

  def random_map(self, element, rng: np.random.Generator):
    image_index, record, group = element
    return self._indexed({'features': record['features'],
                          'tokens': self._tokens(self._captions(record, group, rng))}, image_index)


def _fixed_size(record: dict, size: int) -> np.ndarray:
  """The record's image as uint8 (size, size, 3), as stored for device augmentation."""
  pixels = record.get('pixels')
  if pixels is not None and pixels.shape == (size, size, 3):
    return pixels
  return images.resize_image(records_lib.record_image(record, size), size)


def image_table(source, size: int) -> np.ndarray:
  """Every image of `source` as one uint8 array (N, size, size, 3): device-resident training data."""
  table = np.empty((len(source), size, size, 3), np.uint8)
  for i in range(len(source)):
    table[i] = _fixed_size(source[i], size)
  return table


class CaptionsOnly:
  """A source's captions without its images (what device-resident training reads each step), from a
  prepared split's captions file (`records.split_captions`): building it reads no image."""

  def __init__(self, source):
    self._captions = records_lib.split_captions(source)

  def __len__(self):
    return len(self._captions)

  def __getitem__(self, index):
    return {'captions': self._captions[index]}


class EvalExample(grain.transforms.Map):
  """(image index, record, caption k) -> resized image, tokens of caption k; no augmentation."""

  def __init__(self, vocab: vocab_lib.Vocabulary, image_size: int, max_caption_len: int):
    self._vocab, self._size, self._max_len = vocab, image_size, max_caption_len

  def map(self, element):
    _, record, caption_index = element
    tokens = self._vocab.encode(_pick_captions(record, caption_index, 1, None)[0], self._max_len)
    return {'image': images.resize_image(records_lib.record_image(record, self._size), self._size),
            'tokens': tokens}


class FeatureEvalExample(EvalExample):
  """(image index, record with cached 'features', caption k) -> {'features', 'tokens'}."""

  def map(self, element):
    _, record, caption_index = element
    tokens = self._vocab.encode(_pick_captions(record, caption_index, 1, None)[0], self._max_len)
    return {'features': record['features'], 'tokens': tokens}


class ImageForCaptioning(grain.transforms.Map):
  """(index, record) -> resized image with its index, id and every reference (metrics, caption output)."""

  def __init__(self, image_size: int):
    self._size = image_size

  def map(self, element):
    index, record = element
    image = records_lib.record_image(record, self._size)
    return {'image': images.resize_image(image, self._size), 'index': np.int32(index),
            'image_id': records_lib.as_text(record['image_id']),
            'references': records_lib.record_captions(record)}


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """What the training and loss pipelines need from `config.data` (and the run's seed).

  seq_per_img: captions per example. 1: an example is one (image, caption) pair, `captions_per_image`
  examples per image and epoch. K > 1: an example is an image with K of its captions (the encoder runs
  once for all K), ceil(captions_per_image / K) examples per image and epoch.
  augment_on_device: the host ships images at `store_size` (0: image_size) unaugmented; the train step
  augments them (capjax/device_augment.py). device_resident: the host ships image indices only.
  from_features: the source holds cached pooled trunk features instead of images (the 'cached' encoder
  mode); examples then carry 'features' and no augmentation is possible. image_index: training examples
  also carry 'image_index', the image's position in the source (SCST's reward looks up its references)."""
  image_size: int
  max_caption_len: int
  captions_per_image: int
  random_caption: bool = False
  augment: AugmentConfig = AugmentConfig()
  seed: int = 0
  num_workers: int = 0  # grain worker processes (an iterator state restores only with the same count)
  read_threads: int = 4
  prefetch_batches: int = 4
  seq_per_img: int = 1
  augment_on_device: bool = False
  store_size: int = 0
  device_resident: bool = False
  from_features: bool = False
  image_index: bool = False

  @property
  def stored_size(self) -> int:
    return self.store_size or self.image_size

  @property
  def groups_per_image(self) -> int:
    return 1 if self.random_caption else -(-self.captions_per_image // self.seq_per_img)

  @classmethod
  def from_config(cls, config, *, from_features: bool = False,
                  device_resident: bool = False) -> 'PipelineConfig':
    data = config.data
    return cls(image_size=data.image_size, max_caption_len=data.max_caption_len,
               captions_per_image=data.captions_per_image, random_caption=data.random_caption,
               augment=AugmentConfig.from_config(data.augment), seed=config.seed,
               num_workers=data.num_workers, read_threads=data.read_threads,
               prefetch_batches=data.prefetch_batches, seq_per_img=data.seq_per_img,
               augment_on_device=data.augment.on_device and not from_features,
               store_size=data.store_size, device_resident=device_resident, from_features=from_features)


def make_train_iterator(source, vocab, cfg: PipelineConfig, *, host_batch_size: int,
                        process_index: int = 0, process_count: int = 1):
  """An endless, checkpointable iterator of host batches; see the module docstring for the chain."""
  examples = grain.MapDataset.range(num_train_examples(len(source), cfg))
  ds = examples[process_index::process_count].shuffle(seed=cfg.seed).repeat()
  ds = ds.map(LookupExample(source, cfg.groups_per_image, cfg.random_caption))
  example = (FeatureTrainExample if cfg.from_features else
             IndexTrainExample if cfg.device_resident else TrainExample)
  ds = ds.random_map(example(vocab, cfg), seed=cfg.seed)
  ds = ds.batch(host_batch_size, drop_remainder=True).to_iter_dataset(
      read_options(cfg.read_threads, cfg.prefetch_batches))
  if cfg.num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
  return iter(ds)


def num_train_examples(num_images: int, cfg: PipelineConfig) -> int:
  """Training examples per epoch (an example: an image with `seq_per_img` of its captions)."""
  return num_images * cfg.groups_per_image


def pad_batch(examples: Sequence[dict], batch_size: int) -> dict[str, np.ndarray]:
  """Stacks numeric fields, pads to `batch_size` by repeating the last example, and adds 'weight'
  (1 real, 0 padding) so every eval batch has one static shape."""
  n = len(examples)
  padded = list(examples) + [examples[-1]] * (batch_size - n)
  batch = {k: np.stack([e[k] for e in padded]) for k, v in examples[0].items()
           if isinstance(v, (np.ndarray, np.generic))}
  batch['weight'] = (np.arange(batch_size) < n).astype(np.float32)
  if 'index' in batch:
    batch['index'][n:] = -1
  return batch


def _chunks(iterable, size: int) -> Iterator[list]:
  chunk = []
  for item in iterable:
    chunk.append(item)
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


def _equal_count_chunks(ds, *, total: int, host_batch_size: int, process_count: int, filler):
  """Chunks of up to `host_batch_size` examples of this host's slice `ds` (a MapDataset), as
  (chunk, real). Every host yields ceil(ceil(total / process_count) / host_batch_size) chunks so the
  sharded steps line up; a host that runs out first repeats its last chunk (or `[filler()]`) with
  real=False, for the caller to give weight 0."""
  remaining = math.ceil(math.ceil(total / process_count) / host_batch_size)
  last = None
  for chunk in _chunks(ds.to_iter_dataset(read_options(4, 2 * host_batch_size)), host_batch_size):
    last = chunk
    remaining -= 1
    yield chunk, True
  for _ in range(remaining):
    yield (last or [filler()]), False


def eval_pair_batches(source, vocab, cfg: PipelineConfig, *, host_batch_size: int,
                      process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Every (image, caption k) pair of the split once, in order, padded batches with 'weight'.
  Every host yields the same number of batches (padding with weight 0) so collectives line up."""
  total = len(source) * cfg.captions_per_image
  to_example = (FeatureEvalExample if cfg.from_features else EvalExample)(
      vocab, cfg.image_size, cfg.max_caption_len)
  ds = grain.MapDataset.range(total)[process_index::process_count]
  ds = ds.map(LookupExample(source, cfg.captions_per_image)).map(to_example)
  for chunk, real in _equal_count_chunks(ds, total=total, host_batch_size=host_batch_size,
                                         process_count=process_count,
                                         filler=lambda: to_example.map((0, source[0], 0))):
    batch = pad_batch(chunk, host_batch_size)
    if not real:
      batch['weight'][:] = 0
    yield batch


def caption_batches(source, *, image_size: int, host_batch_size: int, process_index: int = 0,
                    process_count: int = 1) -> Iterator[dict[str, Any]]:
  """One example per image: {'image' (B,S,S,3) uint8, 'index' (-1 = padding), 'weight',
  'image_id': list, 'references': list}. Every host yields the same number of batches."""
  to_example = ImageForCaptioning(image_size)
  ds = grain.MapDataset.range(len(source))[process_index::process_count]
  ds = ds.map(lambda i: (int(i), source[int(i)])).map(to_example)
  for chunk, real in _equal_count_chunks(ds, total=len(source), host_batch_size=host_batch_size,
                                         process_count=process_count,
                                         filler=lambda: to_example.map((0, source[0]))):
    batch = pad_batch(chunk, host_batch_size)
    batch['image_id'] = [e['image_id'] for e in chunk] if real else []
    batch['references'] = [e['references'] for e in chunk] if real else []
    if not real:
      batch['weight'][:] = 0
      batch['index'][:] = -1
    yield batch
