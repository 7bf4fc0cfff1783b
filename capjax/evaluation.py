"""Evaluation: held-out loss, captioning a split and scoring it with the coco-caption metrics, and
the files an evaluation writes: a JSON record (metrics, provenance, per-image scores, collapse detectors,
every caption), an HTML report (`capjax.report`) and a PNG grid of captioned images, with the decoding
in their names (`eval_test_248_greedy`, `eval_test_248_beam3_lp0.6_nr3`), and side-by-side comparisons
of two workdirs.
"""

from collections import Counter
from collections.abc import Mapping, Sequence
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import textwrap

import jax
from matplotlib.figure import Figure
import numpy as np

from capjax import caption_analysis
from capjax import checkpointing
from capjax import content_score
from capjax import errors

from capjax import fileio
from capjax import images as images_lib
from capjax import inference
from capjax import input_pipeline
from capjax import mesh as mesh_lib
from capjax import metrics as metrics_lib
from capjax import report as report_lib
from capjax import reporting
from capjax import vocab as vocab_lib
from capjax import workdir as workdir_lib
from capjax.data import builder as builder_lib
from capjax.data import prepare


@dataclasses.dataclass(frozen=True)
class SplitLoss:
  """A split's teacher-forced loss: the mean over every real target token, and its sums per target word
  (vectors indexed by token id) for reading the loss word by word."""
  mean: float
  word_loss_sum: np.ndarray
  word_count: np.ndarray

  def by_word_class(self, vocab: vocab_lib.Vocabulary,
                    word_classes: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Mean loss over the targets that are words of each class, and over all 'other' targets (<END>
    included); classes none of whose words occur as targets are left out."""
    index = {w: i for i, w in enumerate(vocab.words)}
    in_class = np.zeros(len(self.word_count), bool)
    losses = {}
    for name, words in word_classes.items():
      ids = [index[w] for w in words if w in index]
      in_class[ids] = True
      count = self.word_count[ids].sum()
      if count:
        losses[name] = float(self.word_loss_sum[ids].sum() / count)
    other_count = self.word_count[~in_class].sum()
    if other_count:
      losses['other'] = float(self.word_loss_sum[~in_class].sum() / other_count)
    return losses


def split_loss(eval_fn, state, source, vocab, pipeline: input_pipeline.PipelineConfig, *,
               batch_size: int, mesh) -> SplitLoss:
  """Next-token loss over every (image, caption) pair of `source` (images or cached features, as
  `pipeline.from_features` says); `eval_fn` is `state.compile_eval_step(...)`."""
  batches = input_pipeline.eval_pair_batches(
      source, vocab, pipeline,
      host_batch_size=mesh_lib.per_host_batch_size(batch_size, mesh, 'eval_batch_size'),
      process_index=jax.process_index(), process_count=jax.process_count())
  totals = [eval_fn(state, batch)
            for batch, _ in mesh_lib.prefetch_to_mesh(((b, None) for b in batches), mesh)]
  totals = jax.device_get(totals)
  loss_sum = sum(float(t['loss_sum']) for t in totals)
  tokens = sum(float(t['tokens']) for t in totals)
  empty = [np.zeros(len(vocab))]  # a split with no pairs: no words either
  word_loss_sum = np.sum([np.asarray(t['word_loss_sum'], np.float64) for t in totals] or empty, axis=0)
  word_count = np.sum([np.asarray(t['word_count'], np.float64) for t in totals] or empty, axis=0)
  return SplitLoss(mean=loss_sum / max(tokens, 1.0), word_loss_sum=word_loss_sum, word_count=word_count)


def score_captions(results: list[dict], metrics=('bleu', 'meteor', 'rouge', 'cider')) -> dict:
  candidates = {str(r['index']): r['caption'] for r in results}
  references = {str(r['index']): r['references'] for r in results}
  return metrics_lib.compute_caption_metrics(candidates, references, metrics=metrics)


def caption_split(model, state, vocab, source, mesh, config, *, max_images: int | None = None,
                  with_attention: bool = False) -> list[dict]:
  """Greedy captions of a split by the model in a train state (see `inference.caption_source`); with
  `with_attention` (attention models), each result also carries its words' attention maps."""
  caption_fn = inference.make_caption_fn(model, mesh, max_len=config.data.max_caption_len - 1,
                                         return_attention=with_attention and model.has_attention)
  return inference.caption_source(caption_fn, state.variables, source, vocab, mesh,
                                   image_size=config.data.image_size,
                                   batch_size=config.train.eval_batch_size, max_images=max_images)


def caption_metrics_for_split(model, state, vocab, source, mesh, config, *, metrics=('bleu', 'cider'),
                              max_images: int | None = None) -> dict:
  """Greedy captions for a split during training, scored."""
  return score_captions(caption_split(model, state, vocab, source, mesh, config, max_images=max_images),
                        metrics)


def most_common_caption_baseline(train_captions: Sequence[str], results: list[dict]) -> tuple[dict, str]:
  """The trivial captioner, the most frequent training caption (`training_captions`) for every image:
  (scores, caption)."""
  counts = Counter(train_captions)
  caption = counts.most_common(1)[0][0].lower()
  return score_captions([{**r, 'caption': caption} for r in results], ('bleu', 'cider')), caption


def save_caption_grid(results: list[dict], source, path: str) -> None:
  """The first 12 images with the generated caption and one reference underneath, like the seed's."""
  image_size, columns = 160, 4
  shown = results[:3 * columns]
  rows = max(1, -(-len(shown) // columns))
  fig = Figure(figsize=(3.2 * columns, 3.9 * rows))
  axes = fig.subplots(rows, columns, squeeze=False)
  for ax in axes.flat:
    ax.axis('off')
  for ax, result in zip(axes.flat, shown):
    image = input_pipeline.record_image(source[result['index']], image_size)
    ax.imshow(images_lib.resize_image(image, image_size))
    text = (f"model: {textwrap.fill(result['caption'], 34)}\n"
            f"ref: {textwrap.fill(result['references'][0], 34)}")
    ax.set_title(text, fontsize=8, loc='left')
  fig.tight_layout()
  fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------------------------
# The evaluation report: what `--mode=eval` and the demo's final report write
# ----------------------------------------------------------------------------------------------

FORMAT = 'capjax-evaluation/1'
COMPARISON_FORMAT = 'capjax-comparison/1'
DEFAULT_METRICS = ('bleu', 'meteor', 'rouge', 'cider')
EXAMPLES_PER_SECTION = 8  # best, worst and random images shown in the HTML report
SECTION_SEED = 0  # draws the report's random examples, so two runs show the same images
THUMBNAIL_SIDE = 128
_VERSIONED_PACKAGES = ('jax', 'jaxlib', 'flax', 'pycocoevalcap', 'nltk')
_TOKENIZERS = {'ptb': 'PTB (Stanford PTBTokenizer via Java, as coco-caption)',
               'python': 'python imitation of PTB (Java missing or failing; scores may differ slightly)'}


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  """How the captions of an evaluation were decoded; `slug()` goes into its file names, so that a beam
  search never overwrites the greedy evaluation of the same checkpoint."""
  beam_size: int = 1
  length_penalty: float = 0.0
  no_repeat_ngram: int = 0
  max_len: int = 0  # decoded tokens after <START>, <END> included

  def slug(self) -> str:
    """'greedy', 'beam3', 'beam3_lp0.6_nr3', ..."""
    parts = ['greedy' if self.beam_size <= 1 else f'beam{self.beam_size}']
    if self.length_penalty and self.beam_size > 1:  # greedy decoding has no use for a length penalty
      parts.append(f'lp{self.length_penalty:g}')
    if self.no_repeat_ngram:
      parts.append(f'nr{self.no_repeat_ngram}')
    return '_'.join(parts)

  def describe(self) -> str:
    text = 'greedy' if self.beam_size <= 1 else (f'beam search, {self.beam_size} beams, length penalty '
                                                 f'{self.length_penalty:g}')
    text += f', no repeated {self.no_repeat_ngram}-grams' if self.no_repeat_ngram else ', no n-gram blocking'
    return text + (f', at most {self.max_len} tokens' if self.max_len else '')


@dataclasses.dataclass
class Evaluation:
  """One evaluation: `record` is what the JSON holds (schema: `analyse`; its 'files' are the names the
  JSON, HTML and PNG are written under), `page` what the HTML report renders (`capjax.report`'s payload)."""
  record: dict
  page: dict


def eval_stem(split: str, step: int, decode: DecodeSettings) -> str:
  return f'eval_{split}_{step}_{decode.slug()}'


def training_captions(train_source) -> list[str]:
  """Every reference caption of the training split (reads every record once)."""
  return [c for i in range(len(train_source)) for c in input_pipeline.record_captions(train_source[i])]


def analyse(results: list[dict], *, source, train_captions: Sequence[str], vocab: vocab_lib.Vocabulary,
            provenance: dict, stem: str, metrics: Sequence[str] = DEFAULT_METRICS) -> Evaluation:
  """Scores captioned `results` (`inference.caption_source`'s dicts, optionally with 'words' and
  'attention' (len(words), gh, gw) from an attention decoder) every way the report shows.

  The JSON record: the keys older capjax wrote ('workdir', 'split', 'checkpoint_step', 'beam_size',
  'length_penalty', 'metrics', 'captions') plus 'format', 'title', 'no_repeat_ngram', 'provenance'
  (see `provenance`; its 'tokenizer' is filled in here, from the scorer), 'paper_bleu' and
  'paper_bleu_variant', 'collapse' (caption_analysis.collapse_report), 'content' (content score or None),
  'examples' ({'best'|'worst'|'random': [image_id]}, as the HTML shows them) and 'files'. Each entry of
  'captions' is {'image_id', 'caption', 'references', 'CIDEr', 'Bleu_4'}: per-image CIDEr-D, whose mean
  is metrics['CIDEr'], and BLEU-4 of the image alone.
  """
  keys = [str(r['index']) for r in results]  # image ids need not be unique; positions in the split are
  candidates = {k: r['caption'] for k, r in zip(keys, results)}
  references = {k: r['references'] for k, r in zip(keys, results)}
  scores = metrics_lib.compute_caption_metrics(candidates, references, metrics=metrics, on_error='warn')
  per_image = caption_analysis.per_image_scores(candidates, references)
  provenance = {**provenance, 'tokenizer': _TOKENIZERS[per_image.tokenizer]}
  examples = [{'image_id': r['image_id'], 'image': None, 'caption': r['caption'],
               'references': list(r['references']), 'scores': per_image.per_image[k]}
              for k, r in zip(keys, results)]
  sections = report_lib.select_sections(examples, n=EXAMPLES_PER_SECTION, seed=SECTION_SEED)
  for i in sorted({i for shown in sections.values() for i in shown}):
    examples[i].update(_illustrations(results[i], source))
  content = content_for_split(results, source)
  page = {
      'title': (f"capjax evaluation: {provenance.get('split')} split, checkpoint "
                f"{provenance.get('checkpoint_step')}"),
      'provenance': provenance, 'metrics': scores,
      'paper_bleu': caption_analysis.paper_bleu(candidates, references),
      'collapse': caption_analysis.collapse_report(candidates, train_captions,
                                                   len(vocab) - len(vocab_lib.SPECIALS), references),
      'content': _content_table(content) if content else None, 'examples': examples, 'sections': sections,
  }
  record = {
      'format': FORMAT, 'title': page['title'],
      **{k: provenance.get(k) for k in ('workdir', 'split', 'checkpoint_step', 'beam_size',
                                        'length_penalty', 'no_repeat_ngram')},
      'provenance': provenance, 'metrics': scores,
      'paper_bleu': page['paper_bleu'], 'paper_bleu_variant': caption_analysis.PAPER_BLEU_VARIANT,
      'collapse': page['collapse'], 'content': content,
      'examples': {name: [examples[i]['image_id'] for i in shown] for name, shown in sections.items()},
      'captions': [{'image_id': e['image_id'], 'caption': e['caption'], 'references': e['references'],
                    **e['scores']} for e in examples],
      'files': {ext: f'{stem}.{ext}' for ext in ('json', 'html', 'png')},
  }
  return Evaluation(record=record, page=page)


def _illustrations(result: dict, source) -> dict:
  """A shown example's thumbnail and, when the decoder attends, its per-word attention maps."""
  pixels, uri = _thumbnail(result, source)
  shown = {'image': uri}
  if result.get('attention') is not None and result.get('words'):
    shown['attention'] = report_lib.attention_figures(pixels, result['words'], result['attention'])
  return shown


def _content_table(content: dict) -> dict:
  """The content score as the report shows it: one row for all images and one per object count, rates
  as percentages, and the attention pointing rate (when there is one) above them."""
  def row(rates: dict) -> dict:
    return {'images': rates['images'], **{k.replace('_', ' '): f'{v:.1%}' for k, v in rates.items()
                                          if k != 'images'}}
  table = {}
  if 'pointing' in content:
    table['attention pointing (colour and shape words whose peak attention cell overlaps their object)'] = (
        'no word to check' if content['pointing'] is None else
        f"{content['pointing']:.1%} of {content['pointing_words_checked']} words "
        f"(a random cell: {content['pointing_chance']:.1%})")
  overall = {k: v for k, v in content.items() if k not in ('by_object_count', 'pointing', 'pointing_chance',
                                                              'pointing_words_checked', 'shape_confusion')}
  table['all images'] = row(overall)
  table.update({count: row(rates) for count, rates in content.get('by_object_count', {}).items()})
  # What the caption calls each true (size, shape): a model that names shape by the amount of colour
  # it sees calls big objects squares and small ones triangles.
  for truth, named in content.get('shape_confusion', {}).items():
    total = sum(named.values())
    table[f'a {truth} is called'] = ', '.join(
        f'{shape} {count / total:.0%}' for shape, count in sorted(named.items(), key=lambda kv: -kv[1]))
  return table


def _thumbnail(result: dict, source) -> tuple[np.ndarray, str]:
  """(the image's pixels, a data URI of it at most THUMBNAIL_SIDE px on its longer side)."""
  image = input_pipeline.record_image(source[result['index']], THUMBNAIL_SIDE)
  pixels = np.asarray(image.convert('RGB'), np.uint8)
  return pixels, report_lib.image_data_uri(pixels, max_side=THUMBNAIL_SIDE)


def content_for_split(results: list[dict], source) -> dict | None:
  """The demo's content score (capjax/content_score.py) when the dataset stores ground truth, else None;
  with attention in the results, also 'pointing': the share of colour/shape words whose peak attention
  cell overlaps the object they name, and 'pointing_chance': that share for a peak in a random cell."""
  if not results or content_score.record_objects(source[results[0]['index']]) is None:
    return None  # real datasets have no ground truth: do not read every record to find that out
  objects = [content_score.record_objects(source[r['index']]) for r in results]
  if any(o is None for o in objects):
    return None
  scores = content_score.content_score([r['caption'] for r in results], objects)
  attended = [(r, o) for r, o in zip(results, objects) if r.get('attention') is not None]
  if attended:
    hits = checked = chance = 0
    for r, o in attended:
      alphas = np.asarray(r['attention'])
      h, c, p = content_score.pointing(r['words'], alphas.reshape(len(alphas), -1), alphas.shape[1:], o)
      hits, checked, chance = hits + h, checked + c, chance + p
    scores['pointing'] = hits / checked if checked else None
    scores['pointing_chance'] = chance / checked if checked else None
    scores['pointing_words_checked'] = checked
  return scores


def write_evaluation(evaluation: Evaluation, results: list[dict], source, workdir: str) -> dict[str, str]:
  """Writes <stem>.json, .html and .png (the caption grid) into `workdir` (process 0); returns the paths."""
  paths = {ext: os.path.join(workdir, name) for ext, name in evaluation.record['files'].items()}
  if jax.process_index() == 0:
    fileio.write_json(paths['json'], evaluation.record)
    report_lib.write_report(paths['html'], evaluation.page)
    save_caption_grid(results, source, paths['png'])
  return paths


def print_summary(evaluation: Evaluation) -> None:
  """The metrics table, paper-style BLEU, one line of provenance and any collapse warning."""
  record = evaluation.record
  paper = ' '.join(f'{k} {v:.4f}' for k, v in record['paper_bleu'].items())
  lines = [metrics_lib.format_metrics_table(record['metrics']),
           f'Paper-style BLEU (NLTK corpus_bleu, no smoothing, whitespace tokens): {paper}',
           'Provenance: ' + provenance_line(record['provenance'])]
  if record['collapse']['warning']:
    lines.append('WARNING: ' + record['collapse']['warning'])
  reporting.say('\n'.join(lines))


# ----------------------------------------------------------------------------------------------
# Provenance: what a number depends on, so that a reader can tell why two numbers differ
# ----------------------------------------------------------------------------------------------

def provenance(config, *, workdir: str, split: str, source, results: list[dict], step: int,
               checkpoint_choice: str, decode: DecodeSettings) -> dict:
  """A flat, JSON-ready dict, in the order the report lists it:

  workdir, model, checkpoint_step, checkpoint_choice (how the step was picked), split, dataset,
  dataset_config (the tfds name/config/version), dataset_layout, data_dir, images (evaluated), split_images,
  data_fingerprint ('sha256:' + 16 hex digits over the evaluated images' ids and reference captions and
  the split's stored size in bytes: equal fingerprints mean the same evaluation data), decoding (in
  words), beam_size, length_penalty, no_repeat_ngram, max_len, tokenizer (filled in by `analyse`),
  java ('absent' or its version line), seed (config.seed, the training seed; decoding is
  deterministic), examples_seed (draws the report's random examples), capjax_commit and capjax_dirty
  (None when capjax is not run from a git checkout; dirty: uncommitted changes, new files included,
  under capjax/, configs/ or launch.py), python and the versions of jax, jaxlib, flax, pycocoevalcap
  and nltk, devices, command, created (UTC).
  """
  data = _dataset_facts(config, source, split)
  commit, dirty = capjax_checkout()
  return {
      'workdir': os.path.abspath(workdir), 'model': model_description(config.model),
      'checkpoint_step': int(step), 'checkpoint_choice': checkpoint_choice, 'split': split,
      'dataset': config.data.name, 'dataset_config': data['config'], 'dataset_layout': data['layout'],
      'data_dir': data['dir'], 'images': len(results), 'split_images': len(source),
      'data_fingerprint': data_fingerprint(results, data['split_bytes']),
      'decoding': decode.describe(), 'beam_size': decode.beam_size, 'length_penalty': decode.length_penalty,
      'no_repeat_ngram': decode.no_repeat_ngram, 'max_len': decode.max_len, 'tokenizer': None,
      'java': java_version(), 'seed': config.get('seed'), 'examples_seed': SECTION_SEED,
      'capjax_commit': commit, 'capjax_dirty': dirty, 'python': platform.python_version(),
      **{p: _package_version(p) for p in _VERSIONED_PACKAGES},
      'devices': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
      'command': shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]]) if sys.argv else None,
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
  }


