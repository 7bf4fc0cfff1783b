"""The export format: a trained captioner as one self-describing directory, readable without capjax,
orbax or pickle. `launch.py --mode=export` writes it (capjax/export_mode.py); `ImageCaptioner.from_export`
and examples/caption_with_export.py (jax, numpy and pillow only) read it.

    manifest.json         format version, provenance, validation metrics, decode settings, the functions,
                          and the sha256 of every other file (a file whose hash differs is refused)
    config.json           the run's config (its model section rebuilds the Flax model; paths removed)
    vocab.json            the vocabulary, index -> word (capjax's vocab.json format)
    preprocessing.json    image file -> the uint8 pixels the functions take (capjax/images.py's rule)
    weights.safetensors   params and BatchNorm statistics (no optimizer state), float32, named by their
                          path in the Flax variables: 'params/encoder/trunk/stem_conv/kernel'
    caption_<setting>.jaxexport   the captioning function serialized with `jax.export`:
                          (weights {name: array}, uint8 images (b, S, S, 3)) -> (tokens (b, L) int32,
                          lengths (b,) int32); one per decode setting ('greedy', 'beam3', ...)

The functions take the weights as their first argument (the dict weights.safetensors holds) instead of
baking them in as constants: the weights are stored once, and one reading serves every function.

Batch size: symbolic first (`jax.export.symbolic_shape('b')`: one file serves every batch size). Every
part of capjax's captioners lowers symbolically today (convolutions, BatchNorm, the LSTM scan, the
decoders' `while_loop`s, beam search's reshapes by b * k, n-gram blocking's scatter). Should a future part
not (a Python branch on the batch size, an op without a shape-polymorphic lowering), the function falls
back to the fixed sizes FIXED_BATCH_SIZES, one file each ('caption_greedy.b8.jaxexport'): callers pad a
batch to the next size. The manifest says which, and why.

Platforms: lowered for cpu, cuda and tpu in one module where jax can lower each without its device
(it can, for everything here: lowering needs no accelerator); a platform that fails is left out with the
reason in the manifest. Running a function on a platform it was not lowered for is refused in one line
(`load_function`, and the example); `ImageCaptioner.from_export` rebuilds the Flax model and needs none of
the functions, so it runs on any platform.
"""

import dataclasses
import hashlib
import os

from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from safetensors import numpy as safetensors_numpy

from capjax import errors
from capjax import fileio
from capjax import vocab as vocab_lib
from capjax.models import captioner

FORMAT = 'capjax-export'
FORMAT_VERSION = 1
MANIFEST = 'manifest.json'
CONFIG = 'config.json'
VOCAB = 'vocab.json'
PREPROCESSING = 'preprocessing.json'
WEIGHTS = 'weights.safetensors'
REQUIRED = (CONFIG, VOCAB, PREPROCESSING, WEIGHTS)
PLATFORMS = ('cpu', 'cuda', 'tpu')
FIXED_BATCH_SIZES = (1, 8, 32)
SYMBOLIC = 'symbolic'
# Paths of the exporting machine: meaningless elsewhere, and they would tell every reader its layout.
_PATH_FIELDS = (('data', 'data_dir'), ('data', 'manual_dir'), ('model', 'encoder_init'),
                ('train', 'init_from'))


class ExportError(errors.CapjaxError):
  """An export directory that cannot be used: a missing or modified file, a newer format version, or a
  function that was not lowered for this machine's platform."""


# ----------------------------------------------------------------------------------------------
# Weights and the other files
# ----------------------------------------------------------------------------------------------


def flatten_variables(variables) -> dict[str, np.ndarray]:
  """{'params': {...}, 'batch_stats': {...}} -> {'params/encoder/.../kernel': array} (what is saved)."""
  flat = traverse_util.flatten_dict(jax.device_get(dict(variables)), sep='/')
  return {name: np.ascontiguousarray(value) for name, value in sorted(flat.items())}


def unflatten_variables(weights) -> dict:
  return traverse_util.unflatten_dict(dict(weights), sep='/')


