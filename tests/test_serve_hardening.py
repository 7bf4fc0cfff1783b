"""Serve mode against hostile or broken requests: a foreign Host header (DNS rebinding), images that cost
far more memory to decode than their file size says (16-bit PNGs), JSON nested thousands deep, multipart
bodies cut off mid-file; and the decode budget on its own.

The model is test_serve.py's tiny random one, greedy only (one compilation).
"""

import asyncio
import contextlib
import io
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
from starlette.testclient import TestClient

from capjax import errors
from capjax import images
from capjax import serve
from capjax.serve import budget as budget_lib
from capjax.serve import uploads
import test_serve

LOCAL = test_serve.LOCAL
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def served(tmp_path_factory):
  workdir = test_serve.make_untrained_workdir(tmp_path_factory.mktemp('hardening') / 'workdir')
  return workdir, serve.load_captioners(workdir, checkpoint='latest', beam_size=1)


@pytest.fixture(scope='module')
def client(served):
  workdir, captioners = served
  with TestClient(serve.create_app(captioners, workdir), base_url=LOCAL) as test_client:
    yield test_client


def gray16(side: int) -> bytes:
  """A `side` x `side` 16-bit grayscale PNG (PIL mode I;16): a smooth ramp, a few KB per megapixel."""
  y, x = np.mgrid[0:side, 0:side]
  image = Image.fromarray(((x * 64 + y) % 65536).astype(np.uint16))
  assert image.mode == 'I;16'
  return test_serve.encoded(image)


def photo(side: int, mode: str = 'RGB', image_format: str = 'PNG') -> bytes:
  y, x = np.mgrid[0:side, 0:side]
  ramp = ((x + y) % 256).astype(np.uint8)
  image = Image.fromarray(np.stack([ramp, ramp.T, ramp[::-1]], -1))
  if mode == 'P+transparency':
    buffer = io.BytesIO()
    image.convert('P').save(buffer, 'PNG', transparency=0)
    return buffer.getvalue()
  return test_serve.encoded(image.convert(mode), image_format)


# ----------------------------------------------------------------------------------------------
# The Host header


def test_a_loopback_server_answers_only_loopback_host_names(served):
  workdir, captioners = served
  client = TestClient(serve.create_app(captioners, workdir), base_url=LOCAL)  # nothing to caption here
  for host in ('127.0.0.1', '127.0.0.1:8000', 'localhost', 'LocalHost:8000', 'localhost.', '127.4.5.6',
               '[::1]', '[::1]:8000'):
    assert client.get('/v1/model', headers={'host': host}).status_code == 200, host
  for host in ('evil.example', 'evil.example:8000', 'localhost.evil.example', '127.0.0.1.nip.io',
               '[::2]:8000', 'testserver', 'localhost:http', ''):
    response = client.get('/v1/model', headers={'host': host})
    assert response.status_code == 421, (host, response.text)
    assert '--allowed_hosts' in response.json()['error'] and 'DNS rebinding' in response.json()['error']
  for method, path in (('GET', '/'), ('GET', '/healthz'), ('POST', '/v1/captions')):
    response = client.request(method, path, headers={'host': 'evil.example:8000'})
    assert response.status_code == 421 and "'evil.example:8000'" in response.json()['error'], path
    assert '--allowed_hosts=evil.example' in response.json()['error']
  # Provenance names the model by its folder, without telling clients the server's file system.
  assert client.get('/v1/model').json()['workdir'] == os.path.basename(workdir)


def test_allowed_hosts_and_servers_bound_to_other_addresses(served):
  workdir, captioners = served

  def status(host_header: str, **kwargs) -> int:
    client = TestClient(serve.create_app(captioners, workdir, **kwargs), base_url=LOCAL)
    return client.get('/healthz', headers={'host': host_header}).status_code

  named = {'allowed_hosts': ['captions.example.org', 'fd00::1']}
  assert status('captions.example.org:8443', **named) == 200
  assert status('CAPTIONS.example.org', **named) == 200 and status('[FD00:0::1]:80', **named) == 200
  assert status('localhost', **named) == 200 and status('evil.example', **named) == 421
  # Bound to another address, the Host header is checked only when --allowed_hosts is given.
  assert status('evil.example', host='0.0.0.0') == 200
  assert status('evil.example', host='0.0.0.0', **named) == 421
  assert status('captions.example.org', host='0.0.0.0', **named) == 200
  assert status('evil.example', allowed_hosts=['*']) == 200
  for bad in (['http://captions.example.org'], ['a b'], ['host:port']):
    with pytest.raises(errors.InputError, match='--allowed_hosts'):
      serve.create_app(captioners, workdir, allowed_hosts=bad)


