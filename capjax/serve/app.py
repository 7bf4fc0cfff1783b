"""The Starlette app of serve mode: its routes, request parsing (multipart or JSON uploads, the query's
decoding options), the responses, the served model's description, and `serve()` for launch.py.

  GET  /             the page, static/page.html (read once; shipped in the package)
  POST /v1/captions  uploads -> decode threads (`uploads.read_upload`) -> the `batcher.DynamicBatcher`
  GET  /v1/model     provenance, config summary, decoding options, batching statistics
  GET  /healthz      {"status": "ok"} and the batching statistics

Request bodies over --max_upload_mb (by Content-Length, and by the bytes actually received) get 413;
a request refused as a whole gets {"error"}, one whose images are refused one by one gets each image's
error beside the others' captions. SIGTERM (or Ctrl+C) makes uvicorn stop accepting connections and
let the requests in flight finish; the app's lifespan then captions what is queued.
"""

import asyncio
import base64
import binascii
from collections.abc import Mapping
import concurrent.futures
import contextlib
import dataclasses
import importlib.resources
import ipaddress
import json
import math
import os
from typing import Any

import jax
import numpy as np
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
from capjax import inference
from capjax import progress
from capjax import workdir as workdir_lib
from capjax.serve import batcher as batcher_lib
from capjax.serve import uploads as uploads_lib

# Enough for any real use of one request; the upload limit bounds the bytes, this bounds the parts
# (thousands of 0-byte files would otherwise be thousands of futures).
MAX_IMAGES_PER_REQUEST = 64
# Decoding runs beside the model thread; a full-size decode holds up to max_image_pixels x 3 bytes,
# so the number of decodes at once (not the number of requests) bounds that memory.
DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))
# uvicorn waits this long for requests in flight after SIGTERM before cancelling them.
GRACEFUL_SHUTDOWN_S = 30

# The page (all text that comes from uploads or the server is set with textContent, never as HTML).
PAGE = importlib.resources.files('capjax.serve').joinpath('static', 'page.html').read_text('utf-8')


class RequestRefused(Exception):
  """A request refused as a whole (too large, malformed, an unknown option)."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status, self.message = status, message


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
    progress.say(f'--max_batch_size={max_batch_size} -> {batch_size}: a batch is split evenly over '
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
  batcher = batcher_lib.DynamicBatcher(captioners, max_wait_ms=max_wait_ms)
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

    async def decode(data: bytes | uploads_lib.ImageRefused) -> np.ndarray | uploads_lib.ImageRefused:
      if isinstance(data, uploads_lib.ImageRefused):
        return data
      try:
        return await asyncio.get_running_loop().run_in_executor(
            decode_threads, uploads_lib.read_upload, data, limits.image_size, limits.max_image_pixels)
      except uploads_lib.ImageRefused as e:
        return e

    decoded = await asyncio.gather(*(decode(data) for _, data in uploads))
    good = [i for i, pixels in enumerate(decoded) if not isinstance(pixels, uploads_lib.ImageRefused)]
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
      progress.say(ready_message)
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
  if isinstance(decoded, uploads_lib.ImageRefused):
    return {'name': name, 'error': decoded.message, 'status': decoded.status}
  if isinstance(output, Exception):  # its batch failed (logged by the batcher)
    return {'name': name, 'error': f'captioning failed ({type(output).__name__}: {output})', 'status': 500}
  attended = output if isinstance(output, inference.AttendedCaption) else None
  result = {'name': name, 'caption': attended.caption if attended else output}
  if with_attention:
    result['words'] = attended.words
    result['attention'] = np.round(attended.attention, 5).tolist()
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


async def _read_uploads(request: Request,
                        max_bytes: int) -> list[tuple[str, bytes | uploads_lib.ImageRefused]]:
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


async def _multipart_uploads(request: Request) -> list[tuple[str, bytes | uploads_lib.ImageRefused]]:
  form = await request.form(max_files=MAX_IMAGES_PER_REQUEST, max_fields=16)
  try:
    uploads = []
    for position, part in enumerate(form.getlist('images'), start=1):
      if isinstance(part, UploadFile):
        uploads.append((part.filename or f'image {position}', await part.read()))
      else:
        uploads.append((f'image {position}', uploads_lib.ImageRefused(400, 'a text field, not a file')))
    return uploads
  finally:
    await form.close()


def _json_uploads(body: bytes) -> list[tuple[str, bytes | uploads_lib.ImageRefused]]:
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


def _from_base64(data: Any) -> bytes | uploads_lib.ImageRefused:
  if not isinstance(data, str):
    return uploads_lib.ImageRefused(400, '"data" must be a base64 string')
  if data.startswith('data:'):  # a data: URL, as browsers' FileReader.readAsDataURL makes them
    data = data.partition(',')[2]
  try:
    return base64.b64decode(data, validate=True)
  except (binascii.Error, ValueError) as e:
    return uploads_lib.ImageRefused(400, f'"data" is not valid base64 ({e})')


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
    progress.say(f'Warning: binding {host}: anyone who can reach this address can use the service '
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
  progress.say(f"Loaded step {captioners[beam_size].step} of {workdir}: greedy and "
               f"{batcher_lib.setting_name(beam_size)} decoding, batches of up to "
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

