"""What the train and caption modes of launch.py do: training with its end-of-run report, and
captioning a user's files."""

from collections.abc import Sequence
import dataclasses
import glob
import json
import os
import sys

import jax
import numpy as np

from capjax import errors
from capjax import fileio
from capjax import images
from capjax import inference
from capjax import input_pipeline
from capjax import progress
from capjax import state as state_lib
from capjax import train as train_lib
from capjax.data import prepare
from capjax.evaluation import analysis
from capjax.evaluation import attention_figures
from capjax.evaluation import captioning
from capjax.evaluation import evaluator
from capjax.evaluation import loss as loss_lib
from capjax.evaluation import outputs

NUM_EXAMPLES_PRINTED = 6


@dataclasses.dataclass(frozen=True)
class FinalReport:
  """The end-of-run report on the test split (what `python launch.py` prints at the end)."""
  test_loss: float
  evaluation: analysis.Evaluation  # greedy captions of the test split, scored, with the trivial baseline


def train(config, workdir: str, *, allow_config_change: Sequence[str] = ()) -> FinalReport:
  """Train (or resume), then report held-out captions and BLEU-4 against a trivial baseline."""
  result = train_lib.train_and_evaluate(config, workdir, allow_config_change=allow_config_change)
  return final_report(result, config, workdir, prepare.open_dataset(config.data, build_demo=False))


def final_report(result: train_lib.TrainResult, config, workdir: str, splits) -> FinalReport:
  """After training: held-out loss, example captions next to references, BLEU-4 vs a trivial
  baseline (what `python launch.py` prints at the end of the demo), and the test split's evaluation
  (greedy; JSON, HTML report and caption grid, see `capjax.evaluation.outputs`) in the workdir."""
  eval_fn = state_lib.compile_eval_step(state_lib.teacher_forced_logits(result.model), result.mesh)
  test_loss = loss_lib.split_loss(
      eval_fn, result.state, splits['test'], result.vocab,
      input_pipeline.PipelineConfig.from_config(config), batch_size=config.train.eval_batch_size,
      mesh=result.mesh).mean
  evaluated = evaluator.evaluate(
      result.model, result.state.variables, config=config, vocab=result.vocab, splits=splits, split='test',
      mesh=result.mesh, decode=captioning.DecodeSettings(beam_size=1), workdir=workdir,
      step=int(jax.device_get(result.state.step)), checkpoint_choice='end of training, the final weights',
      baseline=True)
  scores, content, baseline = evaluated.metrics, evaluated.content, evaluated.baseline
  lines = [f'Test loss (per token): {test_loss:.4f}', 'Held-out test images (greedy):']
  for c in evaluated.captioned[:NUM_EXAMPLES_PRINTED]:
    lines += [f'  {c.image_id}', f'    model: {c.caption}', f'    ref:   {c.references[0]}']
  lines += [f"Test BLEU-4 {scores['Bleu_4']:.3f}  CIDEr {scores['CIDEr']:.3f}  "
            f"({len(evaluated.captioned)} images)",
            f"Trivial baseline (\"{baseline.caption}\" for every image): BLEU-4 "
            f"{baseline.metrics['Bleu_4']:.3f}  CIDEr {baseline.metrics['CIDEr']:.3f}"]
  if content:
    pointing = content.pointing
    lines.append(f'Test content: right objects {content.objects_right:.1%}  colours '
                 f'{content.colours_right:.1%}  shapes {content.shapes_right:.1%}  positions '
                 f'right {content.positions_right:.1%}, wrong {content.positions_wrong:.1%}'
                 + (f'  pointing {pointing.rate:.1%} (random cell {pointing.chance:.1%})'
                    if pointing is not None and pointing.rate is not None else '')
                 + (f', two objects apart {pointing.separated:.1%}'
                    if pointing is not None and pointing.separated is not None else ''))
  if evaluated.collapse.warning:
    lines.append('WARNING: ' + evaluated.collapse.warning)
  lines.append('Provenance: ' + evaluated.provenance.line())
  paths = outputs.write_evaluation(evaluated, splits['test'], workdir)
  lines.append(f"Test report: {paths['html']} (open it in a browser; metrics, provenance, per-image "
               f"scores in {os.path.basename(paths['json'])}; example captions in "
               f"{os.path.basename(paths['png'])})")
  progress.say('\n'.join(lines))
  return FinalReport(test_loss=test_loss, evaluation=evaluated)


