"""The export format (capjax/export.py, capjax/export_mode.py): a tiny trained model exported once, then
loaded by `ImageCaptioner.from_export` and by examples/caption_with_export.py (without capjax), both
giving exactly `ImageCaptioner.from_workdir`'s captions; bad export directories refused in one line;
caption and serve modes reading an export."""

import ast
import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
from safetensors import numpy as safetensors_numpy
from starlette.testclient import TestClient

from capjax import cli
from capjax import export as export_lib
from capjax import export_mode
from capjax import inference
from capjax import serve
from capjax import train as train_lib
from capjax import workdir as workdir_lib
from capjax.data import shapes
from capjax.configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, 'examples', 'caption_with_export.py')
BEAM, LENGTH_PENALTY, NO_REPEAT = 3, 0.6, 2
DECODE = {1: 'greedy', BEAM: f'beam{BEAM}'}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """One epoch of the tiny config (15 steps, validation metrics included)."""
  base = tmp_path_factory.mktemp('export')
  config = tiny.get_config()
  config.data.data_dir = str(base / 'data')
  config.train.num_epochs = 1
  workdir = str(base / 'workdir')
  train_lib.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope='module')
def export_dir(trained, tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('exports') / 'tiny')
  export_mode.export_workdir(trained, directory, checkpoint='best', beam_size=BEAM,
                             length_penalty=LENGTH_PENALTY, no_repeat_ngram=NO_REPEAT)
  return directory


@pytest.fixture(scope='module')
def images(tmp_path_factory):
  """Demo scenes as files of the kinds the preprocessing rule treats differently: PNG, a JPEG large
  enough to be decoded at a reduced DCT scale, RGBA, grayscale JPEG, 16-bit grayscale PNG."""
  folder = tmp_path_factory.mktemp('images')
  rng = np.random.default_rng(3)
  paths = []
  for i in range(7):
    image = shapes.render_example(rng, 48 if i != 1 else 160)[0]
    kind = i % 5
    path = folder / f'scene{i}.{"jpg" if kind in (1, 3) else "png"}'
    if kind == 2:
      image = image.convert('RGBA')
    elif kind == 3:
      image = image.convert('L')
    elif kind == 4:
      image = Image.fromarray(np.asarray(image.convert('L'), np.uint16) * 257)
    image.save(path)
    paths.append(str(path))
  return paths


@pytest.fixture(scope='module')
def workdir_captions(trained, images):
  return {beam: inference.ImageCaptioner.from_workdir(
      trained, checkpoint='best', beam_size=beam, length_penalty=LENGTH_PENALTY,
      no_repeat_ngram=NO_REPEAT).caption(images) for beam in DECODE}


def _copy(export_dir, tmp_path) -> str:
  copy = str(tmp_path / 'copy')
  shutil.copytree(export_dir, copy)
  return copy


def _standalone(export_dir, images, tmp_path, *args):
  """examples/caption_with_export.py run from an empty folder, PYTHONPATH cleared: capjax cannot be
  imported there (checked)."""
  folder = tmp_path / 'standalone'
  folder.mkdir(exist_ok=True)
  script = shutil.copy(EXAMPLE, folder / 'caption_with_export.py')
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  probe = subprocess.run([sys.executable, '-c', 'import capjax'], cwd=folder, env=env, capture_output=True,
                         text=True, timeout=120)
  assert probe.returncode != 0 and 'capjax' in probe.stderr, 'capjax is importable outside the checkout'
  return subprocess.run([sys.executable, str(script), export_dir, *images, *args], cwd=folder, env=env,
                        capture_output=True, text=True, timeout=600)


# ----------------------------------------------------------------------------------------------
# What the directory holds


