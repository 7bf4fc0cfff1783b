"""`--mode=eval` and `--mode=compare`: a workdir's checkpoint evaluated on a split, and several workdirs'
checkpoints side by side, each written into the (first) workdir."""

import os

import jax

from capjax import errors
from capjax import fileio
from capjax import progress
from capjax import workdir as workdir_lib
from capjax.evaluation import analysis
from capjax.evaluation import captioning
from capjax.evaluation import comparison
from capjax.evaluation import evaluator
from capjax.evaluation import outputs
from capjax.evaluation import provenance as provenance_lib
from capjax.evaluation import report as report_lib


def evaluate_workdir(workdir: str, *, split: str = 'test', checkpoint: str | int = 'best',
                     beam_size: int = 3, length_penalty: float = 0.0, no_repeat_ngram: int = 0,
                     splits=None) -> dict:
  """Restores a checkpoint onto the devices present now, captions `split`, scores it, and writes
  `eval_<split>_<step>_<decoding>.json` (metrics, provenance, per-image scores, every caption), `.html`
  (the report) and `.png` (a grid of captioned images) to the workdir. Returns the JSON record."""
  evaluation, source = evaluator.evaluate_checkpoint(
      workdir, split=split, checkpoint=checkpoint,
      decode=captioning.DecodeSettings(beam_size, length_penalty, no_repeat_ngram), splits=splits)
  paths = outputs.write_evaluation(evaluation, source, workdir)
  outputs.print_summary(evaluation)
  progress.say(f"Wrote {paths['html']} (the report; open it in a browser), {paths['json']} and "
               f"{paths['png']}")
  return evaluation.record()


def compare_workdirs(workdirs, *, split: str = 'test', checkpoint: str | int = 'best', beam_size: int = 3,
                     length_penalty: float = 0.0, no_repeat_ngram: int = 0,
                     allow_different_data: bool = False) -> dict:
  """Captions `split` with the checkpoint of each workdir (decoded the same way) and writes, into the first
  workdir, one side-by-side report per other workdir: `compare_<split>_<decoding>_<A>-<step>_vs_<B>-<step>`
  .html and .json (metrics, provenance and per-image CIDEr-D/BLEU-4 of both, and their differences).
  Returns {'comparisons': [the JSON records], 'files': [the HTML paths]}.

  Before anything is captioned: every workdir must exist and be named once, and their splits must hold
  the same images and references (equal data fingerprints); `allow_different_data` compares the images
  whose ids they share anyway."""
  workdirs = [w for w in workdirs if w]
  if len(workdirs) < 2:
    raise errors.InputError(f'--mode=compare needs two or more workdirs, as --workdirs=A,B; got {workdirs}')
  splits = _check_comparable(workdirs, split, allow_different_data)
  decode = captioning.DecodeSettings(beam_size, length_penalty, no_repeat_ngram)
  evaluated = [evaluator.evaluate_checkpoint(w, split=split, checkpoint=checkpoint, decode=decode,
                                             splits=s) for w, s in zip(workdirs, splits)]
  (first, source), others = evaluated[0], [e for e, _ in evaluated[1:]]
  labels = comparison.labels(workdirs)
  comparisons, files = [], []
  for label, run in zip(labels[1:], others):
    record, shown = comparison.compare(first, run, labels[0], label, decode)
    paths = {ext: os.path.join(workdirs[0], name) for ext, name in record['files'].items()}
    if jax.process_index() == 0:
      fileio.write_json(paths['json'], record)
      # The page shows A's thumbnails of the images both evaluated (matched by id).
      report_lib.write_comparison(paths['html'], analysis.report_page(first, source, also_show=shown),
                                  analysis.report_page(run, None, thumbnails=False),
                                  labels=(labels[0], label))
    summary = record['summary']
    progress.say(f"{label} \u2212 {labels[0]} on {summary['images']} {split} images: CIDEr-D "
                 f"{summary['mean_CIDEr_difference']:+.4f}; {label} is better on {summary['better']} "
                 f"images, worse on {summary['worse']}, equal on {summary['equal']}.")
    for name, metrics in ((labels[0], first.metrics), (label, run.metrics)):
      progress.say(f'{name}: ' + '  '.join(f'{k} {v:.4f}' for k, v in metrics.items()))
    progress.say(f"Wrote {paths['html']} (side by side; open it in a browser) and {paths['json']}")
    comparisons.append(record)
    files.append(paths['html'])
  return {'comparisons': comparisons, 'files': files}


def _check_comparable(workdirs: list[str], split: str, allow_different_data: bool) -> list:
  """Each workdir's splits, once all exist, differ and (unless allowed) hold the same `split` data."""
  seen = {}
  for workdir in workdirs:
    real = os.path.realpath(workdir)
    if real in seen:
      raise errors.InputError(f'--workdirs names {workdir} twice ({seen[real]} is the same folder): '
                              'compare two different workdirs')
    seen[real] = workdir
    workdir_lib.load_config(workdir)  # a missing workdir is named now, not after captioning the others
  splits = [evaluator.open_splits(w, split) for w in workdirs]
  fingerprints = [provenance_lib.split_fingerprint(workdir_lib.load_config(w), s[split], split)
                  for w, s in zip(workdirs, splits)]
  differing = [w for w, f in zip(workdirs[1:], fingerprints[1:]) if f != fingerprints[0]]
  if differing and not allow_different_data:
    raise errors.InputError(
        f'{", ".join(differing)} read other {split} data than {workdirs[0]} (data fingerprint '
        f'{fingerprints[workdirs.index(differing[0])]} vs {fingerprints[0]}): images with the same ids '
        'may be different pictures, so their captions cannot be compared. Compare models evaluated on '
        'the same prepared data, or pass --allow_different_data to compare the images whose ids match.')
  return splits
