"""The dynamic batcher on its own: no HTTP, no model. Fake captioners record the batches they are given
(each image is a tiny array whose value is its id) and caption an image as '<setting>:<id>'."""

import asyncio
import threading

import numpy as np
import pytest

from capjax import inference
from capjax.serve import batcher as batcher_lib

TIMEOUT_S = 10  # a hang fails the test instead of stalling the run


class FakeCaptioner:
  """What `DynamicBatcher` uses of an `inference.ImageCaptioner`, with a record of every call.

  `calls` lists each call's image ids (start()'s warm-up image is id 0). With `fail` set, calls raise
  it; with a `gate`, each call waits in the model thread until the gate opens."""

  def __init__(self, beam_size: int, batch_size: int = 4, has_attention: bool = False):
    self.beam_size, self.batch_size, self.has_attention = beam_size, batch_size, has_attention
    self.calls: list[list[int]] = []
    self.fail: Exception | None = None
    self.gate: threading.Event | None = None
    self.entered = threading.Event()

  def _record(self, images) -> list[int]:
    assert len(images) <= self.batch_size, 'a batch larger than the captioner takes'
    ids = [int(image[0, 0, 0]) for image in images]
    self.calls.append(ids)
    self.entered.set()
    if self.gate is not None:
      assert self.gate.wait(TIMEOUT_S), 'the test never opened the gate'
    if self.fail is not None:
      raise self.fail
    return ids

  def caption(self, images) -> list[str]:
    assert not self.has_attention, 'an attention model is captioned with its maps'
    return [f'beam{self.beam_size}:{i}' for i in self._record(images)]

  def caption_with_attention(self, images) -> list[inference.AttendedCaption]:
    return [inference.AttendedCaption(f'beam{self.beam_size}:{i}', [str(i)], np.full((1, 2, 2), 0.25))
            for i in self._record(images)]


def image(image_id: int) -> np.ndarray:
  return np.full((4, 4, 3), image_id, np.uint8)


def run(test, captioners, max_wait_ms: float = 5000):
  """Runs `await test(batcher)` between the batcher's start() and stop(), in a fresh event loop."""

  async def main():
    batcher = batcher_lib.DynamicBatcher(captioners, max_wait_ms=max_wait_ms)
    await asyncio.wait_for(batcher.start(), TIMEOUT_S)
    try:
      return await asyncio.wait_for(test(batcher), TIMEOUT_S)
    finally:
      await asyncio.wait_for(batcher.stop(), TIMEOUT_S)
  return asyncio.run(main())


def test_start_compiles_each_setting_once():
  greedy, beam = FakeCaptioner(1), FakeCaptioner(3)

  async def test(batcher):
    assert greedy.calls == [[0]] and beam.calls == [[0]]  # one warm-up call each, before any request
    assert batcher.stats()['calls'] == 0  # warm-up calls are not counted
  run(test, {1: greedy, 3: beam})


def test_captioners_must_share_a_batch_size():
  with pytest.raises(ValueError, match='one batch size'):
    batcher_lib.DynamicBatcher({1: FakeCaptioner(1, batch_size=4), 3: FakeCaptioner(3, batch_size=8)},
                               max_wait_ms=1)


def test_concurrent_submissions_share_batches_up_to_the_batch_size():
  captioner = FakeCaptioner(1, batch_size=4)

  async def test(batcher):
    # Eight single-image requests at once: two full batches (no waiting for max_wait: they are full).
    results = await asyncio.gather(*(batcher.caption([image(i)], 1) for i in range(1, 9)))
    assert results == [[f'beam1:{i}'] for i in range(1, 9)]
    assert captioner.calls[1:] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    stats = batcher.stats()
    assert stats['calls'] == 2 and stats['images'] == 8 and stats['batch_sizes'] == {'4': 2}
    assert stats['mean_batch_size'] == 4 and stats['queued'] == 0
  run(test, {1: captioner})


def test_each_caller_gets_its_own_results_in_order():
  captioner = FakeCaptioner(1, batch_size=4)

  async def test(batcher):
    requests = [[7, 3, 9], [5], [2, 8], [6, 1, 4, 10, 11]]  # 11 images: batches of 4, 4 and 3
    results = await asyncio.gather(*(batcher.caption([image(i) for i in ids], 1) for ids in requests))
    assert results == [[f'beam1:{i}' for i in ids] for ids in requests]
    assert captioner.calls[1:] == [[7, 3, 9, 5], [2, 8, 6, 1], [4, 10, 11]]  # oldest first
  run(test, {1: captioner}, max_wait_ms=50)  # the last batch is not full: it waits out max_wait