def shareable_config(config: ml_collections.ConfigDict) -> dict:
  """The config as JSON, with the exporting machine's paths emptied."""
  payload = config.to_dict()
  for section, field in _PATH_FIELDS:
    if field in payload.get(section, {}):
      payload[section][field] = ''
  return payload


def preprocessing(image_size: int) -> dict:
  """How an image becomes the functions' input (capjax/images.py `load_image` + `resize_image`); the
  ImageNet normalisation happens inside the functions, on the uint8 pixels."""
  size = int(image_size)
  return {
      'image_size': size,
      'input': {'dtype': 'uint8', 'shape': ['batch', size, size, 3], 'channels': 'RGB'},
      'decode': f"PIL Image.open; a JPEG is decoded with Image.draft('RGB', ({size}, {size})) first "
                f'(a DCT-domain downscale that keeps each side >= {size})',
      'to_rgb': {'RGB': 'as is',
                 'RGBA, LA, PA, RGBa, La, P with a transparent colour': 'composited on opaque white',
                 'I;16, I (16/32-bit integer grayscale)': 'value / 257, rounded, clipped to 0..255',
                 'F (float)': 'x 255 when the maximum is <= 1, + 0.5, clipped to 0..255, truncated',
                 'any other mode': "PIL convert('RGB')"},
      'resize': {'method': f'PIL Image.resize(({size}, {size}), Image.BILINEAR)',
                 'aspect': 'stretched to a square, not cropped'},
      'normalisation': {'where': 'inside the exported function (pass uint8 pixels)',
                        'formula': '(float32(pixel) - mean) / std, per RGB channel, 0..255 scale',
                        'mean': [float(m) for m in captioner.IMAGENET_MEAN],
                        'std': [float(s) for s in captioner.IMAGENET_STD]},
  }


def sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Serializing a captioning function
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SerializedFunction:
  """A captioning function ready to write: `files` maps a batch key ('b', or a fixed size) to the bytes
  of `jax.export`'s serialization. `dropped`: {platform or 'symbolic batch': why it was not used}."""
  settings: dict
  batch: str | list[int]
  platforms: tuple[str, ...]
  files: dict[str, bytes]
  dropped: dict[str, str]


def _lower(jitted, weight_specs, batch, image_size: int, platforms) -> jax.export.Exported:
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.uint8)
  return jax.export.export(jitted, platforms=tuple(platforms))(weight_specs, images)


def _lower_where_possible(lower, platforms):
  """(Exported or None, the platforms it was lowered for, {platform: why not}): all platforms at once,
  else each alone to find the ones that fail, then the rest together."""
  try:
    return lower(platforms), tuple(platforms), {}
  except Exception as e:  # pylint: disable=broad-except  (lowering raises many kinds)
    if len(platforms) == 1:
      return None, (), {platforms[0]: _first_line(e)}
  works, dropped = [], {}
  for platform in platforms:
    try:
      lower((platform,))
      works.append(platform)
    except Exception as e:  # pylint: disable=broad-except
      dropped[platform] = _first_line(e)
  return (lower(tuple(works)) if works else None), tuple(works), dropped


def serialize_function(fn, weights, image_size: int, settings: dict, *,
                       platforms=PLATFORMS) -> SerializedFunction:
  """`fn(weights, images) -> (tokens, lengths)` serialized for a symbolic batch size, else for
  FIXED_BATCH_SIZES (see the module docstring), for each of `platforms` that lowers."""
  specs = {name: jax.ShapeDtypeStruct(np.shape(value), np.asarray(value).dtype)
           for name, value in weights.items()}
  jitted = jax.jit(fn)
  symbolic = jax.export.symbolic_shape('b')[0]
  exported, works, dropped = _lower_where_possible(
      lambda on: _lower(jitted, specs, symbolic, image_size, on), tuple(platforms))
  if exported is not None:
    return SerializedFunction(dict(settings), SYMBOLIC, works, {'b': exported.serialize()}, dropped)
  why_fixed = '; '.join(f'{p}: {reason}' for p, reason in dropped.items())
  first, works, dropped = _lower_where_possible(
      lambda on: _lower(jitted, specs, FIXED_BATCH_SIZES[0], image_size, on), tuple(platforms))
  if first is None:
    raise ExportError(f'the captioning function lowers for none of {list(platforms)}: {dropped}')
  files = {str(FIXED_BATCH_SIZES[0]): first.serialize()}
  for size in FIXED_BATCH_SIZES[1:]:
    files[str(size)] = _lower(jitted, specs, size, image_size, works).serialize()
  return SerializedFunction(dict(settings), list(FIXED_BATCH_SIZES), works, files,
                            {**dropped, 'symbolic batch': why_fixed})


