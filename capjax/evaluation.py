"""Evaluation: held-out loss, captioning a split and scoring it with the coco-caption metrics, and
the files and pictures an evaluation writes."""

from collections import Counter
import os
import textwrap

import jax
from matplotlib.figure import Figure

from capjax import fileio
from capjax import images as images_lib
from capjax import inference
from capjax import input_pipeline
from capjax import mesh as mesh_lib
from capjax import metrics as metrics_lib
from capjax import reporting
from capjax.data import prepare


def split_loss(eval_fn, state, source, vocab, pipeline: input_pipeline.PipelineConfig, *,
               batch_size: int, mesh) -> float:
  """Mean next-token loss over every (image, caption) pair of `source` (images or cached features,
  as `pipeline.from_features` says); `eval_fn` is `state.compile_eval_step(...)`."""
  batches = input_pipeline.eval_pair_batches(
      source, vocab, pipeline,
      host_batch_size=mesh_lib.per_host_batch_size(batch_size, mesh, 'eval_batch_size'),
      process_index=jax.process_index(), process_count=jax.process_count())
  totals = [eval_fn(state, batch)
            for batch, _ in mesh_lib.prefetch_to_mesh(((b, None) for b in batches), mesh)]
  totals = jax.device_get(totals)
  loss_sum = sum(float(t['loss_sum']) for t in totals)
  tokens = sum(float(t['tokens']) for t in totals)
  return loss_sum / max(tokens, 1.0)


def score_captions(results: list[dict], metrics=('bleu', 'meteor', 'rouge', 'cider')) -> dict:
  candidates = {str(r['index']): r['caption'] for r in results}
  references = {str(r['index']): r['references'] for r in results}
  return metrics_lib.compute_caption_metrics(candidates, references, metrics=metrics)


def caption_split(model, state, vocab, source, mesh, config, *,
                  max_images: int | None = None) -> list[dict]:
  """Greedy captions of a split by the model in a train state (see `inference.caption_source`)."""
  caption_fn = inference.make_caption_fn(model, mesh, max_len=config.data.max_caption_len - 1)
  return inference.caption_source(caption_fn, state.variables, source, vocab, mesh,
                                   image_size=config.data.image_size,
                                   batch_size=config.train.eval_batch_size, max_images=max_images)


def caption_metrics_for_split(model, state, vocab, source, mesh, config, *, metrics=('bleu', 'cider'),
                              max_images: int | None = None) -> dict:
  """Greedy captions for a split during training, scored."""
  return score_captions(caption_split(model, state, vocab, source, mesh, config, max_images=max_images),
                        metrics)


def most_common_caption_baseline(train_source, results: list[dict]) -> tuple[dict, str]:
  """The trivial captioner, the most frequent training caption for every image: (scores, caption)."""
  counts = Counter(c for i in range(len(train_source))
                   for c in input_pipeline.record_captions(train_source[i]))
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


def evaluate_workdir(workdir: str, *, split: str = 'test', checkpoint: str | int = 'best',
                     beam_size: int = 3, length_penalty: float = 0.0, splits=None) -> dict:
  """Restores a checkpoint onto the devices present now, captions `split`, scores it, and writes
  `eval_<split>_<step>.json` (metrics + every caption) and `eval_<split>_<step>.png` to the workdir."""
  mesh = mesh_lib.make_mesh()
  config, vocab, model, variables, step = inference.restore_variables(workdir, checkpoint, mesh)
  if splits is None:
    if not os.path.isabs(os.path.expanduser(config.data.data_dir)):
      reporting.say(f'Warning: {workdir}/config.json has a relative data_dir '
                    f'({config.data.data_dir!r}), read from {os.getcwd()}.')
    splits = prepare.open_dataset(config.data, build_demo=False)
  if split not in splits:
    raise ValueError(f'--split={split!r}: the dataset has {sorted(splits)}')
  caption_fn = inference.make_caption_fn(model, mesh, max_len=config.data.max_caption_len - 1,
                                         beam_size=beam_size, length_penalty=length_penalty)
  reporting.say(f'Captioning {len(splits[split])} {split} images with checkpoint {step} '
                f'(beam {beam_size}) ...')
  results = inference.caption_source(caption_fn, variables, splits[split], vocab, mesh,
                                     image_size=config.data.image_size,
                                     batch_size=config.train.eval_batch_size)
  scores = score_captions(results)
  payload = {'workdir': os.path.abspath(workdir), 'split': split, 'checkpoint_step': step,
             'beam_size': beam_size, 'length_penalty': length_penalty, 'metrics': scores,
             'captions': [{'image_id': r['image_id'], 'caption': r['caption'],
                           'references': r['references']} for r in results]}
  stem = os.path.join(workdir, f'eval_{split}_{step}')
  if jax.process_index() == 0:
    fileio.write_json(stem + '.json', payload)
    save_caption_grid(results, splits[split], stem + '.png')
  reporting.say(metrics_lib.format_metrics_table(scores))
  reporting.say(f'Wrote {stem}.json and {stem}.png')
  return payload
