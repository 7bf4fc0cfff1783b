"""CIDEr-D of integer token captions, vectorised with numpy: the reward of self-critical sequence training.

The CIDEr-D variant (Vedantam et al. 2015) exactly as coco-caption's ``CiderScorer`` computes it and as
SCST (Rennie et al. 2017) uses it through ruotianluo/self-critical.pytorch's
``pyciderevalcap/ciderD/ciderD_scorer.py``. For the n-gram orders k = 1..n (n = 4) of a caption:

    tf(g)     count of the n-gram g in the caption
    df(g)     number of CORPUS images whose references (the union of their n-grams) contain g
    ref_len   log(number of corpus images)
    vec[g]    tf(g) * (ref_len - log(max(1, df(g))))      an n-gram the corpus never saw has df 0: idf ref_len
    sim_k     sum_g min(vec_hyp[g], vec_ref[g]) * vec_ref[g] / (|vec_hyp_k| * |vec_ref_k|)   over the k-grams,
              times exp(-(len_hyp - len_ref)^2 / (2 sigma^2)), sigma = 6
    score     10 * mean over the image's references of (mean over k of sim_k)

Quirks of the reference code, all kept:

- The document frequencies are fixed at construction from a corpus (for SCST the training split's
  references), not taken from the evaluated set as pycocoevalcap's ``Cider`` does; with the corpus equal
  to the evaluated references the two agree (tested).
- "length" is not the number of words: the reference code sums the term frequencies of the BIGRAMS
  (``if n == 1: length += term_freq``, n being the 0-based order index), i.e. words - 1, and 0 for a
  caption of 0 or 1 words. For n >= 2 the penalty is still that of the word counts (an empty caption,
  the only one off by one, has zero norms and scores 0 anyway); with n = 1 the length is always 0, so
  there is no length penalty at all.
- The clipping is one-sided: min(vec_hyp, vec_ref) * vec_ref. When a norm is 0 the sum is left undivided;
  it is 0 then anyway, since every weight is >= 0 (df never exceeds the number of corpus images).
- Every order counts in the mean over k, also one a caption is too short to have (its sim_k is 0): a
  2-word caption identical to its image's only reference scores 5, not 10. An empty reference still
  counts in the mean over references.
- self-critical.pytorch scores the end token as a word (its ``array_to_str`` keeps the 0 that ends a
  sample, and its training-set df was built from references with ``<eos>`` appended). To reproduce that,
  keep END at the end of every reference and score samples with ``end_id=None, pad_id=PAD``.

Scoring. ``CiderD(corpus).score(candidates, references)`` scores M candidates, each against its own
reference set. Candidates are a sequence of int sequences, or an int array (M, L) of decoder rows; with
``end_id`` a row is cut at its first end_id (excluded) and with ``pad_id`` pads are dropped (either form).

Caching the references. SCST scores K samples per image (and a greedy baseline) against the same
references every step, and the same training images every epoch. ``prepare(references_per_image)`` does
the per-reference work once (n-grams, tf-idf weights, norms, lengths, an index by (n-gram, image)) and
returns a ``PreparedReferences``; ``score(candidates, prepared, image_index)`` then only cooks the
candidates and looks their n-grams up, candidate m being scored against image ``image_index[m]``.
Either prepare the whole training split once (Flickr8k's 6,000 images x 5 refs: ~1 s, ~50 MiB; COCO's
113k x 5: ~15 s, ~0.7 GiB, cooked ``chunk_references`` at a time so the transient arrays stay bounded)
and pass dataset indices, or prepare a batch's references once and score the samples
(``image_index=np.repeat(np.arange(B), K)``) and the baseline (``np.arange(B)``) against them. A plain
reference list is prepared inside ``score``, so both paths run the same code. Prepared references hold
idf weights, so they belong to the ``CiderD`` that made them.

How it is vectorised. Captions are laid end to end in one int64 array. Every n-gram becomes one int64
key: the token ids in 15-bit fields (ids < 2**15, n <= 4) and the order index above bit 60, so n-grams of
different orders never collide. Sorting the keys, then (key rank, caption) pairs, counts the term
frequencies. idf comes from a static hash table of the corpus's n-grams (vectorised probing: faster than
``np.searchsorted`` in a table of ~800k keys, whose binary searches miss the cache), which also numbers
the n-grams; a second table, of (n-gram number, image) pairs, finds for every candidate n-gram the
references of its image that hold it. The clipped products of all those matches go into one
``np.bincount`` over (candidate, reference, order). No Python loop runs per n-gram or caption, except
to flatten list inputs.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import NamedTuple, Sequence

import numpy as np

TOKEN_BITS = 15
MAX_ORDER = 4
# References cooked at a time when building the document frequencies and preparing references. COCO's
# 566k training references at once took 2-3 GiB of transient n-gram arrays; 100k take ~0.4 GiB.
CHUNK_REFERENCES = 100_000
_ORDER_SHIFT = TOKEN_BITS * MAX_ORDER  # the 0-based order index sits above the packed ids: bits 60-61
_serials = itertools.count()  # tells apart the scorers that prepared references belong to
_FIBONACCI = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio, odd: the product mixes all bits upward

Captions = Sequence[Sequence[int]] | np.ndarray


class _HashTable:
  """Positions of distinct int64 keys, found by hashing, in vectorised probes.

  Why not ``np.searchsorted``: in the corpus's ~800k n-grams (6 MB) a binary search reads ~20 keys, the
  last ones mostly cache misses; a probe here reads one bucket. For a batch's ~8k distinct n-grams that
  halves the time (1.1 vs 2.1 ms, caches cold, on the 2-core CPU). The keys are stored in the order of their
  bucket, the top bits of a multiplicative (Fibonacci) hash, with at least as many buckets as keys:
  bucket b holds ``keys[starts[b]:starts[b + 1]]``, about one key. ``values`` are per-key arrays,
  stored in the same order.
  """

  def __init__(self, keys: np.ndarray, *values: np.ndarray):
    keys = np.asarray(keys, np.int64)
    bits = max(1, max(len(keys) - 1, 0).bit_length())
    self._shift = np.uint64(64 - bits)
    bucket = self._bucket(keys)
    order = np.argsort(bucket)
    self._starts = np.append(0, np.cumsum(np.bincount(bucket, minlength=2 ** bits))).astype(np.int32)
    del bucket  # tables of tens of millions of keys (COCO's reference pairs): free what is done with
    self.keys = keys[order]
    self.values = tuple(v[order] for v in values)

  @property
  def nbytes(self) -> int:
    return self.keys.nbytes + self._starts.nbytes + sum(v.nbytes for v in self.values)

  def _bucket(self, keys: np.ndarray) -> np.ndarray:
    # uint64 products wrap around, as this hash wants (keys are >= 0, so the view is the same number).
    return ((keys.view(np.uint64) * _FIBONACCI) >> self._shift).astype(np.intp)

  def find(self, needles: np.ndarray) -> np.ndarray:
    """The position of each needle in ``keys``, -1 where absent."""
    bucket = self._bucket(needles)
    found = np.full(len(needles), -1, np.int64)
    pos, end = self._starts[bucket], self._starts[bucket + 1]
    todo = np.flatnonzero(pos < end)
    pos, end, needles = pos[todo], end[todo], needles[todo]
    while len(todo):  # one pass per key of the fullest bucket probed (a handful), on fewer needles each
      hit = self.keys[pos] == needles
      found[todo[hit]] = pos[hit]
      pos += 1
      more = ~hit & (pos < end)
      todo, pos, end, needles = todo[more], pos[more], end[more], needles[more]
    return found


class _Cooked(NamedTuple):
  """The sparse tf-idf vectors of some captions: one entry per (caption, distinct n-gram), sorted by
  n-gram, then caption."""
  doc: np.ndarray        # int64 (E,): caption index
  keys: np.ndarray       # int64 (E,): n-gram key
  weights: np.ndarray    # float64 (E,): tf * idf
  distinct: np.ndarray   # int64 (U,): the distinct keys, sorted
  run: np.ndarray        # int64 (E,): index of the entry's key in `distinct`
  corpus_id: np.ndarray  # int64 (U,): position of the distinct key in the corpus's table, -1 if unseen


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedReferences:
  """The references of ``num_images`` images, cooked once by ``CiderD.prepare`` for repeated scoring.

  One entry per (reference, distinct n-gram), sorted by pair = (n-gram id, image). An n-gram's id is its
  position in the scorer's corpus table, so that the candidates' idf lookup finds it too, or for
  n-grams the corpus never saw, corpus size + rank in ``unseen``. A hash table of the pairs gives the
  run of entries of the references of one image that hold one n-gram.
  """
  unseen: np.ndarray       # int64: the references' n-gram keys missing from the corpus, sorted
  pairs: _HashTable        # n-gram id * num_images + image of each (n-gram, image) with entries ->
                           # (first entry, number of entries = references of the image holding it)
  weights: np.ndarray      # float64 (E,): vec_ref of the entry's n-gram in its reference
  ref_slot: np.ndarray     # int32 (E,): which reference of its image (0 .. max_refs - 1)
  norms: np.ndarray        # float64 (num_images, max_refs, n); 0 in the slots of missing references
  lengths: np.ndarray      # int64 (num_images, max_refs): the bigram-count "length"
  counts: np.ndarray       # int64 (num_images,): references per image
  scorer: int              # serial of the CiderD that made it

  @property
  def num_images(self) -> int:
    return len(self.counts)

  @property
  def nbytes(self) -> int:
    """Memory held, in bytes."""
    arrays = (self.unseen, self.weights, self.ref_slot, self.norms, self.lengths, self.counts)
    return self.pairs.nbytes + sum(a.nbytes for a in arrays)


class CiderD:
  """CIDEr-D with document frequencies from a fixed corpus; see the module docstring."""

  def __init__(self, corpus_references: Sequence[Sequence[Sequence[int]]], *, n: int = 4,
               sigma: float = 6.0, chunk_references: int = CHUNK_REFERENCES):
    """corpus_references[i]: the reference captions (int sequences) of corpus image i.

    chunk_references: references cooked at a time here and in ``prepare``; the scores do not depend on it.
    """
    if not 1 <= n <= MAX_ORDER:
      raise ValueError(f'n must be in 1..{MAX_ORDER} (n-grams are packed into one int64), got {n}')
    if not len(corpus_references):
      raise ValueError('the corpus has no images')
    if chunk_references < 1:
      raise ValueError(f'chunk_references must be >= 1, got {chunk_references}')
    self.n, self.sigma, self.chunk_references = n, float(sigma), int(chunk_references)
    self._serial = next(_serials)
    self.num_corpus_images = len(corpus_references)
    self.ref_len = np.log(float(self.num_corpus_images))

    # df, summed over chunks of images: an image counts once per n-gram however many of its references
    # hold it, and all of an image's references are in one chunk.
    counts = _lengths_of(corpus_references)
    df_keys, df = np.zeros(0, np.int64), np.zeros(0, np.int64)
    for lo, hi in _image_chunks(counts, self.chunk_references):
      tokens, lengths = _flatten(list(itertools.chain.from_iterable(corpus_references[lo:hi])))
      ref, keys = _ngram_entries(tokens, lengths, n)
      image_of_ref = np.repeat(np.arange(hi - lo), counts[lo:hi])
      _, _, _, chunk_keys, run = _term_frequencies(image_of_ref[ref], keys, hi - lo)
      df_keys, df = _add_counts(df_keys, df, chunk_keys, np.bincount(run, minlength=len(chunk_keys)))
      del tokens, lengths, ref, keys, image_of_ref, run  # before the next chunk's arrays
    self._corpus = _HashTable(df_keys, self.ref_len - np.log(np.maximum(1.0, df)))
    # idf by position in the corpus table, then ref_len: what position -1 (not in the corpus) picks.
    self._idf_table = np.append(self._corpus.values[0], self.ref_len)

  def idf(self, keys: np.ndarray) -> np.ndarray:
    """ref_len - log(max(1, df)) of n-gram keys (see ``ngram_keys``); ref_len for unseen ones."""
    return self._idf_table[self._corpus.find(np.asarray(keys, np.int64))]

  def prepare(self, references_per_image: Sequence[Sequence[Sequence[int]]]) -> PreparedReferences:
    """Cooks the references of each image once, for any number of ``score`` calls against them.

    Cooked ``chunk_references`` at a time, so that the transient n-gram arrays stay bounded: one
    (n-gram, image) pair's entries all come from one image, hence one chunk, and stay contiguous.
    """
    counts = _lengths_of(references_per_image)
    if (counts == 0).any():
      raise ValueError('every image needs at least one reference')
    num_images, max_refs = len(counts), int(counts.max(initial=1))
    norms = np.zeros((num_images, max_refs, self.n))
    padded_lengths = np.zeros((num_images, max_refs), np.int64)
    num_known = len(self._corpus.keys)
    weights, ref_slots, pair_keys, firsts, pair_counts, unseen_per_chunk = [], [], [], [], [], []
    num_entries = 0
    for lo, hi in _image_chunks(counts, self.chunk_references):
      chunk_counts = counts[lo:hi]
      tokens, lengths = _flatten(list(itertools.chain.from_iterable(references_per_image[lo:hi])))
      refs = self._cook(tokens, lengths)
      image = np.repeat(np.arange(lo, hi), chunk_counts)
      slot = np.arange(len(lengths)) - np.repeat(np.cumsum(chunk_counts) - chunk_counts, chunk_counts)
      norms[image, slot] = self._norms(refs, len(lengths))
      padded_lengths[image, slot] = self._length(lengths)

      # N-gram ids: the corpus table's positions, then the n-grams it lacks, numbered on in key order
      # (here by rank in this chunk; renumbered below by rank among all chunks' unseen n-grams).
      ids = refs.corpus_id.copy()
      unseen = ids < 0
      ids[unseen] = num_known + np.arange(unseen.sum())
      unseen_per_chunk.append(refs.distinct[unseen])
      pair_of_entry = ids[refs.run] * num_images + image[refs.doc]
      order = np.argsort(pair_of_entry)
      pair_of_entry = pair_of_entry[order]
      first = np.flatnonzero(_new_runs(pair_of_entry))
      pair_keys.append(pair_of_entry[first])
      pair_counts.append(np.diff(np.append(first, len(order))).astype(np.int32))
      firsts.append(first + num_entries)  # int32 below while the entries fit
      weights.append(refs.weights[order])
      ref_slots.append(slot[refs.doc[order]].astype(np.int32))
      num_entries += len(order)
      del tokens, lengths, refs, image, slot, ids, pair_of_entry, order, first

    all_unseen = np.unique(np.concatenate(unseen_per_chunk))
    for chunk_keys, chunk_unseen in zip(pair_keys, unseen_per_chunk):
      if len(chunk_unseen):  # chunk rank -> rank among all unseen n-grams, in place
        ids, images = np.divmod(chunk_keys, num_images)
        fix = ids >= num_known
        rank = np.searchsorted(all_unseen, chunk_unseen[ids[fix] - num_known])
        chunk_keys[fix] = (num_known + rank) * num_images + images[fix]
    index_type = np.int32 if num_entries < 2 ** 31 else np.int64
    pairs = _HashTable(_concatenate_emptying(pair_keys), _concatenate_emptying(firsts, index_type),
                       _concatenate_emptying(pair_counts))
    return PreparedReferences(
        unseen=all_unseen, pairs=pairs, weights=_concatenate_emptying(weights),
        ref_slot=_concatenate_emptying(ref_slots), norms=norms, lengths=padded_lengths, counts=counts,
        scorer=self._serial)

  def score(self, candidates: Captions, references: Sequence[Sequence[Sequence[int]]] | PreparedReferences,
            image_index: Sequence[int] | np.ndarray | None = None, *, end_id: int | None = None,
            pad_id: int | None = None) -> np.ndarray:
    """CIDEr-D of each candidate against the references of image ``image_index[m]``: float64 (M,).

    references: per image, its reference captions, or ``prepare``'s cooked form of them.
    image_index: (M,) image of each candidate; default 0..M-1 (one candidate per image).
    end_id, pad_id: a candidate is cut at its first end_id (excluded), and pad_id tokens are dropped.
    """
    prepared = references if isinstance(references, PreparedReferences) else self.prepare(references)
    if prepared.scorer != self._serial:
      raise ValueError('these references were prepared by another CiderD (their idf weights differ)')
    tokens, lengths = _flatten(candidates, end_id=end_id, pad_id=pad_id)
    num = len(lengths)
    image_index = self._image_index(image_index, num, prepared.num_images)
    if not num:
      return np.zeros(0)

    cands = self._cook(tokens, lengths)
    dots = self._clipped_dots(prepared, cands, image_index, num)
    denominators = self._norms(cands, num)[:, None, :] * prepared.norms[image_index]
    # The reference code leaves the sum undivided where a norm is 0 (where it is 0 anyway).
    sims = np.divide(dots, denominators, out=dots.copy(), where=denominators != 0)
    delta = (self._length(lengths)[:, None] - prepared.lengths[image_index]).astype(np.float64)
    penalty = np.exp(-delta ** 2 / (2 * self.sigma ** 2))
    # Missing reference slots hold no entries and zero norms: they add 0 to the sum.
    return 10.0 * (sims.mean(axis=-1) * penalty).sum(axis=-1) / prepared.counts[image_index]

  # --------------------------------------------------------------------------- helpers

  def _cook(self, tokens: np.ndarray, lengths: np.ndarray) -> _Cooked:
    doc, keys, tf, distinct, run = _term_frequencies(*_ngram_entries(tokens, lengths, self.n), len(lengths))
    # One lookup per distinct n-gram: K samples of one image share most of theirs.
    corpus_id = self._corpus.find(distinct)
    return _Cooked(doc, keys, tf * self._idf_table[corpus_id][run], distinct, run, corpus_id)

  def _length(self, lengths: np.ndarray) -> np.ndarray:
    """The reference code's "length": the number of bigrams (words - 1, at least 0; 0 when n = 1)."""
    return np.maximum(lengths - 1, 0) if self.n >= 2 else np.zeros_like(lengths)

  def _norms(self, cooked: _Cooked, num_docs: int) -> np.ndarray:
    """|vec_k| of each caption and order k: float64 (num_docs, n)."""
    bins = cooked.doc * self.n + (cooked.keys >> _ORDER_SHIFT)
    squares = np.bincount(bins, weights=cooked.weights ** 2, minlength=num_docs * self.n)
    return np.sqrt(squares).reshape(num_docs, self.n)

  def _clipped_dots(self, prepared: PreparedReferences, cands: _Cooked, image_index: np.ndarray,
                    num: int) -> np.ndarray:
    """sum_g min(vec_hyp, vec_ref) * vec_ref of each candidate, reference slot of its image and order:
    float64 (num, max_refs, n)."""
    max_refs = prepared.norms.shape[1]
    ids = cands.corpus_id.copy()
    if len(prepared.unseen):  # n-grams the corpus never saw but these references hold
      missing = np.flatnonzero(ids < 0)
      rank = np.searchsorted(prepared.unseen, cands.distinct[missing])
      held = rank < len(prepared.unseen)
      held[held] = prepared.unseen[rank[held]] == cands.distinct[missing[held]]
      ids[missing[held]] = len(self._corpus.keys) + rank[held]
    known = ids[cands.run] >= 0
    cand, keys, weights = cands.doc[known], cands.keys[known], cands.weights[known]
    pair = prepared.pairs.find(ids[cands.run[known]] * prepared.num_images + image_index[cand])
    held = pair >= 0
    cand, keys, weights, pair = cand[held], keys[held], weights[held], pair[held]
    # One row per (candidate n-gram, reference of its image that holds the n-gram).
    starts, hits = (v[pair] for v in prepared.pairs.values)
    which = np.repeat(np.arange(len(hits)), hits)
    entry = np.repeat(starts - (np.cumsum(hits) - hits), hits) + np.arange(len(which))
    ref_weights = prepared.weights[entry]
    terms = np.minimum(weights[which], ref_weights) * ref_weights
    bins = (cand[which] * max_refs + prepared.ref_slot[entry]) * self.n + (keys[which] >> _ORDER_SHIFT)
    dots = np.bincount(bins, weights=terms, minlength=num * max_refs * self.n)
    return dots.astype(np.float64, copy=False).reshape(num, max_refs, self.n)  # int64 when bins is empty

  @staticmethod
  def _image_index(image_index, num: int, num_images: int) -> np.ndarray:
    if image_index is None:
      if num != num_images:
        raise ValueError(f'{num} candidates but references for {num_images} images: pass image_index')
      return np.arange(num)
    image_index = np.asarray(image_index, np.int64)
    if image_index.shape != (num,):
      raise ValueError(f'image_index must have shape ({num},), got {image_index.shape}')
    if num and (image_index.min() < 0 or image_index.max() >= num_images):
      raise ValueError(f'image_index out of range for {num_images} images')
    return image_index


