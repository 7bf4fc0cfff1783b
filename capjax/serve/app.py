"""The Starlette app of serve mode: its routes, the responses, the served model's description, and
`serve()` for launch.py (request parsing: `parsing`; the Host check: `hosts`).

  GET  /             the page, static/page.html (read once; shipped in the package)
  POST /v1/captions  uploads -> decode threads (`uploads.check_upload`, then `uploads.read_upload` once
                     the `budget.DecodeBudget` has room for it) -> the `batcher.DynamicBatcher`
  GET  /v1/model     provenance, config summary, decoding options, batching statistics
  GET  /healthz      {"status": "ok"}, the batching statistics and the decode budget's

Request bodies over --max_upload_mb (by Content-Length, and by the bytes actually received) get 413, a
JSON body that is not {"images": [...]} (nested too deeply included) or a multipart body cut off
before its closing boundary 400; a request refused as a whole gets {"error"}, one whose images are
refused one by one gets each image's error beside the others' captions. A server bound to loopback
answers only requests whose Host header names loopback or one of --allowed_hosts (`hosts`). SIGTERM
(or Ctrl+C) makes uvicorn stop accepting connections and let the requests in flight finish; the app's
lifespan then captions what is queued.
"""

import asyncio
from collections.abc import Iterable
from collections.abc import Mapping
import concurrent.futures
import contextlib
import dataclasses
import importlib.resources
import math
import os

import jax
import ml_collections
import numpy as np
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.responses import JSONResponse
from starlette.routing import Route
import uvicorn

from capjax import errors
from capjax import export as export_lib
from capjax import fileio
from capjax import inference
from capjax import progress
from capjax import workdir as workdir_lib
from capjax.serve import batcher as batcher_lib
from capjax.serve import budget as budget_lib
from capjax.serve import hosts as hosts_lib
from capjax.serve import parsing
from capjax.serve import uploads as uploads_lib

# Decoding runs beside the model thread, in this many threads (CPU); the memory decodes hold at once is
# bounded by --max_decode_mb (`budget.DecodeBudget`), whatever the number of threads or requests.
DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))
# uvicorn waits this long for requests in flight after SIGTERM before cancelling them.
GRACEFUL_SHUTDOWN_S = 30

# The page (all text that comes from uploads or the server is set with textContent, never as HTML).
PAGE = importlib.resources.files('capjax.serve').joinpath('static', 'page.html').read_text('utf-8')


# ----------------------------------------------------------------------------------------------
# Provenance
# ----------------------------------------------------------------------------------------------


