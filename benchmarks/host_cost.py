r"""Host CPU-milliseconds per training image for each way of feeding the train step, and the images/s a
16-core host could feed at that cost.

  python -m benchmarks.host_cost                      # 224 px, 5 captions per image, ~2 min on 2 cores
  python -m benchmarks.host_cost --image_size=64 --store_size=72 --cache_min_side=72 \
      --output=benchmarks/results/host_cost_64px.json

Each path is capjax's own training iterator (`input_pipeline.make_train_iterator`, 0 worker processes,
its read threads, batches of `--batch_size` examples; an example is one image with `seq_per_img` of its
captions) over a Flickr8k-sized training split (`--split_images`, 6,000) whose records repeat
`--num_images` generated 500x375 JPEGs with 5 captions each. The split's size matters: grain's shuffle
(`index_shuffle`) costs about 1 ms of CPU per example on a 32-example split, 54 us on 1,000, 8-15 us
from 8,000 up (measured here), so a small stand-in would be dominated by it.

  pil_jpeg        host augmentation with PIL (rotate, random resized crop, flip, brightness/contrast),
                  decoding the JPEG every time (data.cache_images_min_side=0: the default)
  pil_cached      the same from the decoded-image cache (shorter side --cache_min_side)
  device_augment  the cache + augmentation in the train step (data.augment.on_device): the host ships
                  each image at the fixed store size (resized from the cached copy) and its tokens
  device_augment_presized
                  the same with images already at the store size (square) in memory, as a cache or a
                  prepared split that stores them so would hold them: nothing left to resize per epoch
  device_resident the whole split on the devices (data.device_resident): the host ships image indices
                  and tokens only

Cost = the process's CPU time (`time.process_time`: every thread of this process, user + system) from a
quiet start (the iterator's read-ahead buffer full, its threads idle) through `--batches` batches to a
quiet end (the buffer refilled), divided by the images in those batches: exactly those batches were
produced in between. The caches are filled before the clock starts (that is the first epoch's cost,
reported apart as `fill_ms_per_image`). CPU time, not wall time, so a neighbour's load on a shared
machine barely moves it. What it leaves out: moving the batch
to the accelerator (a DMA on GPUs; on this CPU backend a memcpy) and what the train step does.
"""

import os
import sys
import time

if __package__ in (None, ''):  # run as `python benchmarks/host_cost.py`
  sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from absl import app
from absl import flags

from benchmarks import harness
from capjax import images
from capjax import input_pipeline

PATHS = ('pil_jpeg', 'pil_cached', 'device_augment', 'device_augment_presized', 'device_resident')
HOST_CORES = 16  # a typical single-GPU host's share of cores; the target assumes 16


class Repeated:
  """`length` records, record i being `source[i % len(source)]`: a full-sized split from a few images."""

  def __init__(self, source, length: int):
    self._source, self._length = source, length

  def __len__(self):
    return self._length

  def __getitem__(self, index):
    if not 0 <= index < self._length:
      raise IndexError(index)
    return self._source[int(index) % len(self._source)]


def source_for(path: str, records: list, args) -> tuple[object, float | None]:
  """The split as the path's training iterator reads it, and the CPU seconds per image of filling its
  decoded-image cache (None without one)."""
  if path == 'device_resident':
    return input_pipeline.CaptionsOnly(Repeated(records, args.split_images)), None
  if path == 'pil_jpeg':
    return Repeated(records, args.split_images), None
  start = time.process_time()
  if path == 'device_augment_presized':
    cache = [{'pixels': images.resize_image(images.load_image(r['image'], args.store_size), args.store_size),
              'image_id': r['image_id'], 'captions': r['captions']} for r in records]
  else:
    cache = input_pipeline.DecodedImageCache(records, args.cache_min_side)
    for i in range(len(cache)):
      cache[i]  # pylint: disable=pointless-statement  (what the first epoch does to the cache)
  return Repeated(cache, args.split_images), (time.process_time() - start) / len(cache)


def measure(path: str, records: list, vocab, args) -> dict:
  config = input_pipeline.PipelineConfig(
      image_size=args.image_size, max_caption_len=24, captions_per_image=5, seq_per_img=args.seq_per_img,
      augment_on_device=path.startswith('device_augment'), store_size=args.store_size,
      device_resident=path == 'device_resident')
  source, fill_s = source_for(path, records, args)
  iterator = input_pipeline.make_train_iterator(source, vocab, config, host_batch_size=args.batch_size)
  next(iterator)  # start-up: threads, first read-ahead
  harness.wait_until_quiet()
  batches = args.batches * (10 if path == 'device_resident' else 1)  # cheap: more batches, same precision
  cpu = time.process_time()
  for _ in range(batches):
    batch = next(iterator)
  harness.wait_until_quiet()  # the threads refill the read-ahead buffer: that work belongs to the count
  cpu = time.process_time() - cpu
  iterator.close()
  harness.wait_until_quiet()
  images = batches * args.batch_size
  ms = 1e3 * cpu / images
  return {'path': path, 'images': images, 'cpu_s': cpu, 'ms_per_image': ms,
          f'ceiling_{HOST_CORES}_cores': HOST_CORES * 1e3 / ms,
          'fill_ms_per_image': None if fill_s is None else 1e3 * fill_s,
          'batch_fields': {k: (v.shape, str(v.dtype)) for k, v in batch.items()}}


def define_flags() -> None:
  # Only when this file runs as the program: absl flags are process-global and the benchmarks import
  # one another (benchmarks/harness.py, "Flags").
  flags.DEFINE_string('paths', ','.join(PATHS), 'Feeding paths to measure, comma-separated.')
  flags.DEFINE_integer('image_size', 224, 'Image side the train step gets.')
  flags.DEFINE_integer('store_size', 256, 'data.store_size (device paths).')
  flags.DEFINE_integer('cache_min_side', 256, 'data.cache_images_min_side.')
  flags.DEFINE_integer('seq_per_img', 5, 'Captions per image in an example.')
  flags.DEFINE_integer('batch_size', 32, 'Examples per batch.')
  flags.DEFINE_integer('batches', 24, 'Batches timed per path.')
  flags.DEFINE_integer('num_images', 128, 'Distinct generated JPEGs.')
  flags.DEFINE_integer('split_images', 6000, 'Images in the training split.')
  flags.DEFINE_string('output', None, 'JSON path; default benchmarks/results/host_cost.json.')


def main(argv):
  harness.start(argv)
  args = harness.script_flags()
  records = harness.flickr_like_records(args.num_images)
  vocab = harness.vocabulary_of(records)
  before = harness.idle_check()
  print(f'before the run: {harness.describe_load(before)}')
  monitor = harness.LoadMonitor()
  rows = []
  for path in args.paths.split(','):
    rows.append(measure(path, records, vocab, args))
    print(f"  {path}: {rows[-1]['ms_per_image']:.3f} CPU ms per image", flush=True)
  load = monitor.report()
  print()
  harness.print_table(rows, ['path', 'images', 'ms_per_image', f'ceiling_{HOST_CORES}_cores',
                             'fill_ms_per_image'])
  print(f'\n{harness.machine_info()}\n{harness.describe_load(load)}')
  harness.write_json(args.output or harness.default_output(__file__), {
      'benchmark': 'host_cost', 'argv': sys.argv, 'machine': harness.machine_info(), 'load_before': before,
      'load_during': load, 'settings': vars(args), 'host_cores_assumed': HOST_CORES, 'rows': rows})


if __name__ == '__main__':
  define_flags()
  app.run(main)