# ----------------------------------------------------------------------------- n-gram arrays

def ngram_keys(ngrams: Sequence[Sequence[int]]) -> np.ndarray:
  """The int64 key of each n-gram (token ids < 2**15, 1 to 4 of them), as used inside ``CiderD``."""
  out = []
  for ngram in ngrams:
    if not 1 <= len(ngram) <= MAX_ORDER or not all(0 <= t < 2 ** TOKEN_BITS for t in ngram):
      raise ValueError(f'not an n-gram of 1..{MAX_ORDER} token ids < 2**{TOKEN_BITS}: {ngram}')
    key = 0
    for token in ngram:
      key = (key << TOKEN_BITS) | int(token)
    out.append(key | ((len(ngram) - 1) << _ORDER_SHIFT))
  return np.array(out, np.int64)


def _image_chunks(counts: np.ndarray, chunk_references: int) -> list[tuple[int, int]]:
  """Consecutive image ranges [lo, hi) of at most ``chunk_references`` references each (at least one
  image), covering all images."""
  chunks, lo, total = [], 0, 0
  for i, count in enumerate(counts.tolist()):
    if i > lo and total + count > chunk_references:
      chunks.append((lo, i))
      lo, total = i, 0
    total += count
  chunks.append((lo, len(counts)))
  return chunks