def provenance_line(p: dict) -> str:
  """The provenance in one line, printed under the metrics table."""
  commit = (f"{p['capjax_commit'][:10]}{' (dirty)' if p['capjax_dirty'] else ''}" if p.get('capjax_commit')
            else 'not a git checkout')
  versions = ' '.join(f'{k} {p.get(k)}' for k in ('jax', 'flax', 'pycocoevalcap'))
  tokenizer = (p.get('tokenizer') or '?').split(' (')[0]
  return (f"capjax {commit}; {versions}; {p['dataset_config'] or p['dataset']} {p['split']}, "
          f"{p['images']} images, data {p['data_fingerprint']}; checkpoint {p['checkpoint_step']}, "
          f"{p['checkpoint_choice']}; {p['decoding']}; tokenizer {tokenizer}; java "
          f"{'absent' if p['java'] == 'absent' else 'present'}; seed {p['seed']}")


def model_description(model_config) -> str:
  return (f"{model_config.get('decoder', 'seed')} decoder, ResNet stages {tuple(model_config.stage_sizes)} "
          f"width {model_config.width}, embed {model_config.embed_dim}, hidden {model_config.hidden_size}, "
          f"encoder {model_config.encoder_mode}, {model_config.dtype}")


def data_fingerprint(results: list[dict], split_bytes: int | None = None) -> str:
  digest = hashlib.sha256()
  for r in results:
    digest.update(json.dumps([r['image_id'], list(r['references'])], ensure_ascii=False).encode() + b'\n')
  if split_bytes:  # the stored images too, by size: a re-encoded copy of the same captions differs
    digest.update(f'split_bytes={split_bytes}'.encode())
  return 'sha256:' + digest.hexdigest()[:16]


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
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def _package_version(name: str) -> str | None:
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


