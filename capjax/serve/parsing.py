"""Request parsing for POST /v1/captions: the body -> (name, bytes) per uploaded image, and the query's
decoding options; `RequestRefused` for a request refused as a whole.

  multipart/form-data  files in the field "images"; a body cut off before the form's closing boundary
                       is refused (Starlette alone would return the parts complete so far)
  application/json     {"images": [{"name": ..., "data": base64 or a data: URL}]}; a body that is not
                       JSON of that shape (nested too deeply included) is refused
Bodies over --max_upload_mb (by Content-Length, and by the bytes actually received) get 413. An image
that cannot be used (a text field, bad base64) is an `uploads.ImageRefused` in its place, so the
request's other images are still captioned.
"""

import base64
import binascii
import json
from typing import Any

from starlette import formparsers
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect
from starlette.requests import Request

from capjax.serve import uploads as uploads_lib

# Enough for any real use of one request; the upload limit bounds the bytes, this bounds the parts
# (thousands of 0-byte files would otherwise be thousands of futures).
MAX_IMAGES_PER_REQUEST = 64


class RequestRefused(Exception):
  """A request refused as a whole (too large, malformed, an unknown option)."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status, self.message = status, message


def beam_size_option(request: Request, decoding: dict) -> int:
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


async def read_uploads(request: Request,
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
  except formparsers.MultiPartException as e:  # malformed data, too many parts
    raise RequestRefused(400, f'malformed multipart form: {e.message}') from None
  except ClientDisconnect:
    raise RequestRefused(400, 'the client went away during the upload') from None
  if not uploads:
    raise RequestRefused(400, 'no images: send one or more files in the field "images"')
  if len(uploads) > MAX_IMAGES_PER_REQUEST:
    raise RequestRefused(400, f'{len(uploads)} images in one request; the limit is '
                              f'{MAX_IMAGES_PER_REQUEST} (send several requests: they are batched)')
  return uploads


class _MultiPartParser(formparsers.MultiPartParser):
  """Starlette's multipart parser, which also tells whether the body reached its closing boundary:
  from a body cut off mid-file Starlette returns the parts that were complete and drops the rest."""

  ended = False

  def on_end(self) -> None:  # python-multipart calls it at the closing boundary, and only there
    super().on_end()
    self.ended = True


async def _multipart_uploads(request: Request) -> list[tuple[str, bytes | uploads_lib.ImageRefused]]:
  parser = _MultiPartParser(request.headers, request.stream(), max_files=MAX_IMAGES_PER_REQUEST,
                            max_fields=16)
  form = await parser.parse()
  try:
    if not parser.ended:
      raise RequestRefused(400, 'the multipart upload was cut off: the body ended before the closing '
                                'boundary of the form, so some files are missing or incomplete (send '
                                'the request again)')
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
  expected = 'expected JSON {"images": [{"name": ..., "data": base64}, ...]}'
  try:
    images = json.loads(body)['images']
  except RecursionError:  # thousands of nested lists or objects: no upload is shaped like that
    raise RequestRefused(400, f'the body is not valid JSON of the expected shape (nested too deeply); '
                              f'{expected}') from None
  except (ValueError, KeyError, TypeError):
    raise RequestRefused(400, expected) from None
  if not isinstance(images, list):
    raise RequestRefused(400, '"images" must be a list')
  uploads = []
  for position, item in enumerate(images[:MAX_IMAGES_PER_REQUEST + 1], start=1):
    name = item.get('name') if isinstance(item, dict) else None
    # A name is text (or a number); anything else, a nested object say, is not shown back.
    name = str(name) if isinstance(name, (str, int, float)) and name else f'image {position}'
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
