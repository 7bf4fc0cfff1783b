"""Serve a trained captioner: a web page and a JSON API, with concurrent requests captioned together.

  python launch.py --mode=serve --workdir=workdirs/demo [--port=8000] [--beam_size=3]

Routes (Starlette on uvicorn; the model is loaded and compiled once, before the port opens):
  GET  /             a page: drop or pick images, see each one with its caption (and, for an attention
                     model, the image region each word looked at), pick greedy or beam decoding, read
                     where the model comes from (workdir, step, dataset, validation scores)
  POST /v1/captions  images in the multipart field `images`, or JSON {"images": [{"name", "data"}]} with
                     base64 `data` (a data: URL works too). Query: ?beam_size=N (1 or the server's
                     --beam_size; default the latter), ?attention=1 (attention models: the weights too).
                     -> {"results": [{"name", "caption"} | {"name", "error", "status"}], "model": {...}}
                     in upload order; HTTP 200 when at least one image was captioned, else the 4xx of
                     the failures (400 empty, 413 too many pixels, 415 not an image)
  GET  /v1/model     provenance, config summary, vocabulary size, decoding options, batching statistics
  GET  /healthz      {"status": "ok"} and the batching statistics

Dynamic batching: each decoded image joins one asyncio queue; a single worker takes the oldest image,
waits up to --max_wait_ms for others with the same decoding setting (up to --max_batch_size), and
captions them in one call of the jitted function, in a thread of its own so the event loop keeps
accepting and decoding requests meanwhile. Every call has the same batch shape (the captioner pads the
batch), and each decoding setting (greedy, and beam search at --beam_size) is compiled once at start,
so no request ever waits for a compilation.

Limits: request bodies over --max_upload_mb (by Content-Length, and by the bytes actually received)
get 413; each image is checked for its pixel count from its header before it is decoded (decompression
bombs); empty, unreadable and oversized images get their own error in the response and the rest of
the request is still captioned. SIGTERM (or Ctrl+C) stops accepting connections, lets the requests in
flight finish, captions what is queued, then exits. There is no authentication: the default host is
127.0.0.1.
"""

import asyncio
import base64
import binascii
import collections
from collections.abc import Mapping
import concurrent.futures
import contextlib
import dataclasses
import io
import ipaddress
import json
import math
import os
import time
from typing import Any

from absl import logging
import jax
import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.responses import JSONResponse
from starlette.routing import Route
import uvicorn

from capjax import errors
from capjax import images as images_lib
from capjax import inference
from capjax import reporting
from capjax import workdir as workdir_lib

# Enough for any real use of one request; the upload limit bounds the bytes, this bounds the parts
# (thousands of 0-byte files would otherwise be thousands of futures).
MAX_IMAGES_PER_REQUEST = 64
# Decoding runs beside the model thread; a full-size decode holds up to max_image_pixels x 3 bytes,
# so the number of decodes at once (not the number of requests) bounds that memory.
DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))
# uvicorn waits this long for requests in flight after SIGTERM before cancelling them.
GRACEFUL_SHUTDOWN_S = 30


class ImageRefused(Exception):
  """One uploaded image that cannot be captioned; the others of its request still are."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status, self.message = status, message


class RequestRefused(Exception):
  """A request refused as a whole (too large, malformed, an unknown option)."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status, self.message = status, message


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------


def read_upload(data: bytes, image_size: int, max_pixels: int) -> np.ndarray:
  """Encoded image bytes -> the uint8 (image_size, image_size, 3) pixels the model sees: the same
  `images.load_image` + `images.resize_image` as `ImageCaptioner.caption(bytes)`, so the API and the
  Python API give the same captions. The pixel count is read from the header before any decoding."""
  if not data:
    raise ImageRefused(400, 'empty file (0 bytes)')
  try:
    with Image.open(io.BytesIO(data)) as header:
      width, height = header.size
  except Image.DecompressionBombError as e:  # PIL's own limit, when it is below ours
    raise ImageRefused(413, f'too many pixels: {e}') from e
  except Image.UnidentifiedImageError as e:
    raise ImageRefused(415, 'not an image: no image format this server reads (JPEG, PNG, GIF, WebP, '
                            'BMP, TIFF...) recognises the data') from e
  except (OSError, SyntaxError, ValueError) as e:
    raise ImageRefused(415, f'not an image file this server can read ({type(e).__name__}: {e})') from e
  if width * height > max_pixels:
    raise ImageRefused(413, f'too many pixels: {width} x {height} = {width * height:,} is over the '
                            f'limit of {max_pixels:,} (--max_image_pixels)')
  try:
    image = images_lib.load_image(data, image_size)
  except Image.DecompressionBombError as e:
    raise ImageRefused(413, f'too many pixels: {e}') from e
  except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data after a valid header
    raise ImageRefused(415, f'the image cannot be decoded ({type(e).__name__}: {e})') from e
  return images_lib.resize_image(image, image_size)


