"""launch.py --mode=export: a workdir's checkpoint -> an export directory (capjax/export.py's format), with
its provenance: the capjax version and commit, the data fingerprints and the validation metrics of the
exported step, and the decode settings of the serialized functions.

  python launch.py --mode=export --workdir=W --export_dir=E [--checkpoint_step=best] [--beam_size=3]
"""

import datetime
import math
import os
import time

import jax
import jax.numpy as jnp

import capjax
from capjax import checkpointing
from capjax import errors
from capjax import export as export_lib
from capjax import fileio
from capjax import inference
from capjax import mesh as mesh_lib
from capjax import progress
from capjax import vocab as vocab_lib
from capjax import workdir as workdir_lib
from capjax.data import prepare
from capjax.evaluation import provenance


def caption_lengths(tokens: jax.Array) -> jax.Array:
  """int32 (N,): the tokens before each row's first <END> (the row's length without one)."""
  is_end = tokens == vocab_lib.END_ID
  return jnp.where(jnp.any(is_end, axis=1), jnp.argmax(is_end, axis=1), tokens.shape[1]).astype(jnp.int32)


def caption_function(model, *, max_len: int, beam_size: int, length_penalty: float, no_repeat_ngram: int):
  """The function an export serializes: (weights {name: array}, uint8 images (N, S, S, 3)) ->
  (tokens (N, max_len) int32, lengths (N,) int32), `inference.generate_tokens` on the Flax model."""

  def caption(weights, images):
    tokens = inference.generate_tokens(model, export_lib.unflatten_variables(weights), images,
                                       max_len=max_len, beam_size=beam_size, length_penalty=length_penalty,
                                       no_repeat_ngram=no_repeat_ngram)
    return tokens, caption_lengths(tokens)
  return caption


def decode_settings(*, max_len: int, beam_size: int, length_penalty: float,
                    no_repeat_ngram: int) -> dict[str, dict]:
  """{function name: settings}: greedy always, and the beam search asked for (beam_size > 1)."""
  settings = {'greedy': dict(max_len=max_len, beam_size=1, length_penalty=0.0,
                             no_repeat_ngram=no_repeat_ngram)}
  if beam_size > 1:
    settings[f'beam{beam_size}'] = dict(max_len=max_len, beam_size=beam_size,
                                        length_penalty=float(length_penalty), no_repeat_ngram=no_repeat_ngram)
  return settings


def export_workdir(workdir: str, export_dir: str, *, checkpoint: str | int = 'best', beam_size: int = 3,
                   length_penalty: float = 0.0, no_repeat_ngram: int = 0,
                   platforms=export_lib.PLATFORMS) -> dict:
  """Writes the export of `workdir`'s checkpoint (`checkpoint`: 'best', 'latest' or a step) into
  `export_dir`; returns the manifest written."""
  if not export_dir:
    raise errors.InputError('--export_dir is required in export mode (the directory to write)')
  if beam_size < 1 or no_repeat_ngram < 0:
    raise errors.InputError(f'--beam_size={beam_size} must be >= 1 and --no_repeat_ngram={no_repeat_ngram} '
                            '>= 0')
  if os.path.exists(export_dir) and (not os.path.isdir(export_dir) or os.listdir(export_dir)):
    raise export_lib.ExportError(f'--export_dir={export_dir} already exists and is not an empty '
                                 'directory; choose a new one (an export is never overwritten)')
  start = time.perf_counter()
  config, vocab, model, variables, step = inference.restore_variables(workdir, checkpoint,
                                                                      mesh_lib.make_mesh())
  max_len = config.data.max_caption_len - 1
  settings = decode_settings(max_len=max_len, beam_size=beam_size, length_penalty=length_penalty,
                             no_repeat_ngram=no_repeat_ngram)
  weights = export_lib.flatten_variables(variables)
  functions = {}
  for name, setting in settings.items():
    function = caption_function(model, **setting)
    functions[name] = export_lib.serialize_function(function, weights, config.data.image_size, setting,
                                                    platforms=platforms)
    for what, why in functions[name].dropped.items():
      progress.say(f'{name}: not lowered for {what} ({why})')
  described = _provenance(workdir, config, vocab, checkpoint, step)
  described['decoding'] = {'beam_size': beam_size, 'length_penalty': float(length_penalty),
                           'no_repeat_ngram': no_repeat_ngram, 'max_len': max_len}
  manifest = export_lib.write(export_dir, config=config, vocab=vocab, variables=variables,
                              functions=functions, manifest=described)
  first = next(iter(manifest['functions'].values()))
  batch = first['batch'] if first['batch'] == export_lib.SYMBOLIC else f"sizes {first['batch']}"
  total = sum(f['bytes'] for f in manifest['files'].values())
  progress.say(f"Exported step {step} of {workdir} to {export_dir} in {time.perf_counter() - start:.1f} s: "
               f"{len(manifest['files']) + 1} files, {total / 2**20:.1f} MiB; functions "
               f"{', '.join(manifest['functions'])} for {', '.join(first['platforms'])}, batch {batch}.")
  return manifest


def _provenance(workdir: str, config, vocab, requested, step: int) -> dict:
  commit, dirty = provenance.capjax_checkout()
  return {
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'capjax': {'version': capjax.__version__, 'commit': commit, 'dirty': dirty},
      'versions': {p: provenance.package_version(p) for p in ('jax', 'jaxlib', 'flax')},
      'source': {'workdir': os.path.basename(os.path.abspath(workdir)), 'step': int(step),
                 'epoch': next((h.get('epoch') for h in workdir_lib.load_history(workdir)
                                if h.get('step') == step), None),
                 'checkpoint': provenance.checkpoint_choice(workdir, config, requested, step)},
      'model': {'description': provenance.model_description(config.model),
                'decoder': config.model.get('decoder', 'seed'), 'vocab_size': len(vocab),
                'image_size': config.data.image_size, 'max_caption_len': config.data.max_caption_len},
      'data': _data_facts(config),
      'validation': validation_metrics(workdir, step),
  }


def validation_metrics(workdir: str, step: int) -> dict:
  """The exported step's epoch record in history.json (finite numbers: val_loss, BLEU, CIDEr, ...), else
  what the checkpoint directory's metrics file holds for it; {} when neither has it."""
  record = next((h for h in workdir_lib.load_history(workdir) if h.get('step') == step), None)
  if record is None:
    path = os.path.join(workdir_lib.checkpoint_dir(workdir), checkpointing.METRICS_FILE)
    record = fileio.read_json(path).get(str(step), {}) if os.path.exists(path) else {}
  return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
          and math.isfinite(v) and k not in ('epoch', 'step')}


def _data_facts(config) -> dict:
  """The dataset and the fingerprints of its training and validation splits (provenance's
  `split_fingerprint`: the images' ids, references and stored size), when the prepared data is here."""
  facts = {'dataset': config.data.name}
  try:
    splits = prepare.open_dataset(config.data, build_demo=False)
  except (FileNotFoundError, ValueError) as e:
    return {**facts, 'fingerprints': None,
            'note': f'the prepared data was not found: {str(e).splitlines()[0]}'}
  facts['images'] = {split: len(source) for split, source in splits.items()}
  facts['fingerprints'] = {split: provenance.split_fingerprint(config, splits[split], split)
                           for split in ('train', 'validation')}
  return facts