def test_decoding_settings_never_share_a_batch():
  greedy, beam = FakeCaptioner(1, batch_size=4), FakeCaptioner(3, batch_size=4)

  async def test(batcher):
    # Interleaved: greedy images have odd ids, beam images even ones.
    settings = {i: 1 if i % 2 else 3 for i in range(1, 13)}
    results = await asyncio.gather(*(batcher.caption([image(i)], beam) for i, beam in settings.items()))
    assert results == [[f'beam{beam}:{i}'] for i, beam in settings.items()]
    assert greedy.calls[1:] == [[1, 3, 5, 7], [9, 11]]
    assert beam.calls[1:] == [[2, 4, 6, 8], [10, 12]]
  run(test, {1: greedy, 3: beam}, max_wait_ms=50)


def test_an_attention_model_is_captioned_with_its_maps():
  captioner = FakeCaptioner(1, has_attention=True)

  async def test(batcher):
    assert batcher.with_attention
    [output] = await batcher.caption([image(5)], 1)
    assert isinstance(output, inference.AttendedCaption)
    assert output.caption == 'beam1:5' and output.words == ['5']
  run(test, {1: captioner}, max_wait_ms=1)


def test_a_failing_batch_gives_each_caller_the_exception_and_serving_goes_on():
  captioner = FakeCaptioner(1, batch_size=4)
  error = RuntimeError('the device ran out of memory')

  async def test(batcher):
    captioner.fail = error
    results = await asyncio.gather(*(batcher.caption([image(i), image(i + 10)], 1) for i in (1, 2)))
    assert results == [[error, error], [error, error]]
    assert captioner.calls[1:] == [[1, 11, 2, 12]]  # one batch failed, and it was not retried
    assert batcher.stats()['calls'] == 0  # failed calls are not counted
    captioner.fail = None
    assert await batcher.caption([image(3)], 1) == ['beam1:3']
    assert batcher.stats()['calls'] == 1
  run(test, {1: captioner}, max_wait_ms=50)


def test_stopping_captions_what_is_queued():
  captioner, beam = FakeCaptioner(1, batch_size=2), FakeCaptioner(3, batch_size=2)
  captioner.gate = threading.Event()

  async def main():
    batcher = batcher_lib.DynamicBatcher({1: captioner, 3: beam}, max_wait_ms=1)
    captioner.gate.set()  # the warm-up call
    await asyncio.wait_for(batcher.start(), TIMEOUT_S)
    captioner.gate.clear()
    captioner.entered.clear()
    first = asyncio.create_task(batcher.caption([image(1)], 1))
    assert await asyncio.to_thread(captioner.entered.wait, TIMEOUT_S)  # its batch is running (and held)
    # Queued behind it: a greedy image, and two beam-search ones (still waiting when the stop marker is
    # reached: they must be captioned all the same).
    queued = [asyncio.create_task(batcher.caption(images, beam_size))
              for images, beam_size in (([image(2)], 1), ([image(3), image(4)], 3))]
    await asyncio.sleep(0)  # the tasks queue their images
    assert batcher.stats()['queued'] == 3
    stopping = asyncio.create_task(batcher.stop())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match='not running'):  # no new images once stopping
      await asyncio.wait_for(batcher.caption([image(5)], 1), TIMEOUT_S)
    assert not stopping.done()  # it waits for the batch in flight and the queue
    captioner.gate.set()
    await asyncio.wait_for(stopping, TIMEOUT_S)
    assert first.done() and all(task.done() for task in queued)  # stop() returned after their captions
    assert first.result() == ['beam1:1']
    assert [task.result() for task in queued] == [['beam1:2'], ['beam3:3', 'beam3:4']]
    assert captioner.calls[1:] == [[1], [2]] and beam.calls[1:] == [[3, 4]]
    assert batcher.stats()['images'] == 4
    with pytest.raises(RuntimeError, match='not running'):
      await batcher.caption([image(6)], 1)

  try:
    asyncio.run(main())
  finally:
    captioner.gate.set()  # a failed test never leaves the model thread waiting
