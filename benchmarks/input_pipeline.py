r"""Training input pipeline throughput: capjax's grain pipeline vs a torchvision DataLoader.

Both read the same JPEG bytes (held in memory, so disk speed is out of the picture), decode them with
PIL and apply the seed's augmentations: rotation up to 5 degrees, random resized crop (scale 0.8-1,
ratio 3/4-4/3) to the model size, horizontal flip, brightness and contrast 0.2, then stack uint8
batches. capjax also tokenizes the caption (microseconds). Two measurements:

  transform, 1 thread   capjax's `TrainExample` vs the torchvision transforms, one image at a time in
                        this thread: the cost per core of decode + augment, free of pipeline effects.
  pipeline              the full iterators with 0, 1, 2 worker processes: images/s from creating the
                        iterator to the last of --batches batches (start-up included) and the first
                        batch's latency. grain's in-process iterator already runs 16 threads (its
                        default ReadOptions; PIL releases the GIL), so 0 workers is not 1 core.

  python -m benchmarks.input_pipeline                     # 500x375 generated JPEGs, ~1 min on 2 cores
  python -m benchmarks.input_pipeline --image_dir='~/flickr8k/Images/*.jpg' --workers=0,4,8,16
"""

import io
import os
import sys
import time

if __package__ in (None, ''):  # run as `python benchmarks/input_pipeline.py`
  sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from benchmarks import harness
from capjax import input_pipeline
from capjax import vocab as vocab_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  # Only when this file runs as the program: absl flags are process-global and the benchmarks import
  # one another (benchmarks/harness.py, "Flags").
  flags.DEFINE_list('workers', ['0', '1', '2'], 'Worker process counts to measure.')
  flags.DEFINE_integer('image_size', 224, 'Output image side in pixels.')
  flags.DEFINE_integer('batch_size', 32, 'Images per batch.')
  flags.DEFINE_integer('batches', 16, 'Batches drawn from each pipeline.')
  flags.DEFINE_integer('transform_images', 64, 'Images for the 1-thread transform '
                       'timing.')
  flags.DEFINE_integer('num_images', 256, 'Distinct JPEGs (generated or read).')
  flags.DEFINE_string('image_dir', None, 'A glob of real JPEGs to read instead of '
                      'generating 500x375 ones, e.g. Flickr8k Images/*.jpg.')
  flags.DEFINE_integer('torch_threads', 0, 'torch intra-op threads in this process '
                       '(DataLoader workers always use 1); 0: its default.')
  flags.DEFINE_string('output', None, 'JSON path; default benchmarks/results/input_pipeline.json.')


class TorchAugmentedImages:
  """A map-style torch dataset: record -> uint8 (3, S, S) tensor with torchvision's augmentations."""

  def __init__(self, records, image_size: int):
    from torchvision import transforms  # pylint: disable=g-import-not-at-top
    bilinear = transforms.InterpolationMode.BILINEAR
    self._images = [r['image'] for r in records]
    self._transform = transforms.Compose([
        transforms.RandomRotation(5, interpolation=bilinear),
        transforms.RandomResizedCrop(image_size, scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3),
                                     interpolation=bilinear),
        transforms.RandomHorizontalFlip(),
        transforms.ColorJitter(brightness=0.2, contrast=0.2),
        transforms.PILToTensor(),
    ])

  def __len__(self):
    return len(self._images)

  def __getitem__(self, index):
    return self.decode(self._images[index])

  def decode(self, encoded: bytes):
    return self._transform(Image.open(io.BytesIO(encoded)).convert('RGB'))


def grain_batches(records, workers: int):
  vocab = harness.vocabulary_of(records)
  pipeline = input_pipeline.PipelineConfig(image_size=FLAGS.image_size, max_caption_len=24,
                                           captions_per_image=1, num_workers=workers)
  iterator = input_pipeline.make_train_iterator(records, vocab, pipeline, host_batch_size=FLAGS.batch_size)
  try:
    while True:
      yield next(iterator)['image']
  finally:
    iterator.close()


def torch_batches(records, workers: int):
  import torch  # pylint: disable=g-import-not-at-top
  loader = torch.utils.data.DataLoader(
      TorchAugmentedImages(records, FLAGS.image_size), batch_size=FLAGS.batch_size, shuffle=True,
      num_workers=workers, drop_last=True, persistent_workers=workers > 0)
  while True:  # endless, like grain's repeat()
    yield from loader