# ----------------------------------------------------------------------------------------------
# What an image costs to decode


def test_the_decode_estimate_counts_bit_depth_bands_and_conversions():
  # Bytes a pixel: PIL's storage (RGB in 4 bytes, I;16 in 2, L/P in 1) plus images.load_image's
  # conversion to RGB; then 5% and 4 MiB of slack.
  per_pixel = {('RGB', False): 4, ('I;16', False): 2 + 2 + 16, ('RGBA', False): 4 + 12, ('P', False): 1 + 4,
               ('P', True): 1 + 12, ('L', False): 1 + 4, ('I', False): 4 + 4 + 16, ('CMYK', False): 4 + 4}
  for (mode, transparency), cost in per_pixel.items():
    estimate = uploads.decode_bytes(mode, (3000, 2000), transparency=transparency)
    assert estimate == int(6e6 * cost * 1.05) + 4 * 2**20, mode
  assert uploads._ALPHA_MODES == images._ALPHA_MODES  # the alpha rule of images.to_rgb
  # From the header: a black 6000 x 6000 16-bit PNG (70 KB) costs ~720 MB whatever its file size, while
  # a 12-megapixel JPEG decodes at a reduced scale (Image.draft) and costs a few MB.
  black = test_serve.encoded(Image.new('I;16', (6000, 6000)))
  assert len(black) < 100_000 and uploads.check_upload(black, 32, 10**9, 10**12) > 720e6
  jpeg = test_serve.encoded(Image.new('RGB', (4000, 3000), (20, 30, 40)), 'JPEG')
  assert uploads.check_upload(jpeg, 32, 10**9, 10**12) < 6e6


# A fresh process decodes the file as the server does; its peak resident memory over the moment before.
_MEASURE = '''
import gc, sys
from capjax import images
data = open(sys.argv[1], 'rb').read()
def status(key):
  for line in open('/proc/self/status'):
    if line.startswith(key + ':'):
      return int(line.split()[1]) * 1024
gc.collect()
open('/proc/self/clear_refs', 'w').write('5')  # VmHWM := VmRSS
before = status('VmRSS')
images.resize_image(images.load_image(data, 32), 32)
print(status('VmHWM') - before)
'''


@pytest.mark.skipif(not os.access('/proc/self/clear_refs', os.W_OK), reason='measures through Linux /proc')
def test_the_decode_estimate_covers_what_decoding_really_holds(tmp_path):
  cases = {'8-bit RGB': photo(2000), '16-bit grayscale': gray16(2000), 'RGBA': photo(2000, 'RGBA'),
           'palette': photo(2000, 'P'), 'palette + transparency': photo(2000, 'P+transparency')}
  for name, data in cases.items():
    path = tmp_path / 'image'
    path.write_bytes(data)
    estimate = uploads.check_upload(data, 32, 10**9, 10**12)
    measured = int(subprocess.run([sys.executable, '-c', _MEASURE, str(path)], capture_output=True,
                                  text=True, check=True, env={**os.environ, 'PYTHONPATH': REPO}).stdout)
    assert measured <= estimate <= 1.3 * measured, (name, measured, estimate)