def test_the_export_describes_itself(trained, export_dir):
  manifest = json.load(open(os.path.join(export_dir, 'manifest.json')))
  assert manifest['format'] == 'capjax-export' and manifest['format_version'] == export_lib.FORMAT_VERSION
  assert manifest['capjax']['version'] and 'commit' in manifest['capjax']
  history = workdir_lib.load_history(trained)
  step = manifest['source']['step']
  assert step == history[-1]['step']
  assert manifest['validation']['CIDEr'] == history[-1]['CIDEr']
  assert manifest['validation']['val_loss'] == history[-1]['val_loss']
  fingerprints = manifest['data']['fingerprints']
  assert fingerprints['train'].startswith('sha256:') and fingerprints['validation'].startswith('sha256:')
  assert manifest['decoding'] == {'beam_size': BEAM, 'length_penalty': LENGTH_PENALTY,
                                  'no_repeat_ngram': NO_REPEAT, 'max_len': 11}
  assert set(manifest['functions']) == set(DECODE.values())
  for function in manifest['functions'].values():
    assert function['batch'] == 'symbolic'
    assert {'cpu', 'cuda'} <= set(function['platforms'])
  assert set(manifest['files']) == set(os.listdir(export_dir)) - {'manifest.json'}
  modes = {os.stat(os.path.join(export_dir, name)).st_mode & 0o777 for name in os.listdir(export_dir)}
  assert len(modes) == 1, modes  # weights.safetensors as readable as the rest
  weights = safetensors_numpy.load_file(os.path.join(export_dir, 'weights.safetensors'))
  assert 'params/encoder/trunk/stem_conv/kernel' in weights
  assert any(name.startswith('batch_stats/') for name in weights)
  assert all(name.split('/')[0] in ('params', 'batch_stats') for name in weights)  # no optimizer state
  config = json.load(open(os.path.join(export_dir, 'config.json')))
  assert config['data']['data_dir'] == '' and config['data']['image_size'] == 32
  preprocessing = json.load(open(os.path.join(export_dir, 'preprocessing.json')))
  assert preprocessing['image_size'] == 32 and len(preprocessing['normalisation']['mean']) == 3


# ----------------------------------------------------------------------------------------------
# Parity: the two loaders against from_workdir


@pytest.mark.parametrize('beam', sorted(DECODE))
def test_from_export_gives_the_workdirs_captions(export_dir, images, workdir_captions, beam):
  captioner = inference.ImageCaptioner.from_export(export_dir, beam_size=beam)
  assert (captioner.length_penalty, captioner.no_repeat_ngram) == (LENGTH_PENALTY, NO_REPEAT)
  assert captioner.caption(images) == workdir_captions[beam]
  assert any(workdir_captions[beam]), 'every caption is empty: the comparison would prove little'


def test_from_export_defaults_to_the_exported_decoding(export_dir):
  captioner = inference.ImageCaptioner.from_export(export_dir)
  assert (captioner.beam_size, captioner.length_penalty, captioner.no_repeat_ngram) == (
      BEAM, LENGTH_PENALTY, NO_REPEAT)


def test_the_standalone_example_gives_the_workdirs_captions_without_capjax(export_dir, images,
                                                                           workdir_captions, tmp_path):
  for beam, name in DECODE.items():
    done = _standalone(export_dir, images, tmp_path, f'--function={name}')
    assert done.returncode == 0, done.stderr[-3000:]
    printed = dict(line.split('\t') for line in done.stdout.splitlines())
    assert [printed[p] for p in images] == workdir_captions[beam], name


