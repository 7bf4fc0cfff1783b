"""What a workdir holds besides checkpoints: config, vocabulary, per-epoch history.

    <workdir>/config.json       the config the run was started with (eval/caption need nothing else)
    <workdir>/vocab.json        the vocabulary (readable JSON; its fingerprint is checked on reuse)
    <workdir>/history.json      per-epoch train/val loss and metrics
    <workdir>/checkpoints/      orbax checkpoints (capjax/checkpointing.py)
    <workdir>/tensorboard/      TensorBoard scalars
    <workdir>/loss_curves.png   train vs validation loss
"""

import os

from absl import logging
import jax
import ml_collections

from capjax import fileio
from capjax import vocab as vocab_lib
from capjax.input_pipeline import record_captions


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, 'checkpoints')


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  if jax.process_index() == 0:
    fileio.write_json(os.path.join(workdir, 'config.json'), config.to_dict())


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: is {workdir} a capjax training workdir?')
  config = ml_collections.ConfigDict(fileio.read_json(path))
  # JSON turns tuples into lists; the model wants tuples.
  config.model.stage_sizes = tuple(config.model.stage_sizes)
  return config


def vocab_path(workdir: str) -> str:
  return os.path.join(workdir, 'vocab.json')


def load_or_build_vocab(workdir: str, data_config, train_source) -> vocab_lib.Vocabulary:
  """Reuses `<workdir>/vocab.json` (a resumed run must not change the vocabulary); otherwise
  builds it from the training captions and saves it."""
  path = vocab_path(workdir)
  if os.path.exists(path):
    vocab = vocab_lib.Vocabulary.load(path)
    if vocab.min_count != data_config.min_word_count:
      raise ValueError(f'{path} was built with min_count={vocab.min_count} but '
                       f'config.data.min_word_count={data_config.min_word_count}; use a new workdir')
    return vocab
  captions = [c for i in range(len(train_source)) for c in record_captions(train_source[i])]
  vocab = vocab_lib.build_vocabulary(captions, data_config.min_word_count)
  truncated = vocab_lib.count_truncated(captions, data_config.max_caption_len)
  logging.info('Vocabulary: %d words (min count %d) from %d training captions; %d captions longer '
               'than max_caption_len=%d are truncated.', len(vocab), vocab.min_count, len(captions),
               truncated, data_config.max_caption_len)
  print(f'Vocabulary: {len(vocab)} tokens (4 specials + words seen >= {vocab.min_count} times in '
        f'{len(captions)} training captions); {truncated} captions truncated to '
        f'{data_config.max_caption_len} tokens.', flush=True)
  if jax.process_index() == 0:
    vocab.save(path)
  return vocab


def load_vocab(workdir: str) -> vocab_lib.Vocabulary:
  return vocab_lib.Vocabulary.load(vocab_path(workdir))


def save_history(workdir: str, history: list[dict]) -> None:
  if jax.process_index() == 0:
    fileio.write_json(os.path.join(workdir, 'history.json'), history)


def load_history(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'history.json')
  if not os.path.exists(path):
    return []
  return fileio.read_json(path)