def _add_counts(keys: np.ndarray, counts: np.ndarray, new_keys: np.ndarray,
                new_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Merges sorted distinct keys with their counts into sorted distinct keys, counts summed."""
  pos = np.searchsorted(keys, new_keys)
  held = pos < len(keys)
  held[held] = keys[pos[held]] == new_keys[held]
  counts[pos[held]] += new_counts[held]
  fresh = ~held  # np.insert keeps the order of equal positions: the merged keys stay sorted
  return np.insert(keys, pos[fresh], new_keys[fresh]), np.insert(counts, pos[fresh], new_counts[fresh])


def _concatenate_emptying(chunks: list[np.ndarray], dtype=None) -> np.ndarray:
  """np.concatenate of a list of arrays that frees each chunk once copied: the list is emptied, so that
  a result of hundreds of MiB does not sit in memory twice."""
  out = np.empty(sum(map(len, chunks)), dtype or chunks[0].dtype)
  at = 0
  while chunks:
    chunk = chunks.pop(0)
    out[at:at + len(chunk)] = chunk
    at += len(chunk)
  return out


def _lengths_of(sequences) -> np.ndarray:
  return np.fromiter(map(len, sequences), np.int64, count=len(sequences))


def _flatten(captions: Captions, end_id: int | None = None,
             pad_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The captions laid end to end: (tokens int64 (T,), lengths int64 (M,)), each caption cut at its
  first end_id (excluded) and stripped of pad_id."""
  if getattr(captions, 'ndim', None) == 2:  # numpy or jax (M, L) rows
    rows = np.asarray(captions)
    tokens = rows.astype(np.int64).ravel()
    lengths = np.full(rows.shape[0], rows.shape[1], np.int64)
  else:
    lengths = _lengths_of(captions)
    tokens = np.fromiter(itertools.chain.from_iterable(captions), np.int64, count=int(lengths.sum()))
  if end_id is not None or pad_id is not None:
    caption = np.repeat(np.arange(len(lengths)), lengths)
    keep = np.ones(len(tokens), bool)
    if end_id is not None:
      # Ends seen so far (this position included) minus those before the caption: 0 until its first end.
      ends = np.concatenate([[0], np.cumsum(tokens == end_id)])
      starts = np.cumsum(lengths) - lengths
      keep &= ends[1:] == ends[starts][caption]
    if pad_id is not None:
      keep &= tokens != pad_id
    tokens, lengths = tokens[keep], np.bincount(caption[keep], minlength=len(lengths)).astype(np.int64)
  if len(tokens) and (tokens.min() < 0 or tokens.max() >= 2 ** TOKEN_BITS):
    raise ValueError(f'token ids must be in [0, 2**{TOKEN_BITS}), got {tokens.min()}..{tokens.max()}')
  return tokens, lengths


def _ngram_entries(tokens: np.ndarray, lengths: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
  """(caption, key) of every k-gram, k = 1..n, of the captions laid end to end in ``tokens``."""
  caption = np.repeat(np.arange(len(lengths)), lengths)
  starts = np.cumsum(lengths) - lengths
  left = lengths[caption] - (np.arange(len(tokens)) - starts[caption])  # tokens from here to the end
  captions, keys = [], []
  key = tokens
  for k in range(n):
    if k:
      key = (key[:-1] << TOKEN_BITS) | tokens[k:]  # position i now packs tokens i..i+k
    fits = left[:len(key)] > k  # the k-gram starting here does not run into the next caption
    captions.append(caption[:len(key)][fits])
    keys.append(key[fits] | (k << _ORDER_SHIFT))
  return np.concatenate(captions), np.concatenate(keys)


def _term_frequencies(doc: np.ndarray, keys: np.ndarray,
                      num_docs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The distinct (doc, key) pairs, sorted by key, then doc: (doc, keys, counts, distinct keys, run), where
  run is the index of each pair's key among the distinct keys.

  A (doc, 62-bit key) pair does not fit one int64, but (rank of the key among the distinct keys, doc)
  does: two plain sorts of one int64 column, faster than a stable or two-column (lexsort) sort.
  """
  order = np.argsort(keys)
  new = _new_runs(keys[order])
  distinct = keys[order][new]
  rank = np.empty(len(keys), np.int64)
  rank[order] = np.cumsum(new) - 1
  pairs = np.sort(rank * num_docs + doc)
  starts = np.flatnonzero(_new_runs(pairs))
  run, doc = np.divmod(pairs[starts], num_docs)
  return doc, distinct[run], np.diff(np.append(starts, len(pairs))), distinct, run


def _new_runs(sorted_keys: np.ndarray) -> np.ndarray:
  """True where a new value starts in a sorted array."""
  first = np.ones(len(sorted_keys), bool)
  first[1:] = sorted_keys[1:] != sorted_keys[:-1]
  return first
