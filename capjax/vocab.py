"""Caption tokenisation and the word vocabulary (words seen < 5 times in the training captions become <UNK>).

Tokenisation: lower-case, then words are runs of letters/digits (apostrophes inside a word kept, so
"man's" stays one word); punctuation is split off and dropped, because it carries no content in these
captions and the coco-caption metrics (PTB tokenizer) remove it before scoring anyway.

What this gives on Flickr8k (measured on the published Flickr8k.token.txt, 8,092 images, 40,460 captions):
the training split (6,000 images, 30,000 captions) has 7,371 distinct words, 2,534 of them seen at least
5 times, so the vocabulary is 2,538 tokens with the 4 specials. The seed reported 5,507. None of the
rules measured on the training captions at min count 5 comes near (lower-cased whitespace split: 2,545;
whitespace split keeping case and punctuation: 2,616; the same over all 40,460 captions: 3,107). The one
rule measured that gives it exactly is a whitespace split keeping case and punctuation ('A' and 'a', '.'
and ',' are words) over all 40,460 captions, validation and test included, keeping words seen at least
twice: 5,503 words + 4 specials. To reproduce the number:

  counts = collections.Counter(w for caption in every_caption_of_every_split for w in caption.split())
  len([w for w, n in counts.items() if n >= 2]) + len(SPECIALS)  # 5,507

capjax does not offer that rule as an option: its vocabulary would hold the evaluation splits' words
(they leak into training), count 'A'/'a' and '.' as separate words, and every caller of `tokenize`
(the SCST reward's references, the collapse and content analyses) would have to follow it. The seed's
larger readout matrix (5,507 rows) is kept in the benchmarks, where only its size matters.
"""

from collections import Counter
from collections.abc import Iterable, Sequence
import dataclasses
import hashlib
import re

import numpy as np

from capjax import fileio

PAD, START, END, UNK = '<PAD>', '<START>', '<END>', '<UNK>'
SPECIALS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = range(4)

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def tokenize(caption: str | bytes) -> list[str]:
  if isinstance(caption, bytes):
    caption = caption.decode('utf-8')
  return _WORD.findall(caption.lower())


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  words: tuple[str, ...]  # index -> word; the first four are SPECIALS
  min_count: int = 5

  def __post_init__(self):
    if tuple(self.words[:4]) != SPECIALS:
      raise ValueError(f'vocabulary must start with {SPECIALS}, got {self.words[:4]}')
    object.__setattr__(self, '_index', {w: i for i, w in enumerate(self.words)})

  def __len__(self) -> int:
    return len(self.words)

  def encode(self, caption: str | bytes, max_len: int) -> np.ndarray:
    """Caption -> int32 (max_len,) `[<START>, w..., <END>, <PAD>...]`, truncated to fit <END>."""
    ids = [self._index.get(w, UNK_ID) for w in tokenize(caption)][:max_len - 2]
    out = np.full((max_len,), PAD_ID, np.int32)
    out[:len(ids) + 2] = [START_ID, *ids, END_ID]
    return out

  def decode(self, ids: Iterable[int]) -> str:
    """Token ids -> text; stops at <END>, skips <START>/<PAD>."""
    words = []
    for i in ids:
      i = int(i)
      if i == END_ID:
        break
      if i in (PAD_ID, START_ID):
        continue
      words.append(self.words[i] if 0 <= i < len(self.words) else UNK)
    return ' '.join(words)

  def fingerprint(self) -> str:
    return hashlib.sha256('\n'.join(self.words).encode('utf-8')).hexdigest()[:16]

  def save(self, path: str) -> None:
    payload = {'min_count': self.min_count, 'size': len(self), 'fingerprint': self.fingerprint(),
               'words': list(self.words)}
    fileio.write_json(path, payload, indent=0)

  @classmethod
  def load(cls, path: str) -> 'Vocabulary':
    payload = fileio.read_json(path)
    try:
      vocab = cls(tuple(payload['words']), int(payload.get('min_count', 5)))
    except (KeyError, TypeError) as e:
      raise ValueError(f'{path}: expected a capjax vocabulary JSON with a "words" list ({e})') from e
    if 'fingerprint' in payload and payload['fingerprint'] != vocab.fingerprint():
      raise ValueError(f'{path}: "fingerprint" does not match its "words"; the file was edited or damaged')
    return vocab


def count_words(captions: Iterable[str | bytes]) -> Counter:
  counts = Counter()
  for caption in captions:
    counts.update(tokenize(caption))
  return counts


def build_vocabulary(captions: Iterable[str | bytes], min_count: int = 5) -> Vocabulary:
  """Words seen at least `min_count` times (count the training split only), most frequent first."""
  counts = count_words(captions)
  kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
  return Vocabulary(SPECIALS + tuple(kept), min_count)


def count_truncated(captions: Sequence[str | bytes], max_len: int) -> int:
  """How many captions lose words at `max_len` (which includes <START> and <END>)."""
  return sum(len(tokenize(c)) > max_len - 2 for c in captions)
