"""What an evaluation leaves behind: `<stem>.json` (the record), `<stem>.html` (the report) and `<stem>.png`
(a grid of captioned images) in the workdir, and the summary printed under the metrics."""

import os
import textwrap

import jax
from matplotlib.figure import Figure

from capjax import fileio
from capjax import images as images_lib
from capjax import progress
from capjax.data import records as records_lib
from capjax.evaluation import analysis
from capjax.evaluation import metrics as metrics_lib
from capjax.evaluation import report as report_lib


def write_evaluation(evaluation: analysis.Evaluation, source, workdir: str) -> dict[str, str]:
  """Writes <stem>.json, .html and .png into `workdir` (process 0); returns the paths."""
  paths = {ext: os.path.join(workdir, name) for ext, name in evaluation.files().items()}
  if jax.process_index() == 0:
    fileio.write_json(paths['json'], evaluation.record())
    report_lib.write_report(paths['html'], analysis.report_page(evaluation, source))
    save_caption_grid(evaluation, source, paths['png'])
  return paths


def save_caption_grid(evaluation: analysis.Evaluation, source, path: str) -> None:
  """The first 12 images with the generated caption and one reference underneath, like the seed's."""
  image_size, columns = 160, 4
  shown = evaluation.captioned[:3 * columns]
  rows = max(1, -(-len(shown) // columns))
  fig = Figure(figsize=(3.2 * columns, 3.9 * rows))
  axes = fig.subplots(rows, columns, squeeze=False)
  for ax in axes.flat:
    ax.axis('off')
  for ax, captioned in zip(axes.flat, shown):
    image = records_lib.record_image(source[captioned.index], image_size)
    ax.imshow(images_lib.resize_image(image, image_size))
    text = (f'model: {textwrap.fill(captioned.caption, 34)}\n'
            f'ref: {textwrap.fill(captioned.references[0], 34)}')
    ax.set_title(text, fontsize=8, loc='left')
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def print_summary(evaluation: analysis.Evaluation) -> None:
  """The metrics table, paper-style BLEU, one line of provenance and any collapse warning."""
  paper = ' '.join(f'{k} {v:.4f}' for k, v in evaluation.paper_bleu.items())
  lines = [metrics_lib.format_metrics_table(evaluation.metrics),
           f'Paper-style BLEU (NLTK corpus_bleu, no smoothing, whitespace tokens): {paper}',
           'Provenance: ' + evaluation.provenance.line()]
  if evaluation.collapse.warning:
    lines.append('WARNING: ' + evaluation.collapse.warning)
  progress.say('\n'.join(lines))
