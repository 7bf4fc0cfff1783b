"""Two evaluations of the same images side by side: the per-image CIDEr-D differences, the images where
the second model gains or loses most, and the comparison's JSON record."""

from collections.abc import Sequence
import os
import re

import numpy as np

from capjax import errors
from capjax import progress
from capjax.evaluation import analysis
from capjax.evaluation import captioning
from capjax.evaluation import report as report_lib

FORMAT = 'capjax-comparison/1'


def labels(workdirs: Sequence[str]) -> list[str]:
  """Short names for the report: the workdirs' folder names, lettered when two are the same."""
  names = [os.path.basename(os.path.normpath(os.path.abspath(w))) for w in workdirs]
  if len(set(names)) < len(names):
    names = [f'{chr(ord("A") + i)}-{n}' for i, n in enumerate(names)]
  return names


def compare(a: analysis.Evaluation, b: analysis.Evaluation, label_a: str, label_b: str,
            decode: captioning.DecodeSettings) -> tuple[dict, list[int]]:
  """(the comparison's JSON record, the indices of A's images the comparison shows)."""
  by_id = {str(s.image_id): s for s in b.per_image}
  pairs = [(i, s, by_id[str(s.image_id)]) for i, s in enumerate(a.per_image) if str(s.image_id) in by_id]
  if not pairs:
    raise errors.InputError(f'{label_a} and {label_b} were evaluated on different images (no image id in '
                            'common): compare models trained on the same dataset')
  pa, pb = a.provenance, b.provenance
  if pa.data_fingerprint != pb.data_fingerprint:
    progress.say(f'Warning: {label_a} and {label_b} read different data ({pa.data_fingerprint} vs '
                 f'{pb.data_fingerprint}); {len(pairs)} images are in both and are compared.')
  diffs = [float(sb.cider) - float(sa.cider) for _, sa, sb in pairs]
  picks = report_lib.select_comparison_sections(diffs)
  shown = sorted({pairs[k][0] for chosen in picks.values() for k in chosen})
  per_image = [{'image_id': sa.image_id, 'caption_a': sa.caption, 'caption_b': sb.caption,
                'CIDEr_a': sa.cider, 'CIDEr_b': sb.cider, 'CIDEr_difference': d,
                'Bleu_4_a': sa.bleu_4, 'Bleu_4_b': sb.bleu_4}
               for (_, sa, sb), d in zip(pairs, diffs)]
  stem = (f'compare_{pa.split}_{decode.slug()}_{_file_safe(label_a)}-{pa.checkpoint_step}_vs_'
          f'{_file_safe(label_b)}-{pb.checkpoint_step}')
  runs = {}
  for label, evaluation in ((label_a, a), (label_b, b)):
    record = evaluation.record()
    runs[label] = {k: record[k] for k in ('provenance', 'metrics', 'paper_bleu', 'collapse', 'content')}
  record = {
      'format': FORMAT, 'split': pa.split, 'decoding': pa.decoding, 'labels': [label_a, label_b],
      'runs': runs,
      'summary': {'images': len(pairs), 'mean_CIDEr_difference': float(np.mean(diffs)),
                  'better': sum(d > 0 for d in diffs), 'worse': sum(d < 0 for d in diffs),
                  'equal': sum(d == 0 for d in diffs)},
      'examples': {name: [pairs[k][1].image_id for k in chosen] for name, chosen in picks.items()},
      'per_image': per_image,
      'files': {'json': f'{stem}.json', 'html': f'{stem}.html'},
  }
  return record, shown


def _file_safe(text: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.-]+', '-', text).strip('-') or 'run'