def test_the_example_imports_only_jax_numpy_pillow_and_the_standard_library():
  tree = ast.parse(open(EXAMPLE).read())
  imported = {alias.name.split('.')[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
              for alias in node.names}
  imported |= {node.module.split('.')[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
  assert imported - set(sys.stdlib_module_names) == {'jax', 'numpy', 'PIL'}


def test_fixed_batch_sizes_when_the_batch_does_not_lower_symbolically(trained, images, workdir_captions,
                                                                     tmp_path, monkeypatch):
  real_lower = export_lib._lower  # pylint: disable=protected-access

  def symbolic_fails(jitted, specs, batch, image_size, platforms):
    if not isinstance(batch, int):
      raise ValueError('pretend this model has a part without a shape-polymorphic lowering')
    return real_lower(jitted, specs, batch, image_size, platforms)

  monkeypatch.setattr(export_lib, '_lower', symbolic_fails)
  directory = str(tmp_path / 'fixed')
  manifest = export_mode.export_workdir(trained, directory, checkpoint='best', beam_size=1,
                                        no_repeat_ngram=NO_REPEAT, platforms=('cpu',))
  greedy = manifest['functions']['greedy']
  assert greedy['batch'] == list(export_lib.FIXED_BATCH_SIZES)
  assert 'shape-polymorphic' in greedy['not_lowered']['symbolic batch']
  assert sorted(greedy['files'].values()) == sorted(f'caption_greedy.b{n}.jaxexport'
                                                    for n in export_lib.FIXED_BATCH_SIZES)
  done = _standalone(directory, images, tmp_path)  # 7 images: padded to a batch of 8
  assert done.returncode == 0, done.stderr[-3000:]
  assert [line.split('\t')[1] for line in done.stdout.splitlines()] == workdir_captions[1]


def test_a_platform_that_does_not_lower_is_left_out_and_said():
  def eigenvalues(weights, images):  # nonsymmetric eig: LAPACK on CPU, nothing jax can export for TPU
    del weights
    return jnp.linalg.eigvals(images[..., 0].astype(jnp.float32)).real, images.max()

  function = export_lib.serialize_function(eigenvalues, {}, 4, {}, platforms=('cpu', 'cuda', 'tpu'))
  assert function.platforms == ('cpu',) and function.batch == 'symbolic'
  assert set(function.dropped) == {'cuda', 'tpu'} and 'tpu' in function.dropped['tpu']


# ----------------------------------------------------------------------------------------------
# Bad export directories: one clear line each


def _tamper(directory):
  with open(os.path.join(directory, 'weights.safetensors'), 'r+b') as f:
    f.seek(-4, os.SEEK_END)
    f.write(b'\x00\x01\x02\x03')
  return 'weights.safetensors was modified'


def _remove(directory):
  os.remove(os.path.join(directory, 'vocab.json'))
  return 'vocab.json is missing'


def _newer(directory):
  path = os.path.join(directory, 'manifest.json')
  manifest = json.load(open(path))
  manifest['format_version'] = export_lib.FORMAT_VERSION + 1
  json.dump(manifest, open(path, 'w'))
  return f'format version {export_lib.FORMAT_VERSION + 1} is newer'


@pytest.mark.parametrize('damage', [_tamper, _remove, _newer])
def test_a_damaged_export_is_refused_in_one_line(export_dir, tmp_path, damage):
  copy = _copy(export_dir, tmp_path)
  expected = damage(copy)
  for load in (inference.ImageCaptioner.from_export, export_lib.load_function):
    with pytest.raises(export_lib.ExportError, match=expected) as refused:
      load(copy)
    assert len(str(refused.value).splitlines()) == 1


def test_launch_refuses_a_modified_export_in_one_line(export_dir, images, tmp_path):
  copy = _copy(export_dir, tmp_path)
  expected = _tamper(copy)
  done = subprocess.run([sys.executable, 'launch.py', '--mode=caption', f'--export_dir={copy}',
                         f'--images={images[0]}'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 1
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and expected in last and 'weights.safetensors' in last


def test_the_example_refuses_a_damaged_export_in_one_line(export_dir, images, tmp_path):
  copy = _copy(export_dir, tmp_path)
  expected = _tamper(copy)
  done = _standalone(copy, images[:1], tmp_path)
  assert done.returncode == 1 and done.stdout == ''
  assert done.stderr.strip().splitlines() == [
      f'error: {os.path.join(copy, expected)}: its sha256 differs from the one manifest.json records']


def test_a_function_exported_for_another_platform_is_refused_in_one_line(trained, images, tmp_path):
  directory = str(tmp_path / 'gpu_only')
  export_mode.export_workdir(trained, directory, checkpoint='best', beam_size=1, platforms=('cuda', 'tpu'))
  with pytest.raises(export_lib.ExportError, match='exported for cuda, tpu, but jax runs on cpu here'):
    export_lib.load_function(directory, 'greedy')
  done = _standalone(directory, images[:1], tmp_path)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines() == [
      'error: greedy was exported for cuda, tpu, but jax runs on cpu here']


def test_export_refuses_a_directory_that_is_not_empty(trained, tmp_path):
  (tmp_path / 'taken').mkdir()
  (tmp_path / 'taken' / 'notes.txt').write_text('mine')
  with pytest.raises(export_lib.ExportError, match='already exists and is not an empty directory'):
    export_mode.export_workdir(trained, str(tmp_path / 'taken'))
  assert os.listdir(tmp_path / 'taken') == ['notes.txt']


# ----------------------------------------------------------------------------------------------
# caption and serve modes read an export directory


def test_caption_mode_reads_an_export(export_dir, images, workdir_captions, capsys):
  rows = cli.caption_images(None, images[0], export_dir=export_dir, beam_size=1,
                            length_penalty=LENGTH_PENALTY, no_repeat_ngram=NO_REPEAT)
  assert rows == [{'file': images[0], 'caption': workdir_captions[1][0]}]
  assert f'{images[0]}\t{workdir_captions[1][0]}' in capsys.readouterr().out


def test_serve_reads_an_export(export_dir, images, workdir_captions):
  captioners = serve.load_captioners(None, export_dir=export_dir, beam_size=BEAM,
                                     length_penalty=LENGTH_PENALTY, no_repeat_ngram=NO_REPEAT,
                                     max_batch_size=32)
  app = serve.create_app(captioners, export_dir)
  with TestClient(app, base_url='http://127.0.0.1') as client:
    model = client.get('/v1/model').json()
    files = [('images', (os.path.basename(p), open(p, 'rb').read(), 'image/png')) for p in images[:2]]
    answer = client.post('/v1/captions?beam_size=1', files=files).json()
  assert model['workdir'] == 'tiny' and model['step'] == captioners[1].step and model['epoch'] == 1
  assert 'CIDEr' in model['validation']
  assert [r['caption'] for r in answer['results']] == workdir_captions[1][:2]