def describe_model(workdir: str, captioner: inference.ImageCaptioner, beam_sizes) -> dict:
  """Where the served model comes from and what it is: workdir (its folder's name), step, dataset, the
  validation scores of the served step (history.json), the config that shapes it, and the decoding
  options offered. The workdir's name identifies the model; its absolute path would tell every client
  the server's file system layout (user names, mounts), which the page does not need. `workdir` may be
  an export directory (capjax/export.py): then its manifest gives the step's epoch and scores."""
  if export_lib.is_export(workdir):
    manifest = export_lib.read_manifest(workdir)
    config = ml_collections.ConfigDict(fileio.read_json(os.path.join(workdir, export_lib.CONFIG)))
    source = manifest.get('source', {})
    epoch = dict(manifest.get('validation', {}), step=source.get('step'), epoch=source.get('epoch'))
  else:
    config = workdir_lib.load_config(workdir)
    epoch = next((h for h in workdir_lib.load_history(workdir) if h.get('step') == captioner.step), None)
  validation = {}
  if epoch is not None:
    validation = {k: v for k, v in epoch.items()
                  if isinstance(v, (int, float)) and k not in ('epoch', 'step', 'train_loss')
                  and math.isfinite(v)}
  model = config.model
  return {
      'workdir': os.path.basename(os.path.abspath(workdir)), 'step': int(captioner.step),
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
                    length_penalty: float = 0.0, no_repeat_ngram: int = 0, max_batch_size: int = 16,
                    export_dir: str | None = None) -> dict[int, inference.ImageCaptioner]:
  """{beam size: captioner} for greedy and `beam_size`, sharing one restored set of weights (from
  `export_dir` when given, else `workdir`'s checkpoint). The batch size is `max_batch_size` rounded
  down to a multiple of the device count (at least one image per device), as the captioner would round
  it: then one batch is exactly one jitted call."""
  if beam_size < 1 or max_batch_size < 1:
    raise errors.InputError(f'--beam_size={beam_size} and --max_batch_size={max_batch_size} must be >= 1')
  devices = jax.local_device_count()
  batch_size = max(devices, max_batch_size // devices * devices)
  if batch_size != max_batch_size:
    progress.say(f'--max_batch_size={max_batch_size} -> {batch_size}: a batch is split evenly over '
                 f'{devices} devices.')
  decode = dict(beam_size=beam_size, length_penalty=length_penalty, no_repeat_ngram=no_repeat_ngram,
                batch_size=batch_size)
  if export_dir:
    served = inference.ImageCaptioner.from_export(export_dir, **decode)
  else:
    served = inference.ImageCaptioner.from_workdir(workdir, checkpoint=checkpoint, **decode)
  return {1: dataclasses.replace(served, beam_size=1), beam_size: served}


def create_app(captioners: Mapping[int, inference.ImageCaptioner], workdir: str, *,
               max_wait_ms: float = 10.0, max_upload_mb: float = 20, max_image_pixels: int = 40_000_000,
               max_decode_mb: float = 256, host: str = '127.0.0.1', allowed_hosts: Iterable[str] = (),
               ready_message: str | None = None) -> Starlette:
  """The Starlette app. Its lifespan compiles the captioners (before uvicorn opens the port; then it
  says `ready_message`) and, at shutdown, captions what is still queued. `max_upload_mb` and
  `max_decode_mb` are in MiB. `host` is the address the server binds: loopback (or `allowed_hosts`
  given) makes the app answer only the Host names of `hosts.HostCheck`. `app.state.batcher` holds the
  batching statistics, `app.state.decode_budget` the memory of the decodes in flight."""
  allowed = hosts_lib.allowed_names(allowed_hosts)
  batcher = batcher_lib.DynamicBatcher(captioners, max_wait_ms=max_wait_ms)
  any_captioner = next(iter(captioners.values()))
  provenance = describe_model(workdir, any_captioner, captioners)
  limits = _Limits(max_upload_bytes=int(max_upload_mb * 2**20), max_image_pixels=int(max_image_pixels),
                   max_decode_bytes=int(max_decode_mb * 2**20), image_size=any_captioner.image_size)
  # One image may hold up to --max_decode_mb while it decodes, and all of them together no more: a
  # total of threads x the limit would bound nothing the thread count does not already bound.
  budget = budget_lib.DecodeBudget(limits.max_decode_bytes)
  decode_threads = None  # the lifespan's

  async def page(request: Request) -> HTMLResponse:
    del request
    return HTMLResponse(PAGE)

  async def healthz(request: Request) -> JSONResponse:
    del request
    return JSONResponse({'status': 'ok', 'step': provenance['step'], 'batching': batcher.stats(),
                         'decoding': budget.stats()})

  async def model_info(request: Request) -> JSONResponse:
    del request
    return JSONResponse({**provenance, 'batching': batcher.stats()})

  async def captions(request: Request) -> JSONResponse:
    try:
      beam_size = parsing.beam_size_option(request, provenance['decoding'])
      uploads = await parsing.read_uploads(request, limits.max_upload_bytes)
    except parsing.RequestRefused as e:
      return JSONResponse({'error': e.message}, status_code=e.status)
    with_attention = batcher.with_attention and request.query_params.get('attention') in ('1', 'true')

    async def decode(data: bytes | uploads_lib.ImageRefused) -> np.ndarray | uploads_lib.ImageRefused:
      if isinstance(data, uploads_lib.ImageRefused):
        return data
      loop = asyncio.get_running_loop()
      try:
        cost = await loop.run_in_executor(decode_threads, uploads_lib.check_upload, data, limits.image_size,
                                          limits.max_image_pixels, limits.max_decode_bytes)
        reserved = await budget.reserve(cost)  # waits while the decodes in flight hold the rest
        try:
          decoding = decode_threads.submit(uploads_lib.read_upload, data, limits.image_size)
        except BaseException:
          budget.release(reserved)
          raise
        # Given back when the decode ends in its thread, even if this request is cancelled first.
        decoding.add_done_callback(lambda _: loop.call_soon_threadsafe(budget.release, reserved))
        return await asyncio.wrap_future(decoding)
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

  check_hosts = hosts_lib.is_loopback(host) or bool(allowed)
  app = Starlette(routes=[Route('/', page), Route('/healthz', healthz), Route('/v1/model', model_info),
                          Route('/v1/captions', captions, methods=['POST'])], lifespan=lifespan,
                  middleware=[Middleware(hosts_lib.HostCheck, allowed=allowed)] if check_hosts else [])
  app.state.batcher = batcher
  app.state.decode_budget = budget
  app.state.provenance = provenance
  return app


@dataclasses.dataclass(frozen=True)
class _Limits:
  max_upload_bytes: int
  max_image_pixels: int
  max_decode_bytes: int
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


def _overall_status(results: list[dict]) -> int:
  """200 when anything was captioned; otherwise the failures' status when they agree, else 400."""
  if any('caption' in r for r in results):
    return 200
  statuses = {r['status'] for r in results}
  return statuses.pop() if len(statuses) == 1 else 400


# ----------------------------------------------------------------------------------------------
# launch.py --mode=serve
# ----------------------------------------------------------------------------------------------


def serve(workdir: str, *, export_dir: str | None = None, host: str = '127.0.0.1', port: int = 8000,
          checkpoint: str | int = 'best', beam_size: int = 3, length_penalty: float = 0.0,
          no_repeat_ngram: int = 0, max_batch_size: int = 16, max_wait_ms: float = 10.0,
          max_upload_mb: float = 20, max_image_pixels: int = 40_000_000, max_decode_mb: float = 256,
          allowed_hosts: Iterable[str] = ()) -> None:
  """Loads the captioner once (from `export_dir` when given, else from `workdir`) and serves the page
  and the API until SIGTERM or Ctrl+C."""
  if jax.process_count() > 1:
    raise errors.InputError('serve mode runs in one process; start it without --distributed')
  allowed_hosts = sorted(hosts_lib.allowed_names(allowed_hosts))  # a bad name fails before loading
  if max_decode_mb <= 0:
    raise errors.InputError(f'--max_decode_mb={max_decode_mb} must be > 0')
  if not hosts_lib.is_loopback(host):
    progress.say(f'Warning: binding {host}: anyone who can reach this address can use the service '
                 '(there is no authentication). Use the default --host=127.0.0.1 unless the network '
                 'is trusted.')
  captioners = load_captioners(workdir, checkpoint=checkpoint, beam_size=beam_size,
                               length_penalty=length_penalty, no_repeat_ngram=no_repeat_ngram,
                               max_batch_size=max_batch_size, export_dir=export_dir)
  workdir = export_dir or workdir  # what the page and /v1/model describe
  url = f'http://{f"[{host}]" if ":" in host else host}:{port}/'
  app = create_app(captioners, workdir, max_wait_ms=max_wait_ms, max_upload_mb=max_upload_mb,
                   max_image_pixels=max_image_pixels, max_decode_mb=max_decode_mb, host=host,
                   allowed_hosts=allowed_hosts,
                   ready_message=f'Serving at {url} (SIGTERM or Ctrl+C stops it once the requests in '
                                 'flight are answered).')
  progress.say(f"Loaded step {captioners[beam_size].step} of {workdir}: greedy and "
               f"{batcher_lib.setting_name(beam_size)} decoding, batches of up to "
               f"{app.state.batcher.max_batch_size} images gathered for up to {max_wait_ms:g} ms.")
  # uvicorn turns SIGTERM/SIGINT into a graceful shutdown, then re-raises the signal: the exit status
  # is that of the signal, as process supervisors expect.
  uvicorn.run(app, host=host, port=port, log_level='warning', access_log=False,
              timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
