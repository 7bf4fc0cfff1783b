"""Vocabulary rules: tokenisation, min-count, specials, encode/decode, save/load."""

import json

import numpy as np
import pytest

from capjax import vocab as vocab_lib


def test_tokenize_lowercases_and_splits_punctuation():
  assert vocab_lib.tokenize('A dog, running; on the GRASS.') == ['a', 'dog', 'running', 'on', 'the', 'grass']
  assert vocab_lib.tokenize("The man's café!") == ["the", "man's", 'café']
  assert vocab_lib.tokenize(b'Two  kids\r\n') == ['two', 'kids']


def test_min_count_and_specials():
  captions = ['a dog runs'] * 5 + ['a cat sleeps'] * 4
  vocab = vocab_lib.build_vocabulary(captions, min_count=5)
  assert vocab.words == ('<PAD>', '<START>', '<END>', '<UNK>', 'a', 'dog', 'runs')
  assert (vocab_lib.PAD_ID, vocab_lib.START_ID, vocab_lib.END_ID, vocab_lib.UNK_ID) == (0, 1, 2, 3)


def test_encode_pads_truncates_and_decodes():
  vocab = vocab_lib.build_vocabulary(['a dog runs fast'] * 5)
  ids = vocab.encode('A dog runs away fast', max_len=8)
  np.testing.assert_array_equal(ids, [1, 4, 5, 7, 3, 6, 2, 0])  # ties sorted a-z
  assert vocab.decode(ids) == 'a dog runs <UNK> fast'
  short = vocab.encode('a dog runs away fast', max_len=4)  # truncated, <END> kept
  np.testing.assert_array_equal(short, [1, 4, 5, 2])
  assert vocab_lib.count_truncated(['a dog runs away fast', 'a dog'], max_len=4) == 1


def test_save_load_roundtrip_and_tamper_detection(tmp_path):
  vocab = vocab_lib.build_vocabulary(['a dog runs'] * 5)
  path = str(tmp_path / 'vocab.json')
  vocab.save(path)
  assert vocab_lib.Vocabulary.load(path) == vocab
  payload = json.loads(open(path).read())
  payload['words'][5] = 'cat'
  open(path, 'w').write(json.dumps(payload))
  with pytest.raises(ValueError, match='fingerprint'):
    vocab_lib.Vocabulary.load(path)