def function_file(name: str, key: str) -> str:
  return f'caption_{name}.jaxexport' if key == 'b' else f'caption_{name}.b{key}.jaxexport'


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def write(directory: str, *, config: ml_collections.ConfigDict, vocab: vocab_lib.Vocabulary, variables,
          functions: dict[str, SerializedFunction], manifest: dict) -> dict:
  """Writes the export into `directory` (which must not exist, or be empty), all files into a temporary
  folder beside it first, renamed when complete. `manifest`: the provenance fields; the format, the
  functions and the file hashes are added here. Returns the manifest written."""
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
    raise ExportError(f'--export_dir={directory} already exists and is not an empty directory; '
                      'choose a new one (an export is never overwritten)')
  os.makedirs(os.path.dirname(directory), exist_ok=True)
  staging = f'{directory}.partial{os.getpid()}'
  if os.path.exists(staging):
    _remove_tree(staging)
  os.makedirs(staging)
  try:
    weights = flatten_variables(variables)
    safetensors_numpy.save_file(weights, os.path.join(staging, WEIGHTS),
                                metadata={'format': FORMAT, 'format_version': str(FORMAT_VERSION)})
    fileio.write_json(os.path.join(staging, CONFIG), shareable_config(config))
    # safetensors creates its file readable by its owner only: give it the mode every other file gets.
    os.chmod(os.path.join(staging, WEIGHTS), os.stat(os.path.join(staging, CONFIG)).st_mode & 0o777)
    vocab.save(os.path.join(staging, VOCAB))
    fileio.write_json(os.path.join(staging, PREPROCESSING), preprocessing(config.data.image_size))
    entries = {}
    for name, function in functions.items():
      files = {}
      for key, data in function.files.items():
        files[key] = function_file(name, key)
        fileio.write_atomically(os.path.join(staging, files[key]), lambda f, d=data: f.write(d), binary=True)
      entries[name] = {**function.settings, 'batch': function.batch, 'platforms': list(function.platforms),
                       'not_lowered': function.dropped, 'files': files}
    hashes = {name: {'sha256': sha256_file(os.path.join(staging, name)),
                     'bytes': os.path.getsize(os.path.join(staging, name))}
              for name in sorted(os.listdir(staging))}
    written = {'format': FORMAT, 'format_version': FORMAT_VERSION, **manifest,
               'parameters': int(sum(w.size for n, w in weights.items() if n.startswith('params/'))),
               'functions': entries, 'files': hashes}
    fileio.write_json(os.path.join(staging, MANIFEST), written)
    if os.path.isdir(directory):
      os.rmdir(directory)
    os.rename(staging, directory)
  finally:
    if os.path.exists(staging):
      _remove_tree(staging)
  return written


def _remove_tree(path: str) -> None:
  for name in os.listdir(path):
    os.remove(os.path.join(path, name))
  os.rmdir(path)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Export:
  """A verified export: `variables` {'params', 'batch_stats'} as numpy arrays."""
  directory: str
  manifest: dict
  config: ml_collections.ConfigDict
  vocab: vocab_lib.Vocabulary
  variables: dict


def is_export(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, MANIFEST))