# ----------------------------------------------------------------------------------------------
# --mode=eval and --mode=compare
# ----------------------------------------------------------------------------------------------

def evaluate_workdir(workdir: str, *, split: str = 'test', checkpoint: str | int = 'best',
                     beam_size: int = 3, length_penalty: float = 0.0, no_repeat_ngram: int = 0,
                     splits=None) -> dict:
  """Restores a checkpoint onto the devices present now, captions `split`, scores it, and writes
  `eval_<split>_<step>_<decoding>.json` (metrics, provenance, per-image scores, every caption), `.html`
  (the report) and `.png` (a grid of captioned images) to the workdir. Returns the JSON record."""
  evaluation, results, source = _evaluate(workdir, split=split, checkpoint=checkpoint,
                                          decode=DecodeSettings(beam_size, length_penalty, no_repeat_ngram),
                                          splits=splits)
  paths = write_evaluation(evaluation, results, source, workdir)
  print_summary(evaluation)
  reporting.say(f"Wrote {paths['html']} (the report; open it in a browser), {paths['json']} and "
                f"{paths['png']}")
  return evaluation.record


def _evaluate(workdir: str, *, split: str, checkpoint: str | int, decode: DecodeSettings, splits=None):
  """(Evaluation, results, source) of one workdir's checkpoint on `split`, nothing written."""
  mesh = mesh_lib.make_mesh()
  config, vocab, model, variables, step = inference.restore_variables(workdir, checkpoint, mesh)
  if splits is None:
    if not os.path.isabs(os.path.expanduser(config.data.data_dir)):
      reporting.say(f'Warning: {workdir}/config.json has a relative data_dir '
                    f'({config.data.data_dir!r}), read from {os.getcwd()}.')
    splits = prepare.open_dataset(config.data, build_demo=False)
  if split not in splits:
    raise ValueError(f'--split={split!r}: the dataset has {sorted(splits)}')
  decode = dataclasses.replace(decode, max_len=config.data.max_caption_len - 1)
  caption_fn = inference.make_caption_fn(model, mesh, max_len=decode.max_len, beam_size=decode.beam_size,
                                         length_penalty=decode.length_penalty,
                                         no_repeat_ngram=decode.no_repeat_ngram,
                                         return_attention=model.has_attention)
  reporting.say(f'Captioning {len(splits[split])} {split} images with checkpoint {step} of {workdir} '
                f'({decode.describe()}) ...')
  results = inference.caption_source(caption_fn, variables, splits[split], vocab, mesh,
                                     image_size=config.data.image_size,
                                     batch_size=config.train.eval_batch_size)
  facts = provenance(config, workdir=workdir, split=split, source=splits[split], results=results,
                     step=step, checkpoint_choice=checkpoint_choice(workdir, config, checkpoint, step),
                     decode=decode)
  evaluation = analyse(results, source=splits[split], train_captions=training_captions(splits['train']),
                       vocab=vocab, provenance=facts,
                       stem=eval_stem(split, step, decode))
  return evaluation, results, splits[split]


