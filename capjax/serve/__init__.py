"""Serve a trained captioner: a web page and a JSON API, with concurrent requests captioned together.

  python launch.py --mode=serve --workdir=workdirs/demo [--port=8000] [--beam_size=3]

One module per job:
  uploads          uploaded bytes -> the model's pixels, or why an image is refused: the header check
                   (`check_upload`: pixels, and the memory decoding will hold) and the decode (`read_upload`)
  budget           `DecodeBudget`: the memory the decodes in flight may hold together (--max_decode_mb)
  batcher          `DynamicBatcher`: concurrent requests' images captioned together (no HTTP in it)
  parsing          request bodies (multipart or JSON) -> uploaded images, or why a request is refused
  hosts            `HostCheck`: the Host names a loopback server answers (DNS rebinding; --allowed_hosts)
  app              the Starlette app (`create_app`): routes, responses, provenance (`describe_model`),
                   loading the model (`load_captioners`), and `serve()` for launch.py
  static/page.html the page `GET /` returns (shipped in the package, read once)

Routes (Starlette on uvicorn; the model is loaded and compiled once, before the port opens):
  GET  /             a page: drop or pick images, see each one with its caption (and, for an attention
                     model, the image region each word looked at), pick greedy or beam decoding, read
                     where the model comes from (workdir name, step, dataset, validation scores)
  POST /v1/captions  images in the multipart field `images`, or JSON {"images": [{"name", "data"}]} with
                     base64 `data` (a data: URL works too). Query: ?beam_size=N (1 or the server's
                     --beam_size; default the latter), ?attention=1 (attention models: the weights too).
                     -> {"results": [{"name", "caption"} | {"name", "error", "status"}], "model": {...}}
                     in upload order; HTTP 200 when at least one image was captioned, else the 4xx of
                     the failures (400 empty, 413 too many pixels or too costly to decode, 415 not an
                     image); 400 for a malformed body (a multipart body cut off, JSON of another shape)
  GET  /v1/model     provenance, config summary, vocabulary size, decoding options, batching statistics
  GET  /healthz      {"status": "ok"}, the batching statistics and the decode budget's

Dynamic batching (`batcher`): each decoded image joins one asyncio queue; a single worker takes the
oldest image, waits up to --max_wait_ms for others with the same decoding setting (up to
--max_batch_size), and captions them in one call of the jitted function, in a thread of its own so the
event loop keeps accepting and decoding requests meanwhile. Every call has the same batch shape (the
captioner pads the batch), and each decoding setting (greedy, and beam search at --beam_size) is
compiled once at start, so no request ever waits for a compilation.

Limits: request bodies over --max_upload_mb (by Content-Length, and by the bytes actually received)
get 413 (`parsing`); each image is checked from its header before it is decoded, for its pixel count
(decompression bombs) and for the memory its decoding will hold, bit depth included (--max_decode_mb;
`uploads`); decodes wait for memory when the ones in flight hold --max_decode_mb together (`budget`);
empty, unreadable, oversized and too costly images get their own error in the response and the rest
of the request is still captioned. SIGTERM (or Ctrl+C) stops accepting connections, lets the requests
in flight finish, captions what is queued, then exits. There is no authentication: the default host is
127.0.0.1, where only requests whose Host header names loopback (or --allowed_hosts) are answered, so a
web page elsewhere cannot reach the server through DNS rebinding (`hosts`).
"""

from capjax.serve.app import create_app
from capjax.serve.app import describe_model
from capjax.serve.app import load_captioners
from capjax.serve.app import serve
from capjax.serve.parsing import MAX_IMAGES_PER_REQUEST

__all__ = ['MAX_IMAGES_PER_REQUEST', 'create_app', 'describe_model', 'load_captioners', 'serve']