def read_manifest(directory: str) -> dict:
  """The manifest, refused when it is missing, not an export's, or of a newer format version."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    raise ExportError(f'{path} not found: {directory} is not a capjax export directory (launch.py '
                      '--mode=export writes one)')
  try:
    manifest = fileio.read_json(path)
  except (OSError, ValueError) as e:
    raise ExportError(f'{path}: expected the JSON manifest of a capjax export ({e})') from None
  if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
    raise ExportError(f'{path}: expected "format": "{FORMAT}"; this is not a capjax export manifest')
  version = manifest.get('format_version')
  if not isinstance(version, int) or version > FORMAT_VERSION:
    raise ExportError(f'{path}: format version {version!r} is newer than this capjax reads '
                      f'({FORMAT_VERSION}); install a newer capjax to load this export')
  return manifest


def verify(directory: str) -> dict:
  """`read_manifest`, then every file it lists: present, and with the sha256 it records."""
  manifest = read_manifest(directory)
  files = manifest.get('files')
  if not isinstance(files, dict) or any(name not in files for name in REQUIRED):
    raise ExportError(f'{os.path.join(directory, MANIFEST)}: expected "files" to list '
                      f'{", ".join(REQUIRED)} with their sha256')
  for name, entry in sorted(files.items()):
    path = os.path.join(directory, name)
    if os.path.basename(name) != name or name in ('', '.', '..'):
      raise ExportError(f'{os.path.join(directory, MANIFEST)}: file name {name!r} is not a plain name')
    if not os.path.isfile(path):
      raise ExportError(f'{path} is missing: manifest.json lists it (sha256 {entry["sha256"][:16]}...); '
                        'copy the whole export directory')
    actual = sha256_file(path)
    if actual != entry['sha256']:
      raise ExportError(f'{path} was modified: its sha256 is {actual[:16]}..., manifest.json expects '
                        f'{entry["sha256"][:16]}...; copy the export again or export it again')
  return manifest


def read(directory: str) -> Export:
  """The verified export's manifest, config, vocabulary and variables (no function is deserialized)."""
  manifest = verify(directory)
  config = ml_collections.ConfigDict(fileio.read_json(os.path.join(directory, CONFIG)))
  config.model.stage_sizes = tuple(config.model.stage_sizes)
  try:
    vocab = vocab_lib.Vocabulary.load(os.path.join(directory, VOCAB))
  except ValueError as e:
    raise ExportError(str(e)) from None
  weights = safetensors_numpy.load_file(os.path.join(directory, WEIGHTS))
  return Export(os.path.abspath(directory), manifest, config, vocab, unflatten_variables(weights))


def check_variables(loaded: Export, expected_shapes) -> None:
  """ExportError unless the weights are exactly the arrays (names, shapes, dtypes) of the model the
  config builds."""
  want = {name: (tuple(leaf.shape), np.dtype(leaf.dtype))
          for name, leaf in traverse_util.flatten_dict(dict(expected_shapes), sep='/').items()}
  have = {name: (tuple(leaf.shape), leaf.dtype) for name, leaf in flatten_variables(loaded.variables).items()}
  if want != have:
    differ = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    raise ExportError(f'{os.path.join(loaded.directory, WEIGHTS)}: expected the arrays of the model '
                      f'config.json builds; {len(differ)} differ, e.g. {differ[:3]}')


def load_function(directory: str, name: str = 'greedy') -> tuple[dict, dict[str, jax.export.Exported]]:
  """(its manifest entry, {batch key: Exported}) of a verified export's function `name`, refused in one
  line when it was not lowered for the platform jax runs on here."""
  manifest = verify(directory)
  functions = manifest.get('functions', {})
  if name not in functions:
    raise ExportError(f'{os.path.join(directory, MANIFEST)} has no function {name!r}; it has '
                      f'{sorted(functions)}')
  entry = functions[name]
  here = jax.export.default_export_platform()
  if here not in entry['platforms']:
    raise ExportError(f"{os.path.join(directory, next(iter(entry['files'].values())))}: exported for "
                      f"{', '.join(entry['platforms'])}, but jax runs on {here} here; export again with "
                      f'{here} among the platforms, or load it with ImageCaptioner.from_export')
  exported = {}
  for key, file in entry['files'].items():
    with open(os.path.join(directory, file), 'rb') as f:
      exported[key] = jax.export.deserialize(bytearray(f.read()))
  return entry, exported


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}"