def compare_workdirs(workdirs, *, split: str = 'test', checkpoint: str | int = 'best', beam_size: int = 3,
                     length_penalty: float = 0.0, no_repeat_ngram: int = 0) -> dict:
  """Captions `split` with the checkpoint of each workdir (decoded the same way) and writes, into the first
  workdir, one side-by-side report per other workdir: `compare_<split>_<decoding>_<A>-<step>_vs_<B>-<step>`
  .html and .json (metrics, provenance and per-image CIDEr-D/BLEU-4 of both, and their differences).
  Returns {'comparisons': [the JSON records], 'files': [the HTML paths]}."""
  workdirs = [w for w in workdirs if w]
  if len(workdirs) < 2:
    raise errors.InputError(f'--mode=compare needs two or more workdirs, as --workdirs=A,B; got {workdirs}')
  decode = DecodeSettings(beam_size, length_penalty, no_repeat_ngram)
  first, results, source = _evaluate(workdirs[0], split=split, checkpoint=checkpoint, decode=decode)
  others = [_evaluate(w, split=split, checkpoint=checkpoint, decode=decode)[0] for w in workdirs[1:]]
  labels = _labels(workdirs)
  comparisons, files = [], []
  for label, run in zip(labels[1:], others):
    record, page_a = _comparison(first, run, labels[0], label, decode,
                                 lambda i: _thumbnail(results[i], source)[1])
    paths = {ext: os.path.join(workdirs[0], name) for ext, name in record['files'].items()}
    if jax.process_index() == 0:
      fileio.write_json(paths['json'], record)
      report_lib.write_comparison(paths['html'], page_a, run.page, labels=(labels[0], label))
    summary = record['summary']
    reporting.say(f"{label} \u2212 {labels[0]} on {summary['images']} {split} images: CIDEr-D "
                  f"{summary['mean_CIDEr_difference']:+.4f}; {label} is better on {summary['better']} "
                  f"images, worse on {summary['worse']}, equal on {summary['equal']}.")
    for name, metrics in ((labels[0], first.record['metrics']), (label, run.record['metrics'])):
      reporting.say(f'{name}: ' + '  '.join(f'{k} {v:.4f}' for k, v in metrics.items()))
    reporting.say(f"Wrote {paths['html']} (side by side; open it in a browser) and {paths['json']}")
    comparisons.append(record)
    files.append(paths['html'])
  return {'comparisons': comparisons, 'files': files}


