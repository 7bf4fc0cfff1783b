"""Dynamic batching: images from concurrent requests captioned together, one jitted call per batch.

Each image joins one asyncio queue; a single worker takes the oldest image, waits up to `max_wait_ms`
for others with the same decoding setting (up to the captioners' batch size), and captions them in one
call, in a thread of its own so the event loop keeps accepting and decoding requests meanwhile. Every
call has the same batch shape (the captioner pads the batch), and each decoding setting is compiled
once in `start()`, so no request ever waits for a compilation. `stop()` captions what is queued, then
stops. Nothing here knows about HTTP: `capjax.serve.app` feeds it decoded pixels.
"""

import asyncio
import collections
from collections.abc import Mapping
import concurrent.futures
import dataclasses
import time

from absl import logging
import numpy as np

from capjax import inference
from capjax import progress


@dataclasses.dataclass
class _Pending:
  """An image waiting for its batch."""
  pixels: np.ndarray
  beam_size: int
  future: asyncio.Future
  arrived: float  # event-loop time


_STOP = object()  # queued last at shutdown: everything before it is still captioned


class DynamicBatcher:
  """Captions images from concurrent requests together, one jitted call per batch.

  `captioners` maps each beam size offered to a captioner of that beam size; all share one batch size,
  which is both the most images a call takes and the one shape every call is padded to."""

  def __init__(self, captioners: Mapping[int, inference.ImageCaptioner], *, max_wait_ms: float):
    sizes = {c.batch_size for c in captioners.values()}
    if len(sizes) != 1:
      raise ValueError(f'the captioners must share one batch size, got {sorted(sizes)}')
    self.captioners = dict(captioners)
    self.max_batch_size = sizes.pop()
    self.max_wait_s = max_wait_ms / 1000
    self.with_attention = any(getattr(c, 'has_attention', False) for c in captioners.values())
    self.batch_sizes = collections.Counter()  # images per call -> calls
    self._queue = None
    self._worker = None
    self._model_thread = None
    self._accepting = False

  async def start(self) -> None:
    """Compiles every decoding setting (one warm-up call each), then starts the worker."""
    self._queue = asyncio.Queue()
    # One thread: calls never overlap, so a batch has the cores to itself and the order is kept.
    self._model_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='capjax-model')
    loop = asyncio.get_running_loop()
    blank = np.zeros((8, 8, 3), np.uint8)
    for beam_size in sorted(self.captioners):
      start = time.perf_counter()
      await loop.run_in_executor(self._model_thread, self._caption_batch, beam_size, [blank])
      progress.say(f'Compiled {setting_name(beam_size)} decoding for batches of {self.max_batch_size} '
                   f'({time.perf_counter() - start:.1f} s).')
    self._worker = asyncio.create_task(self._work())
    self._accepting = True

  async def stop(self) -> None:
    """Captions everything queued so far, then stops the worker and its thread."""
    self._accepting = False  # an image queued after the stop marker would never be captioned
    if self._worker is not None:
      await self._queue.put(_STOP)
      await self._worker
      self._worker = None
    if self._model_thread is not None:
      self._model_thread.shutdown(wait=True)
      self._model_thread = None

  async def caption(self, images: list[np.ndarray], beam_size: int) -> list:
    """One output per image, {'caption'} (with 'words' and 'attention' for an attention model), or the
    exception its batch raised. A request's images are queued together, so they share batches."""
    if not self._accepting or self._worker.done():  # done: stopped, or failed (stop() raises it)
      raise RuntimeError('the batcher is not running (start() first, or it has stopped)')
    loop = asyncio.get_running_loop()
    now = loop.time()
    futures = [loop.create_future() for _ in images]
    for pixels, future in zip(images, futures):
      self._queue.put_nowait(_Pending(pixels, beam_size, future, now))  # the queue is unbounded
    return await asyncio.gather(*futures, return_exceptions=True)

  def stats(self) -> dict:
    calls = sum(self.batch_sizes.values())
    images = sum(size * count for size, count in self.batch_sizes.items())
    return {'max_batch_size': self.max_batch_size, 'max_wait_ms': self.max_wait_s * 1000,
            'calls': calls, 'images': images,
            'mean_batch_size': round(images / calls, 2) if calls else None,
            'batch_sizes': {str(size): count for size, count in sorted(self.batch_sizes.items())},
            'queued': self._queue.qsize() if self._queue is not None else 0}

  async def _work(self) -> None:
    waiting: list[_Pending] = []  # taken from the queue, not yet captioned, oldest first
    stopping = False
    while waiting or not stopping:
      if not waiting:
        item = await self._queue.get()
        if item is _STOP:
          stopping = True
          continue
        waiting.append(item)
      if not stopping:
        stopping = await self._gather(waiting)
      waiting = [p for p in waiting if not p.future.cancelled()]  # their clients went away
      if not waiting:
        continue
      beam_size = waiting[0].beam_size
      batch = [p for p in waiting if p.beam_size == beam_size][:self.max_batch_size]
      taken = {id(p) for p in batch}
      waiting = [p for p in waiting if id(p) not in taken]
      await self._run(batch, beam_size)

  async def _gather(self, waiting: list[_Pending]) -> bool:
    """Adds queued images to `waiting` until the oldest one's setting fills a batch or the oldest has
    waited max_wait (images that queued up during the previous call are taken at once). True when the
    stop marker was reached."""
    loop = asyncio.get_running_loop()
    deadline = waiting[0].arrived + self.max_wait_s
    beam_size = waiting[0].beam_size
    while sum(p.beam_size == beam_size for p in waiting) < self.max_batch_size:
      remaining = deadline - loop.time()
      try:
        if remaining <= 0:
          item = self._queue.get_nowait()
        else:
          item = await asyncio.wait_for(self._queue.get(), remaining)
      except (asyncio.QueueEmpty, TimeoutError):
        return False
      if item is _STOP:
        return True
      waiting.append(item)
    return False

  async def _run(self, batch: list[_Pending], beam_size: int) -> None:
    loop = asyncio.get_running_loop()
    try:
      outputs = await loop.run_in_executor(self._model_thread, self._caption_batch, beam_size,
                                           [p.pixels for p in batch])
    except Exception as e:  # pylint: disable=broad-except  (the requests get a 500; serving goes on)
      logging.exception('captioning a batch of %d images failed', len(batch))
      for pending in batch:
        if not pending.future.done():
          pending.future.set_exception(e)
      return
    self.batch_sizes[len(batch)] += 1
    for pending, output in zip(batch, outputs):
      if not pending.future.done():  # a client that went away cancelled its future
        pending.future.set_result(output)

  def _caption_batch(self, beam_size: int, images: list[np.ndarray]) -> list:
    """In the model thread: one padded batch through the jitted function; an attention model's
    captions come with their maps (`inference.AttendedCaption`), others are strings."""
    captioner = self.captioners[beam_size]
    if self.with_attention:
      return captioner.caption_with_attention(images)
    return captioner.caption(images)


def setting_name(beam_size: int) -> str:
  """How messages name a decoding setting: 'greedy' or 'beam-N'."""
  return 'greedy' if beam_size == 1 else f'beam-{beam_size}'