# ----------------------------------------------------------------------------------------------
# Dynamic batching
# ----------------------------------------------------------------------------------------------


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
      reporting.say(f'Compiled {_setting_name(beam_size)} decoding for batches of {self.max_batch_size} '
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

  def _caption_batch(self, beam_size: int, images: list[np.ndarray]) -> list[dict]:
    """In the model thread: one padded batch through the jitted function."""
    captioner = self.captioners[beam_size]
    if self.with_attention:
      return captioner.caption(images, return_attention=True)
    return [{'caption': caption} for caption in captioner.caption(images)]


def _setting_name(beam_size: int) -> str:
  return 'greedy' if beam_size == 1 else f'beam-{beam_size}'


# ----------------------------------------------------------------------------------------------
# Provenance
# ----------------------------------------------------------------------------------------------


def describe_model(workdir: str, captioner: inference.ImageCaptioner, beam_sizes) -> dict:
  """Where the served model comes from and what it is: workdir, step, dataset, the validation scores
  of the served step (history.json), the config that shapes it, and the decoding options offered."""
  config = workdir_lib.load_config(workdir)
  epoch = next((h for h in workdir_lib.load_history(workdir) if h.get('step') == captioner.step), None)
  validation = {}
  if epoch is not None:
    validation = {k: v for k, v in epoch.items()
                  if isinstance(v, (int, float)) and k not in ('epoch', 'step', 'train_loss')
                  and math.isfinite(v)}
  model = config.model
  return {
      'workdir': os.path.abspath(workdir), 'step': int(captioner.step),
      'epoch': epoch.get('epoch') if epoch else None, 'dataset': config.data.name,
      # val_loss, and BLEU/CIDEr of greedy captions of config.train.metrics_num_images validation images
      'validation': validation,
      'train_loss': epoch.get('train_loss') if epoch else None,
      'config': {'decoder': model.get('decoder', 'seed'), 'encoder_mode': model.encoder_mode,
                 'stage_sizes': list(model.stage_sizes), 'width': model.width,
                 'embed_dim': model.embed_dim, 'hidden_size': model.hidden_size, 'dtype': model.dtype,
                 'image_size': config.data.image_size, 'max_caption_len': config.data.max_caption_len},
      'vocab_size': len(captioner.vocab),
      'attention': bool(getattr(captioner, 'has_attention', False)),
      'decoding': {'beam_sizes': sorted(beam_sizes), 'default_beam_size': max(beam_sizes),
                   'length_penalty': captioner.length_penalty,
                   'no_repeat_ngram': captioner.no_repeat_ngram, 'max_words': captioner.max_len},
      'devices': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
  }


# ----------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------


def load_captioners(workdir: str, *, checkpoint: str | int = 'best', beam_size: int = 3,
                    length_penalty: float = 0.0, no_repeat_ngram: int = 0,
                    max_batch_size: int = 16) -> dict[int, inference.ImageCaptioner]:
  """{beam size: captioner} for greedy and `beam_size`, sharing one restored set of weights. The
  batch size is `max_batch_size` rounded down to a multiple of the device count (at least one image
  per device), as the captioner would round it: then one batch is exactly one jitted call."""
  if beam_size < 1 or max_batch_size < 1:
    raise errors.InputError(f'--beam_size={beam_size} and --max_batch_size={max_batch_size} must be >= 1')
  devices = jax.local_device_count()
  batch_size = max(devices, max_batch_size // devices * devices)
  if batch_size != max_batch_size:
    reporting.say(f'--max_batch_size={max_batch_size} -> {batch_size}: a batch is split evenly over '
                  f'{devices} devices.')
  served = inference.ImageCaptioner.from_workdir(
      workdir, checkpoint=checkpoint, beam_size=beam_size, length_penalty=length_penalty,
      no_repeat_ngram=no_repeat_ngram, batch_size=batch_size)
  return {1: dataclasses.replace(served, beam_size=1), beam_size: served}


def create_app(captioners: Mapping[int, inference.ImageCaptioner], workdir: str, *,
               max_wait_ms: float = 10.0, max_upload_mb: float = 20, max_image_pixels: int = 40_000_000,
               ready_message: str | None = None) -> Starlette:
  """The Starlette app. Its lifespan compiles the captioners (before uvicorn opens the port; then it
  says `ready_message`) and, at shutdown, captions what is still queued. `max_upload_mb` is in MiB.
  `app.state.batcher` holds the batching statistics."""
  batcher = DynamicBatcher(captioners, max_wait_ms=max_wait_ms)
  any_captioner = next(iter(captioners.values()))
  provenance = describe_model(workdir, any_captioner, captioners)
  limits = _Limits(max_upload_bytes=int(max_upload_mb * 2**20), max_image_pixels=int(max_image_pixels),
                   image_size=any_captioner.image_size)
  decode_threads = None  # the lifespan's

  async def page(request: Request) -> HTMLResponse:
    del request
    return HTMLResponse(PAGE)

  async def healthz(request: Request) -> JSONResponse:
    del request
    return JSONResponse({'status': 'ok', 'step': provenance['step'], 'batching': batcher.stats()})

  async def model_info(request: Request) -> JSONResponse:
    del request
    return JSONResponse({**provenance, 'batching': batcher.stats()})

  async def captions(request: Request) -> JSONResponse:
    try:
      beam_size = _beam_size_option(request, provenance['decoding'])
      uploads = await _read_uploads(request, limits.max_upload_bytes)
    except RequestRefused as e:
      return JSONResponse({'error': e.message}, status_code=e.status)
    with_attention = batcher.with_attention and request.query_params.get('attention') in ('1', 'true')

    async def decode(data: bytes | ImageRefused) -> np.ndarray | ImageRefused:
      if isinstance(data, ImageRefused):
        return data
      try:
        return await asyncio.get_running_loop().run_in_executor(
            decode_threads, read_upload, data, limits.image_size, limits.max_image_pixels)
      except ImageRefused as e:
        return e

    decoded = await asyncio.gather(*(decode(data) for _, data in uploads))
    good = [i for i, pixels in enumerate(decoded) if not isinstance(pixels, ImageRefused)]
    outputs = dict(zip(good, await batcher.caption([decoded[i] for i in good], beam_size)))
    results = [_result(name, decoded[i], outputs.get(i), with_attention)
               for i, (name, _) in enumerate(uploads)]
    model = {k: provenance[k] for k in ('workdir', 'step', 'dataset')}
    return JSONResponse({'results': results, 'model': {**model, 'beam_size': beam_size}},
                        status_code=_overall_status(results))

  @contextlib.asynccontextmanager
  async def lifespan(app: Starlette):
    del app
    nonlocal decode_threads
    decode_threads = concurrent.futures.ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix='capjax-decode')
    await batcher.start()
    if ready_message:
      reporting.say(ready_message)
    try:
      yield
    finally:
      await batcher.stop()
      decode_threads.shutdown(wait=True)

  app = Starlette(routes=[Route('/', page), Route('/healthz', healthz), Route('/v1/model', model_info),
                          Route('/v1/captions', captions, methods=['POST'])], lifespan=lifespan)
  app.state.batcher = batcher
  app.state.provenance = provenance
  return app


@dataclasses.dataclass(frozen=True)
class _Limits:
  max_upload_bytes: int
  max_image_pixels: int
  image_size: int


def _result(name: str, decoded, output, with_attention: bool) -> dict:
  """An image's entry in the response: its caption (and attention), or why it has none."""
  if isinstance(decoded, ImageRefused):
    return {'name': name, 'error': decoded.message, 'status': decoded.status}
  if isinstance(output, Exception):  # its batch failed (logged by the batcher)
    return {'name': name, 'error': f'captioning failed ({type(output).__name__}: {output})', 'status': 500}
  result = {'name': name, 'caption': output['caption']}
  if with_attention:
    result['words'] = output['words']
    result['attention'] = np.round(output['attention'], 5).tolist()
  return result


def _beam_size_option(request: Request, decoding: dict) -> int:
  value = request.query_params.get('beam_size')
  if value is None:
    return decoding['default_beam_size']
  try:
    beam_size = int(value)
  except ValueError:
    beam_size = None
  if beam_size not in decoding['beam_sizes']:
    raise RequestRefused(400, f'beam_size={value!r}: this server offers {decoding["beam_sizes"]} '
                              '(1 = greedy; start it with another --beam_size for another beam)')
  return beam_size


class _BodyTooLarge(Exception):
  pass


async def _read_uploads(request: Request, max_bytes: int) -> list[tuple[str, bytes | ImageRefused]]:
  """(name, bytes or the reason they cannot be used) per uploaded image, in order; RequestRefused for
  a request that is too large or malformed as a whole."""
  declared = request.headers.get('content-length')
  if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
    raise RequestRefused(413, f'the request body ({declared} bytes) is over the limit of {max_bytes:,} '
                              'bytes (--max_upload_mb)')
  received = 0

  async def receive_counted():
    # Content-Length may be absent (chunked uploads) or lie: count what really arrives.
    nonlocal received
    message = await request.receive()
    if message['type'] == 'http.request':
      received += len(message.get('body', b''))
      if received > max_bytes:
        raise _BodyTooLarge()
    return message

  counted = Request(request.scope, receive_counted)
  content_type = request.headers.get('content-type', '')
  try:
    if content_type.startswith('multipart/form-data'):
      uploads = await _multipart_uploads(counted)
    elif content_type.startswith('application/json'):
      uploads = _json_uploads(await counted.body())
    else:
      raise RequestRefused(415, 'send images as multipart/form-data (field "images") or as JSON '
                                '{"images": [{"name": ..., "data": base64}]}')
  except _BodyTooLarge:
    raise RequestRefused(413, f'the request body is over the limit of {max_bytes:,} bytes '
                              '(--max_upload_mb)') from None
  except HTTPException as e:  # Starlette's multipart parser: malformed data, too many parts
    raise RequestRefused(e.status_code, f'malformed multipart form: {e.detail}') from None
  except ClientDisconnect:
    raise RequestRefused(400, 'the client went away during the upload') from None
  if not uploads:
    raise RequestRefused(400, 'no images: send one or more files in the field "images"')
  if len(uploads) > MAX_IMAGES_PER_REQUEST:
    raise RequestRefused(400, f'{len(uploads)} images in one request; the limit is '
                              f'{MAX_IMAGES_PER_REQUEST} (send several requests: they are batched)')
  return uploads


async def _multipart_uploads(request: Request) -> list[tuple[str, bytes | ImageRefused]]:
  form = await request.form(max_files=MAX_IMAGES_PER_REQUEST, max_fields=16)
  try:
    uploads = []
    for position, part in enumerate(form.getlist('images'), start=1):
      if isinstance(part, UploadFile):
        uploads.append((part.filename or f'image {position}', await part.read()))
      else:
        uploads.append((f'image {position}', ImageRefused(400, 'a text field, not a file')))
    return uploads
  finally:
    await form.close()


def _json_uploads(body: bytes) -> list[tuple[str, bytes | ImageRefused]]:
  try:
    images = json.loads(body)['images']
  except (ValueError, KeyError, TypeError):
    raise RequestRefused(400, 'expected JSON {"images": [{"name": ..., "data": base64}, ...]}') from None
  if not isinstance(images, list):
    raise RequestRefused(400, '"images" must be a list')
  uploads = []
  for position, item in enumerate(images[:MAX_IMAGES_PER_REQUEST + 1], start=1):
    name = item.get('name') if isinstance(item, dict) else None
    name = str(name) if name else f'image {position}'
    data = item.get('data') if isinstance(item, dict) else item
    uploads.append((name, _from_base64(data)))
  return uploads


def _from_base64(data: Any) -> bytes | ImageRefused:
  if not isinstance(data, str):
    return ImageRefused(400, '"data" must be a base64 string')
  if data.startswith('data:'):  # a data: URL, as browsers' FileReader.readAsDataURL makes them
    data = data.partition(',')[2]
  try:
    return base64.b64decode(data, validate=True)
  except (binascii.Error, ValueError) as e:
    return ImageRefused(400, f'"data" is not valid base64 ({e})')


def _overall_status(results: list[dict]) -> int:
  """200 when anything was captioned; otherwise the failures' status when they agree, else 400."""
  if any('caption' in r for r in results):
    return 200
  statuses = {r['status'] for r in results}
  return statuses.pop() if len(statuses) == 1 else 400


# ----------------------------------------------------------------------------------------------
# launch.py --mode=serve
# ----------------------------------------------------------------------------------------------


def serve(workdir: str, *, host: str = '127.0.0.1', port: int = 8000, checkpoint: str | int = 'best',
          beam_size: int = 3, length_penalty: float = 0.0, no_repeat_ngram: int = 0,
          max_batch_size: int = 16, max_wait_ms: float = 10.0, max_upload_mb: float = 20,
          max_image_pixels: int = 40_000_000) -> None:
  """Loads the captioner once and serves the page and the API until SIGTERM or Ctrl+C."""
  if jax.process_count() > 1:
    raise errors.InputError('serve mode runs in one process; start it without --distributed')
  if not _is_loopback(host):
    reporting.say(f'Warning: binding {host}: anyone who can reach this address can use the service '
                  '(there is no authentication). Use the default --host=127.0.0.1 unless the network '
                  'is trusted.')
  captioners = load_captioners(workdir, checkpoint=checkpoint, beam_size=beam_size,
                               length_penalty=length_penalty, no_repeat_ngram=no_repeat_ngram,
                               max_batch_size=max_batch_size)
  url = f'http://{f"[{host}]" if ":" in host else host}:{port}/'
  app = create_app(captioners, workdir, max_wait_ms=max_wait_ms, max_upload_mb=max_upload_mb,
                   max_image_pixels=max_image_pixels,
                   ready_message=f'Serving at {url} (SIGTERM or Ctrl+C stops it once the requests in '
                                 'flight are answered).')
  reporting.say(f"Loaded step {captioners[beam_size].step} of {workdir}: greedy and "
                f"{_setting_name(beam_size)} decoding, batches of up to "
                f"{app.state.batcher.max_batch_size} images gathered for up to {max_wait_ms:g} ms.")
  # uvicorn turns SIGTERM/SIGINT into a graceful shutdown, then re-raises the signal: the exit status
  # is that of the signal, as process supervisors expect.
  uvicorn.run(app, host=host, port=port, log_level='warning', access_log=False,
              timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)


def _is_loopback(host: str) -> bool:
  if host == 'localhost':
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:  # a host name: it may resolve to anything
    return False


# ----------------------------------------------------------------------------------------------
# The page (all text that comes from uploads or the server is set with textContent, never as HTML)
# ----------------------------------------------------------------------------------------------

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>capjax captioner</title>
<style>
  body { font: 15px/1.45 system-ui, sans-serif; margin: 0; color: #1d2330; background: #f4f5f8; }
  header { background: #1d2330; color: #fff; padding: 14px 28px; display: flex; align-items: baseline;
           gap: 16px; }
  header h1 { font-size: 20px; margin: 0; }
  header span { color: #aab2c5; }
  main { padding: 20px 28px; display: grid; grid-template-columns: 1fr 330px; gap: 24px; }
  #drop { border: 2px dashed #8a93a8; border-radius: 10px; padding: 22px; text-align: center;
          background: #fff; }
  #drop.over { border-color: #2f6fde; background: #eaf1fd; }
  #drop p { margin: 0 0 10px; color: #4a5368; }
  .options { margin: 14px 0; display: flex; gap: 18px; align-items: center; color: #4a5368; }
  #results { display: grid; grid-template-columns: repeat(auto-fill, minmax(230px, 1fr)); gap: 16px; }
  .card { margin: 0; background: #fff; border-radius: 10px; overflow: hidden;
          box-shadow: 0 1px 3px rgba(0, 0, 0, .12); }
  .frame { position: relative; background: #dde1ea; }
  .frame img { display: block; width: 100%; max-height: 260px; object-fit: fill; }
  .frame canvas { position: absolute; inset: 0; width: 100%; height: 100%; }
  .card figcaption { padding: 10px 12px; }
  .name { font-size: 12px; color: #6b748a; word-break: break-all; }
  .caption { font-size: 17px; margin-top: 3px; }
  .caption.pending { color: #8a93a8; font-style: italic; }
  .caption.error { color: #b3261e; font-size: 14px; }
  .caption.empty { color: #8a93a8; font-style: italic; font-size: 14px; }
  .meta { font-size: 12px; color: #8a93a8; margin-top: 4px; }
  .words button { border: 1px solid #c9cfdc; background: #f7f8fb; border-radius: 12px; margin: 4px 3px 0 0;
                  padding: 1px 8px; cursor: pointer; font: inherit; font-size: 13px; }
  .words button:hover, .words button:focus { background: #2f6fde; color: #fff; border-color: #2f6fde; }
  aside { background: #fff; border-radius: 10px; padding: 16px 18px; align-self: start;
          box-shadow: 0 1px 3px rgba(0, 0, 0, .12); }
  aside h2 { font-size: 15px; margin: 0 0 8px; }
  dl { display: grid; grid-template-columns: auto 1fr; gap: 3px 12px; margin: 0 0 14px; font-size: 13px; }
  dt { color: #6b748a; }
  dd { margin: 0; word-break: break-all; }
  code { font-size: 12px; background: #f0f2f6; padding: 2px 4px; border-radius: 4px; word-break: break-all; }
</style>
</head>
<body>
<header><h1>capjax captioner</h1><span id="subtitle">loading the model description...</span></header>
<main>
<section>
  <div id="drop">
    <p>Drop images here, or pick them:</p>
    <input type="file" id="files" accept="image/*" multiple>
  </div>
  <div class="options">
    <label>Decoding <select id="beam"></select></label>
    <span id="stats"></span>
  </div>
  <div id="results"></div>
</section>
<aside>
  <h2>Model</h2><dl id="provenance"></dl>
  <h2>Validation scores at this step</h2><dl id="scores"></dl>
  <h2>API</h2>
  <p><code id="curl">curl -F images=@photo.jpg /v1/captions</code></p>
</aside>
</main>
<script>
'use strict';
let model = null;

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function fillList(list, rows) {
  list.replaceChildren();
  for (const [key, value] of rows) {
    list.append(element('dt', '', key), element('dd', '', String(value)));
  }
}

async function loadModel() {
  model = await (await fetch('/v1/model')).json();
  const config = model.config;
  document.getElementById('subtitle').textContent =
      `step ${model.step} of ${model.workdir.split('/').pop()} (${model.dataset})`;
  fillList(document.getElementById('provenance'), [
    ['workdir', model.workdir], ['step', model.epoch ? `${model.step} (epoch ${model.epoch})` : model.step],
    ['dataset', model.dataset], ['decoder', config.decoder + (model.attention ? ' (attention maps)' : '')],
    ['encoder', `ResNet ${config.stage_sizes.join('-')}, width ${config.width}, ${config.encoder_mode}`],
    ['LSTM', `${config.hidden_size} units, embedding ${config.embed_dim}`],
    ['input', `${config.image_size} px`], ['vocabulary', `${model.vocab_size} tokens`],
    ['devices', model.devices]]);
  const scores = Object.entries(model.validation).map(([k, v]) => [k, v.toFixed(3)]);
  const none = [['none', 'history.json has no record of this step']];
  fillList(document.getElementById('scores'), scores.length ? scores : none);
  const beam = document.getElementById('beam');
  for (const size of model.decoding.beam_sizes) {
    const option = element('option', '', size === 1 ? 'greedy' : `beam search, ${size} beams`);
    option.value = size;
    option.selected = size === model.decoding.default_beam_size;
    beam.append(option);
  }
  const showCurl = () => {
    document.getElementById('curl').textContent =
        `curl -F images=@photo.jpg '${location.origin}/v1/captions?beam_size=${beam.value}'`;
  };
  beam.addEventListener('change', showCurl);
  showCurl();
  refreshStats();
}

async function refreshStats() {
  const stats = (await (await fetch('/healthz')).json()).batching;
  const sizes = Object.entries(stats.batch_sizes).map(([size, n]) => n > 1 ? `${size} (\u00d7${n})` : size);
  document.getElementById('stats').textContent = `${stats.images} images captioned in ${stats.calls} ` +
      `call${stats.calls === 1 ? '' : 's'}` + (sizes.length ? `; batch sizes seen: ${sizes.join(', ')}` : '');
}

function addCard(file) {
  const card = element('figure', 'card');
  const frame = element('div', 'frame');
  const image = element('img');
  image.src = URL.createObjectURL(file);
  image.alt = file.name;
  frame.append(image);
  const text = element('div', 'caption pending', 'captioning\u2026');
  const words = element('div', 'words');
  const meta = element('div', 'meta');
  const figcaption = element('figcaption');
  figcaption.append(element('div', 'name', file.name), text, words, meta);
  card.append(frame, figcaption);
  document.getElementById('results').prepend(card);
  return {frame, text, words, meta};
}

function paint(canvas, grid) {
  // Cells away from where the word looked are darkened (the canvas is stretched over the image, as the
  // model's input was: the whole image resized to a square).
  const height = grid.length, width = grid[0].length, top = Math.max(...grid.flat()) || 1;
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext('2d');
  const pixels = context.createImageData(width, height);
  grid.flat().forEach((weight, k) => pixels.data.set([0, 0, 0, Math.round(200 * (1 - weight / top))], 4 * k));
  context.putImageData(pixels, 0, 0);
  canvas.hidden = false;
}

function showAttention(view, result) {
  const canvas = element('canvas');
  canvas.hidden = true;
  view.frame.append(canvas);
  result.words.forEach((word, i) => {
    const button = element('button', '', word);
    button.addEventListener('mouseenter', () => paint(canvas, result.attention[i]));
    button.addEventListener('focus', () => paint(canvas, result.attention[i]));
    button.addEventListener('mouseleave', () => { canvas.hidden = true; });
    button.addEventListener('blur', () => { canvas.hidden = true; });
    view.words.append(button);
  });
}

async function captionFile(file) {
  const view = addCard(file);
  const params = new URLSearchParams({beam_size: document.getElementById('beam').value});
  if (model && model.attention) params.set('attention', '1');
  const form = new FormData();
  form.append('images', file, file.name);
  const started = performance.now();
  let result;
  try {
    const response = await fetch('/v1/captions?' + params, {method: 'POST', body: form});
    const payload = await response.json();
    result = payload.results ? payload.results[0] : {error: payload.error || response.statusText};
  } catch (error) {
    result = {error: String(error)};
  }
  const setting = params.get('beam_size') === '1' ? 'greedy' : `beam ${params.get('beam_size')}`;
  view.meta.textContent = `${setting}, ${Math.round(performance.now() - started)} ms`;
  if (result.caption) {
    view.text.className = 'caption';
    view.text.textContent = result.caption;
    if (result.attention) showAttention(view, result);
  } else if (result.caption === '') {
    view.text.className = 'caption empty';
    view.text.textContent = '(empty caption: the model ended it at once)';
  } else {
    view.text.className = 'caption error';
    view.text.textContent = result.error;
  }
  refreshStats();
}

function captionFiles(files) {
  // One request per image: each caption shows up as soon as it is ready, and the server batches
  // the requests that arrive together.
  for (const file of files) captionFile(file);
}

const drop = document.getElementById('drop');
drop.addEventListener('dragover', (event) => { event.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', (event) => {
  event.preventDefault();
  drop.classList.remove('over');
  captionFiles(event.dataTransfer.files);
});
document.getElementById('files').addEventListener('change', (event) => {
  captionFiles(event.target.files);
  event.target.value = '';
});
loadModel();
</script>
</body>
</html>
"""