def find_images(pattern: str) -> list[str]:
  """A file, a directory (its files, sorted) or a glob -> paths; non-image files in a directory are
  kept so that each gets its own clear error."""
  if os.path.isdir(pattern):
    paths = sorted(os.path.join(pattern, n) for n in os.listdir(pattern)
                   if os.path.isfile(os.path.join(pattern, n)))
  elif any(c in pattern for c in '*?['):
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
  else:
    paths = [pattern] if os.path.isfile(pattern) else []
  if not paths:
    raise errors.InputError(f'--images={pattern!r} matches no file')
  return paths


def caption_images(workdir: str, images_pattern: str, *, export_dir: str | None = None,
                   output: str | None = None, beam_size: int = 3, checkpoint: str = 'best',
                   length_penalty: float = 0.0, no_repeat_ngram: int = 0, temperature: float = 0.0,
                   top_k: int = 0, attention_maps: str | None = None) -> list[dict]:
  """Prints `filename<TAB>caption` per image; unreadable files get an error line, the rest still run.
  Images are read a batch at a time, so memory does not grow with the number of files. With
  `export_dir`, the model comes from that export directory (capjax/export.py), not from `workdir`."""
  if not images_pattern:
    raise errors.InputError('--images is required in caption mode (a file, directory or glob)')
  if output and not os.path.isdir(os.path.dirname(os.path.abspath(output))):
    raise errors.InputError(f'--output={output!r}: folder {os.path.dirname(os.path.abspath(output))} '
                            'does not exist')
  paths = find_images(images_pattern)
  decode = dict(beam_size=beam_size, length_penalty=length_penalty, no_repeat_ngram=no_repeat_ngram,
                temperature=temperature, top_k=top_k)
  if export_dir:
    captioner = inference.ImageCaptioner.from_export(export_dir, **decode)
  else:
    captioner = inference.ImageCaptioner.from_workdir(workdir, checkpoint=checkpoint, **decode)
  if attention_maps:
    if not captioner.has_attention:
      raise errors.InputError(f'--attention_maps: the model in {export_dir or workdir} has no attention '
                              "(its config.model.decoder is 'seed')")
    os.makedirs(attention_maps, exist_ok=True)
  rows, figure_names = [], set()
  for start in range(0, len(paths), captioner.batch_size):
    loaded = []
    for path in paths[start:start + captioner.batch_size]:
      try:
        loaded.append((path, images.load_image(path, captioner.image_size)))
      except Exception as e:  # pylint: disable=broad-except
        print(f'{path}: error: not a readable image ({type(e).__name__}: {e})', file=sys.stderr)
        rows.append({'file': path, 'error': f'not a readable image: {e}'})
    batch = [image for _, image in loaded]
    attended = captioner.caption_with_attention(batch) if attention_maps else [None] * len(batch)
    captions = [a.caption for a in attended] if attention_maps else captioner.caption(batch)
    for (path, image), caption, maps in zip(loaded, captions, attended):
      print(f'{path}\t{caption}', flush=True)
      row = {'file': path, 'caption': caption}
      if maps is not None:
        row['attention_map'] = _save_attention_map(path, image, maps, attention_maps, figure_names)
      rows.append(row)
  if output:
    fileio.write_text(output, ''.join(json.dumps(row, ensure_ascii=False) + '\n' for row in rows))
    progress.say(f'Wrote {len(rows)} lines to {output}')
  if not any('caption' in row for row in rows):
    raise errors.InputError(f'none of the {len(rows)} file(s) of --images={images_pattern!r} could be '
                            'captioned (see the errors above)')
  return rows


def _save_attention_map(path: str, image, attended: inference.AttendedCaption, folder: str,
                        taken: set[str]) -> str:
  """`<folder>/<file stem>.png` (a numbered name when two images share a stem); returns the path."""
  stem = os.path.splitext(os.path.basename(path))[0] or 'image'
  name, n = f'{stem}.png', 1
  while name in taken:
    n += 1
    name = f'{stem}_{n}.png'
  taken.add(name)
  figure = os.path.join(folder, name)
  attention_figures.save_attention_figure(np.asarray(image, np.uint8), attended.words, attended.attention,
                                          figure, title=attended.caption)
  return figure
