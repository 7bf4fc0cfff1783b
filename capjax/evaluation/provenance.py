"""Provenance: what an evaluation's numbers depend on, so that a reader can tell why two numbers differ
(the code's commit, the package versions, the data, the checkpoint and how it was chosen, the decoding)."""

import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys

import jax

from capjax import checkpointing
from capjax import fileio
from capjax import workdir as workdir_lib
from capjax.data import builder as builder_lib
from capjax.data import records as records_lib
from capjax.evaluation import captioning

_VERSIONED_PACKAGES = ('jax', 'jaxlib', 'flax', 'pycocoevalcap', 'nltk')


@dataclasses.dataclass(frozen=True)
class Provenance:
  """Flat and JSON-ready (`as_dict()`), in the order the report lists it.

  checkpoint_choice: how the step was picked, in words. dataset_config: the tfds name/config/version.
  images: evaluated; split_images: in the split. data_fingerprint: 'sha256:' + 16 hex digits over the
  evaluated images' ids and reference captions and the split's stored size in bytes (equal fingerprints
  mean the same evaluation data). decoding: in words. tokenizer: filled in by the analysis, from the
  scorer. java: 'absent' or its version line. seed: config.seed, the training seed (decoding is
  deterministic). examples_seed: draws the report's random examples. capjax_commit and capjax_dirty:
  None when capjax is not run from a git checkout; dirty: uncommitted changes, new files included,
  under capjax/, configs/ or launch.py. created: UTC.
  """
  workdir: str
  model: str
  checkpoint_step: int
  checkpoint_choice: str
  split: str
  dataset: str
  dataset_config: str | None
  dataset_layout: str | None
  data_dir: str | None
  images: int
  split_images: int
  data_fingerprint: str
  decoding: str
  beam_size: int
  length_penalty: float
  no_repeat_ngram: int
  max_len: int
  tokenizer: str | None
  java: str
  seed: int | None
  examples_seed: int
  capjax_commit: str | None
  capjax_dirty: bool | None
  python: str
  jax: str | None
  jaxlib: str | None
  flax: str | None
  pycocoevalcap: str | None
  nltk: str | None
  devices: str
  command: str | None
  created: str

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)

  def line(self) -> str:
    """The provenance in one line, printed under the metrics table."""
    commit = (f"{self.capjax_commit[:10]}{' (dirty)' if self.capjax_dirty else ''}" if self.capjax_commit
              else 'not a git checkout')
    versions = f'jax {self.jax} flax {self.flax} pycocoevalcap {self.pycocoevalcap}'
    tokenizer = (self.tokenizer or '?').split(' (')[0]
    return (f"capjax {commit}; {versions}; {self.dataset_config or self.dataset} {self.split}, "
            f"{self.images} images, data {self.data_fingerprint}; checkpoint {self.checkpoint_step}, "
            f"{self.checkpoint_choice}; {self.decoding}; tokenizer {tokenizer}; java "
            f"{'absent' if self.java == 'absent' else 'present'}; seed {self.seed}")


def collect(config, *, workdir: str, split: str, source, captioned, step: int, checkpoint_choice: str,
            decode: captioning.DecodeSettings, examples_seed: int) -> Provenance:
  """The provenance of captions of `split` (a record source) decoded from checkpoint `step`."""
  data = _dataset_facts(config, source, split)
  commit, dirty = capjax_checkout()
  return Provenance(
      workdir=os.path.abspath(workdir), model=model_description(config.model), checkpoint_step=int(step),
      checkpoint_choice=checkpoint_choice, split=split, dataset=config.data.name,
      dataset_config=data['config'], dataset_layout=data['layout'], data_dir=data['dir'],
      images=len(captioned), split_images=len(source),
      data_fingerprint=data_fingerprint([(c.image_id, c.references) for c in captioned], data['split_bytes']),
      decoding=decode.describe(), beam_size=decode.beam_size, length_penalty=decode.length_penalty,
      no_repeat_ngram=decode.no_repeat_ngram, max_len=decode.max_len, tokenizer=None, java=java_version(),
      seed=config.get('seed'), examples_seed=examples_seed, capjax_commit=commit, capjax_dirty=dirty,
      python=platform.python_version(), **{p: package_version(p) for p in _VERSIONED_PACKAGES},
      devices=f'{jax.device_count()} x {jax.devices()[0].device_kind}',
      command=shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]]) if sys.argv else None,
      created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'))


def model_description(model_config) -> str:
  return (f"{model_config.get('decoder', 'seed')} decoder, ResNet stages {tuple(model_config.stage_sizes)} "
          f"width {model_config.width}, embed {model_config.embed_dim}, hidden {model_config.hidden_size}, "
          f"encoder {model_config.encoder_mode}, {model_config.dtype}")