def measure_pipeline(name: str, batches, workers: int) -> dict:
  """Images/s from creating the pipeline to its last batch (start-up included) and the first batch's
  latency. No 'steady state after the first batch' figure: grain's default ReadOptions run 16
  threads per process, each making a whole batch, so the first batch comes with up to 15 more
  nearly done and a short window after it overstates the rate many times over."""
  harness.wait_until_quiet()  # the previous pipeline's threads may still be finishing batches
  monitor = harness.LoadMonitor()
  start = time.perf_counter()
  batch = next(batches)
  first = time.perf_counter()
  for _ in range(FLAGS.batches - 1):
    batch = next(batches)
  end = time.perf_counter()
  batches.close()
  assert tuple(batch.shape)[0] == FLAGS.batch_size and str(batch.dtype).endswith('uint8'), batch.dtype
  images = FLAGS.batches * FLAGS.batch_size
  return {'stage': 'pipeline', 'impl': name, 'workers': workers, 'first_batch_s': first - start,
          'images_per_s': images / (end - start), 'others_cores': monitor.report()['others_cores']}


def measure_transform(name: str, transform, records) -> dict:
  """Decode + augment one image at a time in this thread: the per-core cost, no pipeline."""
  harness.wait_until_quiet()
  monitor = harness.LoadMonitor()
  transform(records[0])  # first-call costs (lazy imports, caches) are not timed
  start = time.perf_counter()
  for record in records:
    transform(record)
  seconds = time.perf_counter() - start
  return {'stage': 'transform, 1 thread', 'impl': name, 'workers': None,
          'images_per_s': len(records) / seconds, 'others_cores': monitor.report()['others_cores']}


def transform_rows(records) -> list[dict]:
  vocab = vocab_lib.build_vocabulary(['a photo'], min_count=1)
  pipeline = input_pipeline.PipelineConfig(image_size=FLAGS.image_size, max_caption_len=24,
                                           captions_per_image=1)
  example = input_pipeline.TrainExample(vocab, pipeline)
  rng = np.random.default_rng(0)
  torch_dataset = TorchAugmentedImages(records, FLAGS.image_size)
  records = records[:FLAGS.transform_images]
  capjax_row = measure_transform('capjax TrainExample', lambda r: example.random_map((0, r, 0), rng),
                                 records)
  torch_row = measure_transform('torchvision transforms', lambda r: torch_dataset.decode(r['image']),
                                records)
  capjax_row['capjax/torch'] = capjax_row['images_per_s'] / torch_row['images_per_s']
  return [capjax_row, torch_row]


def main(argv):
  harness.start(argv)
  if FLAGS.image_dir:
    records = harness.records_from_dir(FLAGS.image_dir, FLAGS.num_images)
  else:
    records = harness.flickr_like_records(FLAGS.num_images)
  width, height = Image.open(io.BytesIO(records[0]['image'])).size
  mean_kb = sum(len(r['image']) for r in records) / len(records) / 1024
  print(f'{len(records)} JPEGs, first {width}x{height}, mean {mean_kb:.0f} KiB')
  # Imported here, not at module scope: grain's spawned workers re-import this module and would
  # each load torch. Imported before timing so that no first batch pays for it.
  import torchvision  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  torch_threads = harness.set_torch_threads(FLAGS.torch_threads)
  before = harness.idle_check()
  print(f'before the run: {harness.describe_load(before)}')
  monitor = harness.LoadMonitor()
  rows = transform_rows(records)
  for workers in (int(w) for w in FLAGS.workers):
    grain_row = measure_pipeline('capjax grain', grain_batches(records, workers), workers)
    torch_row = measure_pipeline('torch DataLoader', torch_batches(records, workers), workers)
    grain_row['capjax/torch'] = grain_row['images_per_s'] / torch_row['images_per_s']
    rows += [grain_row, torch_row]
    print(f"  {workers} workers: grain {grain_row['images_per_s']:.0f} img/s, "
          f"torch {torch_row['images_per_s']:.0f} img/s", flush=True)
  load = monitor.report()
  print()
  harness.print_table(rows, ['stage', 'impl', 'workers', 'first_batch_s', 'images_per_s',
                            'capjax/torch', 'others_cores'])
  print(f'\n{harness.machine_info()}, torch threads {torch_threads}\n{harness.describe_load(load)}')
  harness.write_json(FLAGS.output or harness.default_output(__file__), {
      'benchmark': 'input_pipeline', 'argv': sys.argv, 'machine': harness.machine_info(),
      'torch_threads': torch_threads,
      'load_before': before, 'load_during': load, 'image_size': FLAGS.image_size,
      'batch_size': FLAGS.batch_size, 'source': FLAGS.image_dir or f'generated {width}x{height} JPEGs',
      'mean_jpeg_kib': mean_kb, 'rows': rows})


if __name__ == '__main__':
  define_flags()
  app.run(main)
