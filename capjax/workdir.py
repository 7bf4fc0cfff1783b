"""What a workdir holds besides checkpoints: config, vocabulary, per-epoch history.

    <workdir>/config.json       the config the run was started with (eval/caption need nothing else)
    <workdir>/vocab.json        the vocabulary (readable JSON; its fingerprint is checked on reuse)
    <workdir>/history.json      per-epoch train/val loss and metrics
    <workdir>/checkpoints/      orbax checkpoints (capjax/checkpointing.py)
    <workdir>/tensorboard/      TensorBoard scalars
    <workdir>/loss_curves.png   train vs validation loss
"""

import json
import os

from absl import logging
import jax
import ml_collections

from capjax import vocab as vocab_lib
from capjax.input_pipeline import record_captions


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, 'checkpoints')


def _write_json_atomically(path: str, payload) -> None:
  tmp = f'{path}.tmp{jax.process_index()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(payload, f, indent=1, ensure_ascii=False)
  os.replace(tmp, path)


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  if jax.process_index() == 0:
    _write_json_atomically(os.path.join(workdir, 'config.json'), config.to_dict())


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: is {workdir} a capjax training workdir?')
  with open(path, encoding='utf-8') as f:
    config = ml_collections.ConfigDict(json.load(f))
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


def load_vocab(workdir: str, expected_size: int | None = None) -> vocab_lib.Vocabulary:
  vocab = vocab_lib.Vocabulary.load(vocab_path(workdir))
  if expected_size is not None and len(vocab) != expected_size:
    raise ValueError(f'{vocab_path(workdir)} has {len(vocab)} tokens but the checkpoint was trained '
                     f'with {expected_size}: the vocabulary does not belong to this checkpoint')
  return vocab


def save_history(workdir: str, history: list[dict]) -> None:
  if jax.process_index() == 0:
    _write_json_atomically(os.path.join(workdir, 'history.json'), history)


def load_history(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'history.json')
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    return json.load(f)
