"""Serve mode: the JSON API against the Python API, bad inputs, dynamic batching, no recompilation,
graceful shutdown, and the page in headless Chromium.

The model is the tiny config with random weights, written into a workdir through the same functions
training uses (no training run: its compilations cost minutes on a 2-core machine). Captions are
nonsense but deterministic, which is all these tests compare.
"""

import base64
import concurrent.futures
import contextlib
import io
import json
import os
import shutil
import socket
import threading
import time

import httpx
import numpy as np
from PIL import Image
import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from starlette.testclient import TestClient
import uvicorn

from benchmarks import harness
import browser
from capjax import checkpointing
from capjax import serve
from capjax import vocab as vocab_lib
from capjax import workdir as workdir_lib
from capjax.data import shapes
from capjax.models import captioner as captioner_lib
from configs import tiny

STEP = 1
BEAM = 3
# The apps answer only loopback Host names (DNS rebinding): TestClient's default host, 'testserver', is not.
LOCAL = 'http://127.0.0.1'


def make_untrained_workdir(workdir, decoder: str = 'seed', attention_grid: int = 0) -> str:
  """config.json, vocab.json and one checkpoint (step 1) of the tiny model, as training writes them."""
  config = tiny.get_config()
  config.model.decoder = decoder
  config.model.attention_grid = attention_grid
  rng = np.random.default_rng(0)
  vocab = vocab_lib.build_vocabulary(
      [c for _ in range(30) for c in shapes.render_example(rng, 32)[1]], config.data.min_word_count)
  model = captioner_lib.build_captioner(config.model, len(vocab))
  abstract = captioner_lib.abstract_variables(model, config.data.image_size, config.data.max_caption_len)
  variables = harness.random_variables(abstract, seed=1)
  os.makedirs(workdir, exist_ok=True)
  workdir_lib.save_config(workdir, config)
  workdir_lib.save_vocab(workdir, vocab)
  checkpointer = checkpointing.Checkpointer(workdir_lib.checkpoint_dir(workdir),
                                            best_metric=config.train.best_metric,
                                            best_mode=config.train.best_mode)
  checkpointer.save(STEP, dict(variables), run_info={'identity': workdir_lib.run_identity(config, vocab)})
  checkpointer.close()
  return str(workdir)


def encoded(image: Image.Image, image_format: str = 'PNG') -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=image_format)
  return buffer.getvalue()


