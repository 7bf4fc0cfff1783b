"""`evaluate`: the one path from a model to an `Evaluation` of a split (caption it, record where every
number comes from, score it), used alike by the end of training, `--mode=eval` and `--mode=compare`."""

import dataclasses
import os

from capjax import inference
from capjax import mesh as mesh_lib
from capjax import progress
from capjax import workdir as workdir_lib
from capjax.data import prepare
from capjax.data import records as records_lib
from capjax.evaluation import analysis
from capjax.evaluation import captioning
from capjax.evaluation import provenance as provenance_lib


def evaluate(model, variables, *, config, vocab, splits, split: str, mesh, decode: captioning.DecodeSettings,
             workdir: str, step: int, checkpoint_choice: str, baseline: bool = False) -> analysis.Evaluation:
  """Captions every image of `splits[split]` (an attention model's with its maps), decoded as `decode`
  says (its max_len from the config), and analyses the captions (`analysis.analyse`; `baseline` adds the
  trivial captioner's scores). Nothing is written."""
  source = splits[split]
  decode = dataclasses.replace(decode, max_len=config.data.max_caption_len - 1)
  captioned = captioning.caption_split(model, variables, vocab, source, mesh,
                                       image_size=config.data.image_size,
                                       batch_size=config.train.eval_batch_size, decode=decode,
                                       with_attention=True)
  facts = provenance_lib.collect(config, workdir=workdir, split=split, source=source, captioned=captioned,
                                 step=step, checkpoint_choice=checkpoint_choice, decode=decode,
                                 examples_seed=analysis.SECTION_SEED)
  # The novelty statistic needs the training captions only: a prepared split's captions file gives them
  # without reading one training image (records_lib.split_captions).
  return analysis.analyse(captioned, source=source, train_captions=records_lib.all_captions(splits['train']),
                          vocab=vocab, provenance=facts, stem=captioning.eval_stem(split, step, decode),
                          baseline=baseline)


def open_splits(workdir: str, split: str):
  """The prepared dataset a workdir's config.json names (never rebuilt), checked to have `split`."""
  config = workdir_lib.load_config(workdir)
  if not os.path.isabs(os.path.expanduser(config.data.data_dir)):
    progress.say(f'Warning: {workdir}/config.json has a relative data_dir '
                 f'({config.data.data_dir!r}), read from {os.getcwd()}.')
  splits = prepare.open_dataset(config.data, build_demo=False)
  if split not in splits:
    raise ValueError(f'--split={split!r}: the dataset has {sorted(splits)}')
  return splits


def evaluate_checkpoint(workdir: str, *, split: str, checkpoint: str | int,
                        decode: captioning.DecodeSettings, splits=None) -> tuple[analysis.Evaluation, object]:
  """(`evaluate` of a workdir's checkpoint, restored onto the devices present now; the split's source).
  The data is the prepared dataset the workdir's config names (`open_splits`), unless `splits` is given."""
  mesh = mesh_lib.make_mesh()
  config, vocab, model, variables, step = inference.restore_variables(workdir, checkpoint, mesh)
  if splits is None:
    splits = open_splits(workdir, split)
  if split not in splits:
    raise ValueError(f'--split={split!r}: the dataset has {sorted(splits)}')
  progress.say(f'Captioning {len(splits[split])} {split} images with checkpoint {step} of {workdir} '
               f'({dataclasses.replace(decode, max_len=config.data.max_caption_len - 1).describe()}) ...')
  evaluation = evaluate(model, variables, config=config, vocab=vocab, splits=splits, split=split, mesh=mesh,
                        decode=decode, workdir=workdir, step=step,
                        checkpoint_choice=provenance_lib.checkpoint_choice(workdir, config, checkpoint, step))
  return evaluation, splits[split]