def _labels(workdirs: Sequence[str]) -> list[str]:
  """Short names for the report: the workdirs' folder names, lettered when two are the same."""
  names = [os.path.basename(os.path.normpath(os.path.abspath(w))) for w in workdirs]
  if len(set(names)) < len(names):
    names = [f'{chr(ord("A") + i)}-{n}' for i, n in enumerate(names)]
  return names


def _comparison(a: Evaluation, b: Evaluation, label_a: str, label_b: str, decode: DecodeSettings,
                thumbnail) -> tuple[dict, dict]:
  """(the comparison's JSON record, A's page with thumbnails on every image the comparison shows);
  thumbnail(i): the data URI of A's i-th image."""
  by_id = {str(e['image_id']): e for e in b.page['examples']}
  pairs = [(i, e, by_id[str(e['image_id'])]) for i, e in enumerate(a.page['examples'])
           if str(e['image_id']) in by_id]
  if not pairs:
    raise errors.InputError(f'{label_a} and {label_b} were evaluated on different images (no image id in '
                            'common): compare models trained on the same dataset')
  pa, pb = a.record['provenance'], b.record['provenance']
  if pa['data_fingerprint'] != pb['data_fingerprint']:
    reporting.say(f"Warning: {label_a} and {label_b} read different data ({pa['data_fingerprint']} vs "
                  f"{pb['data_fingerprint']}); {len(pairs)} images are in both and are compared.")
  diffs = [float(eb['scores']['CIDEr']) - float(ea['scores']['CIDEr']) for _, ea, eb in pairs]
  picks = report_lib.select_comparison_sections(diffs)
  shown = {pairs[k][0] for chosen in picks.values() for k in chosen}
  page_a = dict(a.page, examples=[dict(e, image=e.get('image') or thumbnail(i)) if i in shown else e
                                  for i, e in enumerate(a.page['examples'])])
  per_image = [{'image_id': ea['image_id'], 'caption_a': ea['caption'], 'caption_b': eb['caption'],
                'CIDEr_a': ea['scores']['CIDEr'], 'CIDEr_b': eb['scores']['CIDEr'], 'CIDEr_difference': d,
                'Bleu_4_a': ea['scores']['Bleu_4'], 'Bleu_4_b': eb['scores']['Bleu_4']}
               for (_, ea, eb), d in zip(pairs, diffs)]
  stem = (f"compare_{pa['split']}_{decode.slug()}_{_file_safe(label_a)}-{pa['checkpoint_step']}_vs_"
          f"{_file_safe(label_b)}-{pb['checkpoint_step']}")
  record = {
      'format': COMPARISON_FORMAT, 'split': pa['split'], 'decoding': pa['decoding'],
      'labels': [label_a, label_b],
      'runs': {label: {k: e.record[k] for k in ('provenance', 'metrics', 'paper_bleu', 'collapse', 'content')}
               for label, e in ((label_a, a), (label_b, b))},
      'summary': {'images': len(pairs), 'mean_CIDEr_difference': float(np.mean(diffs)),
                  'better': sum(d > 0 for d in diffs), 'worse': sum(d < 0 for d in diffs),
                  'equal': sum(d == 0 for d in diffs)},
      'examples': {name: [pairs[k][1]['image_id'] for k in chosen] for name, chosen in picks.items()},
      'per_image': per_image,
      'files': {'json': f'{stem}.json', 'html': f'{stem}.html'},
  }
  return record, page_a


def _file_safe(text: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.-]+', '-', text).strip('-') or 'run'