def scene_files(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
  """(name, bytes) of `n` demo scenes in assorted formats, modes and sizes."""
  rng = np.random.default_rng(seed)
  files = []
  for i in range(n):
    image = shapes.render_example(rng, 48 + 8 * i)[0]
    kind = i % 4
    if kind == 0:
      files.append((f'scene{i}.png', encoded(image)))
    elif kind == 1:
      files.append((f'scene{i}.jpg', encoded(image, 'JPEG')))
    elif kind == 2:
      files.append((f'scene{i}.png', encoded(image.convert('RGBA'))))
    else:
      files.append((f'scene{i}.jpg', encoded(image.convert('L'), 'JPEG')))
  return files


def multipart(files) -> list:
  return [('images', (name, data, 'application/octet-stream')) for name, data in files]


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return make_untrained_workdir(tmp_path_factory.mktemp('serve') / 'workdir')


@pytest.fixture(scope='module')
def captioners(workdir):
  # Shared by every app of this module, so each decoding setting compiles once for all the tests.
  return serve.load_captioners(workdir, checkpoint='latest', beam_size=BEAM, max_batch_size=16)


@pytest.fixture(scope='module')
def client(captioners, workdir):
  with TestClient(serve.create_app(captioners, workdir), base_url=LOCAL) as test_client:
    yield test_client


class CountingCalls:
  """Wraps a jitted function: counts calls; with a `gate`, each call waits until the gate opens."""

  def __init__(self, fn, gate: threading.Event | None = None):
    self.fn, self.gate, self.calls = fn, gate, 0
    self.entered = threading.Event()

  def __call__(self, *args):
    self.calls += 1
    self.entered.set()
    if self.gate is not None:
      assert self.gate.wait(60), 'the test never opened the gate'
    return self.fn(*args)


@contextlib.contextmanager
def running_server(app):
  """uvicorn serving `app` on a free localhost port in a thread; yields (base URL, server)."""
  sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  sock.bind(('127.0.0.1', 0))
  server = uvicorn.Server(uvicorn.Config(app, log_level='warning', access_log=False))
  thread = threading.Thread(target=server.run, kwargs={'sockets': [sock]}, daemon=True)
  thread.start()
  try:
    deadline = time.monotonic() + 120
    while not server.started:
      assert thread.is_alive() and time.monotonic() < deadline, 'the server did not start'
      time.sleep(0.05)
    yield f'http://127.0.0.1:{sock.getsockname()[1]}', server
  finally:
    server.should_exit = True
    thread.join(timeout=60)
    sock.close()


# ----------------------------------------------------------------------------------------------
# The API


def test_api_captions_equal_the_python_api(client, captioners):
  files = scene_files(6)
  for beam_size in (1, BEAM):
    response = client.post(f'/v1/captions?beam_size={beam_size}', files=multipart(files))
    assert response.status_code == 200, response.text
    payload = response.json()
    expected = captioners[beam_size].caption([data for _, data in files])
    assert [r['name'] for r in payload['results']] == [name for name, _ in files]
    assert [r['caption'] for r in payload['results']] == expected
    assert payload['model']['beam_size'] == beam_size and payload['model']['step'] == STEP
  assert len(set(expected)) > 1, 'the test images should not all get one caption'
  # JSON with base64 images (one as a data: URL) gives the same captions; the default is the beam.
  images = [{'name': name, 'data': base64.b64encode(data).decode()} for name, data in files[:3]]
  images[0]['data'] = 'data:image/png;base64,' + images[0]['data']
  response = client.post('/v1/captions', json={'images': images})
  assert response.status_code == 200, response.text
  assert [r['caption'] for r in response.json()['results']] == expected[:3]


def test_model_and_health_endpoints(client, workdir):
  model = client.get('/v1/model').json()
  assert model['workdir'] == os.path.basename(workdir) and model['step'] == STEP  # not the full path
  assert model['dataset'] == 'shapes' and model['vocab_size'] > 4
  assert model['decoding']['beam_sizes'] == [1, BEAM] and model['decoding']['default_beam_size'] == BEAM
  assert model['config']['image_size'] == 32 and model['attention'] is False
  assert model['validation'] == {}  # this workdir was never trained: no history
  health = client.get('/healthz').json()
  assert health['status'] == 'ok' and health['batching']['max_batch_size'] == 16
  page = client.get('/')
  assert page.status_code == 200 and 'id="files"' in page.text


def test_provenance_reads_the_served_steps_validation_scores(workdir, captioners, tmp_path):
  shutil.copy(os.path.join(workdir, 'config.json'), tmp_path / 'config.json')
  history = [{'epoch': 1, 'step': STEP, 'train_loss': 3.1, 'val_loss': 3.0, 'Bleu_4': 0.25, 'CIDEr': 0.5},
             {'epoch': 2, 'step': STEP + 1, 'train_loss': 2.0, 'val_loss': 2.5, 'Bleu_4': 0.3}]
  (tmp_path / 'history.json').write_text(json.dumps(history))
  model = serve.describe_model(str(tmp_path), captioners[BEAM], captioners)
  assert model['epoch'] == 1 and model['train_loss'] == 3.1
  assert model['validation'] == {'val_loss': 3.0, 'Bleu_4': 0.25, 'CIDEr': 0.5}


def test_bad_inputs_get_errors_and_the_server_keeps_serving(captioners, workdir):
  good = scene_files(1)[0]
  too_many_pixels = ('huge.png', encoded(Image.new('RGB', (1000, 1000), (200, 30, 30))))  # 1e6 pixels
  truncated = ('cut.png', good[1][:len(good[1]) // 2])
  jpeg = encoded(Image.open(io.BytesIO(good[1])).convert('RGB'), 'JPEG')
  app = serve.create_app(captioners, workdir, max_upload_mb=0.25, max_image_pixels=500_000)
  with TestClient(app, base_url=LOCAL) as client:
    # One request with good and bad files: each bad one gets its own error, the good one its caption.
    files = [good, ('empty.png', b''), ('notes.txt', b'not an image'), too_many_pixels,
             ('cut.jpg', jpeg[:len(jpeg) // 2]), truncated]
    response = client.post('/v1/captions', files=multipart(files))
    assert response.status_code == 200, response.text
    results = response.json()['results']
    assert results[0]['caption'] == captioners[BEAM].caption([good[1]])[0]
    assert [r.get('status') for r in results[1:5]] == [400, 415, 413, 415], results
    assert 'too many pixels' in results[3]['error'] and 'error' in results[5]
    # Nothing captioned: the request fails with the failures' status.
    for bad, status in ((('empty.png', b''), 400), (('notes.txt', b'hello'), 415), (too_many_pixels, 413)):
      response = client.post('/v1/captions', files=multipart([bad]))
      assert response.status_code == status, response.text
    # Refused as a whole: too large (declared, or streamed without Content-Length), malformed, options.
    noise = np.random.default_rng(0).integers(0, 256, 300_000, np.uint8).tobytes()
    assert client.post('/v1/captions', files=multipart([('big.png', noise)])).status_code == 413
    chunks = (b'{"images": ["' + b'A' * 100_000 for _ in range(3))
    response = client.post('/v1/captions', content=chunks, headers={'content-type': 'application/json'})
    assert response.status_code == 413 and 'limit' in response.json()['error']
    assert client.post('/v1/captions', files=multipart([good]), params={'beam_size': 7}).status_code == 400
    response = client.post('/v1/captions', content=b'x', headers={'content-type': 'text/plain'})
    assert response.status_code == 415
    assert client.post('/v1/captions', json={'pictures': []}).status_code == 400
    too_many = [('empty.png', b'')] * (serve.MAX_IMAGES_PER_REQUEST + 1)
    assert client.post('/v1/captions', files=multipart(too_many)).status_code == 400
    assert client.post('/v1/captions', files={'other': ('a.png', good[1])}).status_code == 400
    response = client.post('/v1/captions', json={'images': [{'name': 'x', 'data': '%%%'}]})
    assert response.status_code == 400 and 'base64' in response.json()['results'][0]['error']
    # ... and the next request is served as usual.
    response = client.post('/v1/captions', files=multipart([good]))
    assert response.status_code == 200 and response.json()['results'][0]['caption']


def test_concurrent_requests_are_captioned_together(captioners, workdir, monkeypatch):
  counting = CountingCalls(captioners[BEAM]._caption_fn)
  # A generous wait: on a busy 2-core machine the requests' uploads are spread over a while.
  app = serve.create_app(captioners, workdir, max_wait_ms=500)
  files = scene_files(12, seed=3)
  with running_server(app) as (url, _), httpx.Client(base_url=url, timeout=60) as http:
    monkeypatch.setattr(captioners[BEAM], '_caption_fn', counting)
    start = threading.Barrier(len(files))

    def post(file):
      start.wait()
      return http.post('/v1/captions', files=multipart([file]))
    with concurrent.futures.ThreadPoolExecutor(len(files)) as pool:
      responses = list(pool.map(post, files))
    stats = http.get('/healthz').json()['batching']
  monkeypatch.undo()
  assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
  expected = captioners[BEAM].caption([data for _, data in files])
  assert [r.json()['results'][0]['caption'] for r in responses] == expected
  assert counting.calls < len(files) / 2, (counting.calls, stats)
  assert stats['calls'] == counting.calls and stats['images'] == len(files)
  assert max(int(size) for size in stats['batch_sizes']) > 1


def test_nothing_recompiles_after_warm_up(client, captioners):
  functions = {beam: captioners[beam]._caption_fn for beam in captioners}
  before = {beam: fn._cache_size() for beam, fn in functions.items()}
  assert before == {1: 1, BEAM: 1}
  calls_before = client.get('/healthz').json()['batching']['calls']
  files = scene_files(20, seed=5)
  for count in (1, 7, 16, 20):  # 20 images: more than one batch
    for beam_size in (1, BEAM):
      response = client.post(f'/v1/captions?beam_size={beam_size}', files=multipart(files[:count]))
      assert response.status_code == 200
  assert {beam: fn._cache_size() for beam, fn in functions.items()} == before
  # A request's images are queued together: one call each, two for 20 images (16 + 4).
  assert client.get('/healthz').json()['batching']['calls'] - calls_before == 2 * (1 + 1 + 1 + 2)


def test_shutdown_finishes_the_requests_in_flight(captioners, workdir, monkeypatch):
  gate = threading.Event()
  held = CountingCalls(captioners[BEAM]._caption_fn, gate=gate)
  app = serve.create_app(captioners, workdir, max_wait_ms=1)
  files = scene_files(2, seed=7)
  with running_server(app) as (url, server), httpx.Client(base_url=url, timeout=60) as http:
    monkeypatch.setattr(captioners[BEAM], '_caption_fn', held)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      first = pool.submit(http.post, '/v1/captions', files=multipart(files[:1]))
      assert held.entered.wait(30)  # the first request's batch is running (and held)
      second = pool.submit(http.post, '/v1/captions', files=multipart(files[1:]))
      deadline = time.monotonic() + 30
      while app.state.batcher.stats()['queued'] < 1:  # the second one is queued behind it
        assert time.monotonic() < deadline
        time.sleep(0.02)
      server.should_exit = True  # what uvicorn's SIGTERM handler does
      while True:  # shutting down: no new connections
        try:
          httpx.get(f'{url}/healthz', timeout=5)
        except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
          break  # refused, or (on a loaded machine) accepted by the closing socket and reset
        assert time.monotonic() < deadline
        time.sleep(0.05)
      gate.set()
      responses = [first.result(), second.result()]
  monkeypatch.undo()
  assert held.calls == 2  # both batches ran
  assert [r.status_code for r in responses] == [200, 200]
  assert [r.json()['results'][0]['caption'] for r in responses] == captioners[BEAM].caption(
      [data for _, data in files])


# ----------------------------------------------------------------------------------------------
# The page, in a browser


def files_with_captions(captioner, n: int, seed: int) -> tuple[dict[str, str], list[tuple[str, bytes]]]:
  """({name: caption}, [(name, bytes)]) for `n` scenes this random model gives non-empty captions."""
  candidates = scene_files(4 * n, seed=seed)
  images = [data for _, data in candidates]
  if captioner.has_attention:  # the function the server runs (the plain one would compile as well)
    captions = [r.caption for r in captioner.caption_with_attention(images)]
  else:
    captions = captioner.caption(images)
  chosen = [(c, f) for c, f in zip(captions, candidates) if c][:n]
  assert len(chosen) == n, captions
  return {file[0]: caption for caption, file in chosen}, [file for _, file in chosen]


def write_files(files, folder) -> list[str]:
  for name, data in files:
    (folder / name).write_bytes(data)
  return [str(folder / name) for name, _ in files]


@browser.needs_chromium
def test_the_page_captions_an_uploaded_image(captioners, workdir, tmp_path):
  expected, files = files_with_captions(captioners[BEAM], 3, seed=11)
  with running_server(serve.create_app(captioners, workdir)) as (url, _), browser.chromium() as driver:
    driver.get(url)
    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#beam option'))
    driver.find_element(By.ID, 'files').send_keys('\n'.join(write_files(files, tmp_path)))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '.card')) == len(files)
               and not d.find_elements(By.CSS_SELECTOR, '.caption.pending'))
    shown = {card.find_element(By.CLASS_NAME, 'name').text: card.find_element(By.CLASS_NAME, 'caption').text
             for card in driver.find_elements(By.CSS_SELECTOR, '.card')}
    assert shown == expected
    assert 'step 1' in driver.find_element(By.ID, 'subtitle').text
    wait.until(lambda d: 'captioned in' in d.find_element(By.ID, 'stats').text)
    path = browser.save_screenshot(driver, 'serve_page', tmp_path, for_readme=True)
  assert path.stat().st_size > 10_000


# ----------------------------------------------------------------------------------------------
# An attention model: the API returns each word's weights on request, the page shows them


@pytest.fixture(scope='module')
def attention_captioners(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('serve_attention') / 'workdir'
  make_untrained_workdir(workdir, decoder='attention', attention_grid=4)
  # Greedy only (beam_size=1): one compilation keeps this part of the file short.
  return str(workdir), serve.load_captioners(str(workdir), checkpoint='latest', beam_size=1)


def test_the_api_returns_attention_weights_on_request(attention_captioners):
  workdir, captioners = attention_captioners
  files = scene_files(3, seed=2)
  expected = captioners[1].caption_with_attention([data for _, data in files])
  with TestClient(serve.create_app(captioners, workdir), base_url=LOCAL) as client:
    assert client.get('/v1/model').json()['attention'] is True
    plain = client.post('/v1/captions', files=multipart(files)).json()['results']
    detailed = client.post('/v1/captions?attention=1', files=multipart(files)).json()['results']
  assert [r['caption'] for r in plain] == [r['caption'] for r in detailed] == [e.caption for e in expected]
  assert all(set(r) == {'name', 'caption'} for r in plain)
  for result, want in zip(detailed, expected):
    assert result['words'] == want.words
    weights = np.asarray(result['attention'])
    assert weights.shape == (len(want.words), 4, 4)
    np.testing.assert_allclose(weights, want.attention, atol=1e-5)


@browser.needs_chromium
def test_the_page_shows_where_a_word_looked(attention_captioners, tmp_path):
  workdir, captioners = attention_captioners
  _, files = files_with_captions(captioners[1], 1, seed=4)
  with running_server(serve.create_app(captioners, workdir)) as (url, _), browser.chromium() as driver:
    driver.get(url)
    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#beam option'))
    driver.find_element(By.ID, 'files').send_keys(write_files(files, tmp_path)[0])
    words = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '.words button'))
    canvas = driver.find_element(By.CSS_SELECTOR, '.frame canvas')
    assert not canvas.is_displayed()
    ActionChains(driver).move_to_element(words[0]).perform()
    wait.until(lambda d: canvas.is_displayed())
    assert driver.execute_script('return [arguments[0].width, arguments[0].height]', canvas) == [4, 4]
