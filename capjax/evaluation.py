"""Evaluation: caption a split, score it with the coco-caption metrics, write results and pictures."""

from collections import Counter
import json
import os

import jax

from capjax import inference
from capjax import input_pipeline
from capjax import mesh as mesh_lib
from capjax import metrics as metrics_lib
from capjax import reporting
from capjax import train as train_lib


def score_captions(results: list[dict], metrics=('bleu', 'meteor', 'rouge', 'cider')) -> dict:
  candidates = {str(r['index']): r['caption'] for r in results}
  references = {str(r['index']): r['references'] for r in results}
  return metrics_lib.compute_caption_metrics(candidates, references, metrics=metrics)


def caption_split(model, state, vocab, source, mesh, config, *, max_images: int | None = None,
                  beam_size: int = 1) -> list[dict]:
  """Greedy (or beam) captions of a split by the model in a train state (see caption_source)."""
  caption_fn = inference.make_caption_fn(model, mesh, max_len=config.data.max_caption_len - 1,
                                         beam_size=beam_size)
  return inference.caption_source(caption_fn, state.variables, source, vocab, mesh,
                                   image_size=config.data.image_size,
                                   batch_size=config.train.eval_batch_size, max_images=max_images)


def caption_metrics_for_split(model, state, vocab, source, mesh, config, *, metrics=('bleu', 'cider'),
                              max_images: int | None = None, beam_size: int = 1) -> dict:
  """Captions for a split during training, scored."""
  return score_captions(caption_split(model, state, vocab, source, mesh, config, max_images=max_images,
                                      beam_size=beam_size), metrics)


def most_common_caption_baseline(train_source, results: list[dict]) -> dict:
  """The trivial captioner: the most frequent training caption for every image."""
  counts = Counter(c for i in range(len(train_source))
                   for c in input_pipeline.record_captions(train_source[i]))
  caption = counts.most_common(1)[0][0].lower()
  return score_captions([{**r, 'caption': caption} for r in results], ('bleu', 'cider')), caption


def save_caption_grid(results: list[dict], source, path: str, image_size: int = 160,
                      columns: int = 4, rows: int = 3) -> None:
  """Images with the generated caption and one reference underneath, like the seed's examples."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import textwrap  # pylint: disable=g-import-not-at-top
  shown = results[:columns * rows]
  rows = max(1, -(-len(shown) // columns))
  fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.9 * rows), squeeze=False)
  for ax in axes.flat:
    ax.axis('off')
  for ax, result in zip(axes.flat, shown):
    image = input_pipeline.decode_image(input_pipeline.as_bytes(source[result['index']]['image']),
                                        image_size)
    ax.imshow(input_pipeline.resize_image(image, image_size))
    text = (f"model: {textwrap.fill(result['caption'], 34)}\n"
            f"ref: {textwrap.fill(result['references'][0], 34)}")
    ax.set_title(text, fontsize=8, loc='left')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def evaluate_workdir(workdir: str, *, split: str = 'test', checkpoint: str | int = 'best',
                     beam_size: int = 3, length_penalty: float = 0.0, splits=None,
                     metrics=('bleu', 'meteor', 'rouge', 'cider'), batch_size: int | None = None) -> dict:
  """Restores a checkpoint onto the devices present now, captions `split`, scores it, and writes
  `eval_<split>_<step>.json` (metrics + every caption) and `eval_<split>_<step>.png` to the workdir."""
  mesh = mesh_lib.make_mesh()
  config, vocab, model, variables, step = inference.restore_variables(workdir, checkpoint, mesh)
  if splits is None:
    from capjax.data import sources  # pylint: disable=g-import-not-at-top
    splits = sources.open_dataset(config.data)
  if split not in splits:
    raise ValueError(f'--split={split!r}: the dataset has {sorted(splits)}')
  batch_size = batch_size or config.train.eval_batch_size
  caption_fn = inference.make_caption_fn(model, mesh, max_len=config.data.max_caption_len - 1,
                                         beam_size=beam_size, length_penalty=length_penalty)
  reporting.say(f'Captioning {len(splits[split])} {split} images with checkpoint {step} '
                f'(beam {beam_size}) ...')
  results = inference.caption_source(caption_fn, variables, splits[split], vocab, mesh,
                                     image_size=config.data.image_size, batch_size=batch_size)
  scores = score_captions(results, metrics)
  payload = {'workdir': os.path.abspath(workdir), 'split': split, 'checkpoint_step': step,
             'beam_size': beam_size, 'length_penalty': length_penalty, 'metrics': scores,
             'captions': [{'image_id': r['image_id'], 'caption': r['caption'],
                           'references': r['references']} for r in results]}
  stem = os.path.join(workdir, f'eval_{split}_{step}')
  if jax.process_index() == 0:
    with open(stem + '.json.tmp', 'w', encoding='utf-8') as f:
      json.dump(payload, f, indent=1, ensure_ascii=False)
    os.replace(stem + '.json.tmp', stem + '.json')
    save_caption_grid(results, splits[split], stem + '.png')
  reporting.say(metrics_lib.format_metrics_table(scores))
  reporting.say(f'Wrote {stem}.json and {stem}.png')
  return payload


def final_report(result: dict, config, workdir: str, splits, *, num_examples: int = 6) -> dict:
  """After training: held-out loss, example captions next to references, BLEU-4 vs a trivial
  baseline (what `python launch.py` prints at the end of the demo)."""
  state, vocab, model, mesh = result['state'], result['vocab'], result['model'], result['mesh']
  test_loss = train_lib.split_loss(config, vocab, train_lib.compile_eval_step(model, mesh), state,
                                   splits['test'], mesh)
  results = caption_split(model, state, vocab, splits['test'], mesh, config)
  scores = score_captions(results, ('bleu', 'cider'))
  baseline, baseline_caption = most_common_caption_baseline(splits['train'], results)
  lines = [f'Test loss (per token): {test_loss:.4f}', 'Held-out test images (greedy):']
  for r in results[:num_examples]:
    lines += [f"  {r['image_id']}", f"    model: {r['caption']}", f"    ref:   {r['references'][0]}"]
  lines += [f"Test BLEU-4 {scores['Bleu_4']:.3f}  CIDEr {scores['CIDEr']:.3f}  ({len(results)} images)",
            f"Trivial baseline (\"{baseline_caption}\" for every image): BLEU-4 "
            f"{baseline['Bleu_4']:.3f}  CIDEr {baseline['CIDEr']:.3f}"]
  reporting.say('\n'.join(lines))
  if jax.process_index() == 0:
    save_caption_grid(results, splits['test'], os.path.join(workdir, 'test_examples.png'))
  return {'test_loss': test_loss, 'metrics': scores, 'baseline': baseline, 'captions': results}