def test_images_too_costly_to_decode_are_refused_before_decoding(served, monkeypatch):
  workdir, captioners = served
  decoded = []
  load_image = images.load_image

  def counting_load_image(image, *args, **kwargs):
    if isinstance(image, bytes):  # an upload (the captioner also passes its pixels through load_image)
      decoded.append(image)
    return load_image(image, *args, **kwargs)
  monkeypatch.setattr(images, 'load_image', counting_load_image)
  deep, rgb = gray16(1000), photo(1000)  # ~25 MB to decode (20 bytes a pixel), ~8 MB (4 bytes a pixel)
  assert len(deep) < 100_000
  app = serve.create_app(captioners, workdir, max_decode_mb=12)
  with TestClient(app, base_url=LOCAL) as client:
    response = client.post('/v1/captions', files=test_serve.multipart([('deep.png', deep)]))
    assert response.status_code == 413, response.text
    error = response.json()['results'][0]['error']
    assert '1000 x 1000 I;16' in error and '--max_decode_mb' in error and not decoded
    # Beside images that fit: those are captioned, one decode at a time (two would hold over 12 MB).
    files = [('deep.png', deep)] + [(f'photo{i}.png', rgb) for i in range(4)]
    response = client.post('/v1/captions', files=test_serve.multipart(files))
    assert response.status_code == 200, response.text
    results = response.json()['results']
    assert results[0]['status'] == 413 and all(r['caption'] == results[1]['caption'] for r in results[1:])
    assert len(decoded) == 4
    budget = client.get('/healthz').json()['decoding']
  assert budget['budget_mb'] == 12 and 8 <= budget['peak_mb'] <= 12 and budget['in_use_mb'] == 0
  assert budget['waited'] >= 1 and budget['waiting'] == 0


def test_the_decode_budget_bounds_what_is_in_flight_in_arrival_order():
  async def scenario():
    budget = budget_lib.DecodeBudget(100)
    granted = []

    async def reserve(name, amount):
      amount = await budget.reserve(amount)
      granted.append(name)
      return amount
    first = await budget.reserve(60)
    big = asyncio.create_task(reserve('big', 80))
    await asyncio.sleep(0)
    small = asyncio.create_task(reserve('small', 10))  # would fit now, but arrived after 'big'
    await asyncio.sleep(0.01)
    assert granted == [] and budget.in_use == 60
    budget.release(first)
    assert await asyncio.wait_for(big, 5) == 80 and await asyncio.wait_for(small, 5) == 10
    assert granted == ['big', 'small'] and budget.in_use == budget.peak == 90 and budget.waited == 2
    # A cancelled wait gives its place up; a reservation over the total is capped to it (it runs alone).
    huge = asyncio.create_task(budget.reserve(1000))
    after = asyncio.create_task(reserve('after', 5))
    await asyncio.sleep(0.01)
    huge.cancel()
    with contextlib.suppress(asyncio.CancelledError):
      await huge
    assert await asyncio.wait_for(after, 5) == 5 and budget.in_use == 95
    for amount in (80, 10, 5):
      budget.release(amount)
    assert await budget.reserve(1000) == 100 and budget.stats()['waiting'] == 0
  asyncio.run(asyncio.wait_for(scenario(), 30))


# ----------------------------------------------------------------------------------------------
# Malformed bodies


def test_json_nested_too_deeply_is_a_400(client):
  headers = {'content-type': 'application/json'}
  for body in ('{"images": ' + '[' * 10_000 + ']' * 10_000 + '}',
               '{"images": [' + '{"a": ' * 10_000 + '1' + '}' * 10_000 + ']}'):
    response = client.post('/v1/captions', content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert 'not valid JSON of the expected shape' in response.json()['error']
  # Nested within the parser's reach: the name is not echoed back (it is not text), the data is refused.
  body = '{"images": [{"name": ' + '[' * 900 + ']' * 900 + ', "data": "AAAA"}]}'
  response = client.post('/v1/captions', content=body, headers=headers)
  assert response.status_code == 415 and response.json()['results'][0]['name'] == 'image 1'


def test_a_multipart_upload_cut_off_is_a_400(client):
  png = test_serve.scene_files(1)[0][1]
  boundary = 'capjax-test-boundary'

  def part(name: str) -> bytes:
    return (f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{name}"\r\n'
            'Content-Type: image/png\r\n\r\n').encode() + png + b'\r\n'
  first = part('a.png')
  whole = first + part('b.png') + f'--{boundary}--\r\n'.encode()
  headers = {'content-type': f'multipart/form-data; boundary={boundary}'}
  for complete in (whole, whole[:-2]):  # the CRLF after the closing boundary is optional
    response = client.post('/v1/captions', content=complete, headers=headers)
    assert response.status_code == 200 and len(response.json()['results']) == 2, response.text
  # Cut in the first file, in the second part's headers, in the second file, in the closing boundary.
  for cut in (len(first) // 2, len(first) + 40, len(whole) - len(png) // 2, len(whole) - 4):
    response = client.post('/v1/captions', content=whole[:cut], headers=headers)
    assert response.status_code == 400, (cut, response.text)
    assert 'cut off' in response.json()['error']