def data_fingerprint(images, split_bytes: int | None = None) -> str:
  """images: (image id, reference captions) pairs, in evaluation order."""
  digest = hashlib.sha256()
  for image_id, references in images:
    digest.update(json.dumps([image_id, list(references)], ensure_ascii=False).encode() + b'\n')
  if split_bytes:  # the stored images too, by size: a re-encoded copy of the same captions differs
    digest.update(f'split_bytes={split_bytes}'.encode())
  return 'sha256:' + digest.hexdigest()[:16]


def split_fingerprint(config, source, split: str) -> str:
  """`data_fingerprint` of a whole split, read from its records (the images' bytes are not decoded)."""
  images = [(records_lib.as_text(source[i]['image_id']), records_lib.record_captions(source[i]))
            for i in range(len(source))]
  return data_fingerprint(images, _dataset_facts(config, source, split)['split_bytes'])


def _dataset_facts(config, source, split: str) -> dict:
  """The tfds config, folder, layout and stored bytes of a prepared split (None for in-memory sources)."""
  facts = {'config': None, 'dir': None, 'layout': None, 'split_bytes': None}
  info = getattr(source, 'dataset_info', None)
  if info is not None:
    facts.update(config=info.full_name, dir=os.fspath(info.data_dir))
    if split in info.splits:
      facts['split_bytes'] = int(info.splits[split].num_bytes)
    summary = os.path.join(facts['dir'], builder_lib.SUMMARY_FILE)
    if os.path.exists(summary):
      facts['layout'] = fileio.read_json(summary).get('layout')
  if facts['layout'] is None:
    facts['layout'] = 'shapes' if config.data.name == builder_lib.SHAPES else f'{config.data.layout} (config)'
  return facts


def capjax_checkout() -> tuple[str | None, bool | None]:
  """(HEAD commit, dirty) of the git checkout capjax runs from; (None, None) for an installed copy, a
  checkout without git, or capjax inside someone else's repository."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

  def git(*args: str) -> str:
    return subprocess.run(['git', '-C', root, *args], capture_output=True, text=True, timeout=30,
                          check=True).stdout.strip()

  try:
    if os.path.realpath(git('rev-parse', '--show-toplevel')) != os.path.realpath(root):
      return None, None
    changes = git('status', '--porcelain', '--untracked-files=all', '--', 'capjax', 'configs', 'launch.py')
    return git('rev-parse', 'HEAD'), bool(changes)
  except (OSError, subprocess.SubprocessError):
    return None, None


def java_version() -> str:
  """'absent', or the first line `java -version` prints (METEOR and the PTB tokenizer need Java)."""
  if shutil.which('java') is None:
    return 'absent'
  try:
    done = subprocess.run(['java', '-version'], capture_output=True, text=True, timeout=60, check=False)
  except (OSError, subprocess.SubprocessError) as e:
    return f'present but failing ({type(e).__name__})'
  first = (done.stderr or done.stdout).strip().splitlines()
  return first[0] if first and not done.returncode else f'present but failing (exit {done.returncode})'


def package_version(name: str) -> str | None:
  """The installed version of a distribution, or None when it is not installed."""
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def checkpoint_choice(workdir: str, config, requested: str | int, step: int) -> str:
  """How `inference.restore_variables(workdir, requested, ...)` came to restore `step`, in words."""
  if requested not in ('best', 'latest'):
    return f'explicit (--checkpoint_step={requested})'
  checkpointer = checkpointing.Checkpointer(
      workdir_lib.checkpoint_dir(workdir), best_metric=config.train.best_metric,
      best_mode=config.train.best_mode, read_only=True)
  try:
    latest, best = checkpointer.latest_step(), checkpointer.best_step()
  finally:
    checkpointer.close()
  metric = config.train.best_metric
  if requested == 'best' and metric and best is not None:
    if step != best:  # restore_variables fell back, or a training run still going saved a new best
      return f'not the best by {_metric_name(metric)} (step {best}, which failed to restore or is newer)'
    value = next((h.get(metric) for h in workdir_lib.load_history(workdir) if h.get('step') == step), None)
    return f"best by {_metric_name(metric)}{f': {value:.4f}' if isinstance(value, (int, float)) else ''}"
  why = ('' if requested == 'latest' else
         f"; --checkpoint_step=best, but no checkpoint has a recorded {metric or 'train.best_metric'}")
  if step == latest:
    return 'latest' + why
  return f'latest that restored (step {latest} failed to restore or is newer)' + why


def _metric_name(metric: str) -> str:
  return metric if metric.endswith('_loss') else f'validation {metric}'
