"""capjax.evaluation.cider against the dict-based port of coco-caption's CiderScorer
(tests/cider_reference.py), against pycocoevalcap itself, and against values worked out by hand."""

import numpy as np
from pycocoevalcap.cider.cider import Cider
import pytest

from capjax.evaluation import cider
import cider_reference

PAD, END = 0, 2
WORDS = ('a man woman dog cat two red blue ball grass water beach street runs jumps sits plays holds '
         'on in the with near of and at his her small large white black young field park').split()


# ----------------------------------------------------------------------------- random caption sets

def random_references(rng, num_images, vocab, max_refs=7, max_len=20):
  """1..max_refs references of 0..max_len token ids in [0, vocab) per image."""
  return [[rng.integers(0, vocab, rng.integers(0, max_len + 1)).tolist()
           for _ in range(rng.integers(1, max_refs + 1))] for _ in range(num_images)]


def candidates_like(rng, references, vocab):
  """One candidate per image that shares n-grams with its references, so that scores are not all ~0:
  a crop of one reference with some tokens replaced or appended; some exact copies, empty, or random."""
  out = []
  for refs in references:
    kind = rng.random()
    ref = list(refs[rng.integers(len(refs))])
    if kind < 0.1:
      out.append([])
    elif kind < 0.2:
      out.append(ref)
    elif kind < 0.3:
      out.append(rng.integers(0, vocab, rng.integers(1, 12)).tolist())
    else:
      start = int(rng.integers(0, max(len(ref) // 3, 1)))
      crop = ref[start:start + int(rng.integers(2, 21))]
      crop = [int(rng.integers(vocab)) if rng.random() < 0.2 else t for t in crop]
      out.append(crop + rng.integers(0, vocab, rng.integers(0, 3)).tolist())
  return out


def spread_ids(rng, vocab):
  """A random injective map of [0, vocab) into [0, 2**15), the largest id included, so that the packing
  of n-grams into int64 keys is exercised on all 15 bits of every field."""
  table = np.concatenate([[2 ** 15 - 1], rng.choice(2 ** 15 - 1, vocab - 1, replace=False)])
  return lambda captions: [table[np.asarray(c, np.int64)].tolist() for c in captions]


def random_problem(seed):
  """(candidates, references, corpus): the evaluated set and a different corpus, which holds some of
  the evaluated references (so df > 1 for their higher-order n-grams) but not all the vocabulary."""
  rng = np.random.default_rng(seed)
  vocab = int(rng.integers(4, 40))
  references = random_references(rng, int(rng.integers(10, 40)), vocab)
  corpus_vocab = max(2, int(vocab * 0.8))  # the evaluated set also has tokens the corpus never saw
  corpus = random_references(rng, int(rng.integers(5, 40)), corpus_vocab)
  corpus += [references[i] for i in rng.choice(len(references), len(references) // 3, replace=False)]
  corpus = [corpus[i] for i in rng.permutation(len(corpus))]
  candidates = candidates_like(rng, references, vocab)
  ids = spread_ids(rng, vocab)
  return ids(candidates), [ids(refs) for refs in references], [ids(refs) for refs in corpus]


# ----------------------------------------------------------------------------- equality with the port

@pytest.mark.parametrize('seed,n,sigma', [(0, 4, 6.0), (1, 4, 6.0), (2, 4, 6.0), (3, 4, 6.0), (4, 4, 6.0),
                                          (5, 4, 2.0), (6, 3, 6.0), (7, 2, 6.0), (8, 1, 6.0)])
def test_matches_the_reference_port(seed, n, sigma):
  candidates, references, corpus = random_problem(seed)
  expected = cider_reference.cider_d(candidates, references, corpus, n=n, sigma=sigma)
  got = cider.CiderD(corpus, n=n, sigma=sigma).score(candidates, references)
  assert got.dtype == np.float64 and got.shape == (len(candidates),)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
  # Non-trivial scores: partial copies score well above 0, and not all the same.
  assert expected.max() > 2.0 and np.mean(expected > 0.1) > 0.4, expected


def test_hand_checked_values():
  corpus = [[[5, 6, 7]], [[5, 8]], [[5, 9, 9]]]  # 5 is in every corpus image: df 3, idf 0
  scorer = cider.CiderD(corpus)
  unseen = [100, 101, 102, 103, 104]
  # A caption identical to the only reference: sim_k = 1 for every order it has.
  assert scorer.score([unseen], [[unseen]])[0] == pytest.approx(10.0, abs=1e-12)
  assert scorer.score([unseen[:2]], [[unseen[:2]]])[0] == pytest.approx(5.0, abs=1e-12)  # no 3-, 4-grams
  # Nothing but idf-0 n-grams, or nothing at all: zero norms give 0, never NaN.
  scores = scorer.score([[5], [], [6, 7]], [[[5]], [[6, 7]], [[]]])
  np.testing.assert_array_equal(scores, [0.0, 0.0, 0.0])
  # idf by hand: log(3 images) - log(df).
  keys = cider.ngram_keys([[5], [6], [6, 7], [9, 9], [7, 6], [100]])
  np.testing.assert_allclose(scorer.idf(keys), np.log(3) - np.log([3, 1, 1, 1, 1, 1]), rtol=0, atol=1e-15)


def test_ngram_keys_are_distinct_across_orders_and_positions():
  top = 2 ** 15 - 1
  ngrams = [[0], [1], [0, 1], [1, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 0, 1], [top], [top] * 4,
            [top, 0], [0, top], [0, 0], [0, 0, 0], [0, 0, 0, 0]]
  keys = cider.ngram_keys(ngrams)
  assert len(set(keys.tolist())) == len(ngrams) and (keys >= 0).all()
  with pytest.raises(ValueError):
    cider.ngram_keys([[2 ** 15]])


# ----------------------------------------------------------------------------- input forms

def decoder_rows(rng, captions, length):
  """(rows, what each row holds): rows as a decoder would emit them, with pads sprinkled in, then END
  (no END when the caption fills the row) and junk after it: tokens, pads, more ENDs."""
  rows = np.full((len(captions), length), PAD, np.int32)
  held = []
  for row, caption in zip(rows, captions):
    tokens = []
    for t in caption:
      tokens += [PAD] * int(rng.random() < 0.2) + [t]
    tokens = tokens[:length]
    held.append([t for t in tokens if t != PAD])
    row[:len(tokens)] = tokens
    if len(tokens) < length:
      row[len(tokens)] = END
      row[len(tokens) + 1:] = rng.choice([PAD, END, 7, 9], length - len(tokens) - 1)
  return rows, held


def test_array_form_with_end_and_pad_equals_list_form():
  rng = np.random.default_rng(10)
  # Token ids from 3 up, so that PAD (0) and END (2) never occur inside a caption.
  shift = lambda captions: [[t + 3 for t in c] for c in captions]  # noqa: E731
  references = [shift(refs) for refs in random_references(rng, 30, 20)]
  corpus = [shift(refs) for refs in random_references(rng, 25, 16)] + references[::3]
  captions = shift(candidates_like(rng, references, 25))
  captions[0] = references[0][0] + [40] * 30  # longer than the row: cut by the row, without END
  rows, clean = decoder_rows(rng, captions, 24)
  assert END not in rows[0] and sum(END in row for row in rows) > 20

  scorer = cider.CiderD(corpus)
  expected = scorer.score(clean, references)
  np.testing.assert_allclose(expected, cider_reference.cider_d(clean, references, corpus), atol=1e-6)
  assert expected.max() > 1.0 and np.mean(expected > 0.1) > 0.4
  np.testing.assert_allclose(scorer.score(rows, references, end_id=END, pad_id=PAD), expected, atol=1e-12)
  np.testing.assert_allclose(scorer.score(list(rows), references, end_id=END, pad_id=PAD), expected,
                             atol=1e-12)  # the same rows as a list of sequences
  # Without end_id the junk after END counts: the scores change.
  assert not np.allclose(scorer.score(rows, references, pad_id=PAD), expected)


def test_prepared_references_equal_unprepared():
  rng = np.random.default_rng(11)
  _, references, corpus = random_problem(11)
  scorer = cider.CiderD(corpus)
  images, k = len(references), 5
  samples = candidates_like(rng, [refs for refs in references for _ in range(k)], 40)
  by_sample = np.repeat(np.arange(images), k)
  expected = cider_reference.cider_d(samples, [references[i] for i in by_sample], corpus)
  assert expected.max() > 2.0

  # One candidate per reference set, uncached.
  uncached = scorer.score(samples, [references[i] for i in by_sample])
  np.testing.assert_allclose(uncached, expected, rtol=0, atol=1e-6)
  # The batch's references prepared once, for K samples per image and then a baseline.
  prepared = scorer.prepare(references)
  np.testing.assert_allclose(scorer.score(samples, prepared, by_sample), uncached, rtol=0, atol=1e-12)
  baseline = samples[::k]
  np.testing.assert_allclose(scorer.score(baseline, prepared), uncached[::k], rtol=0, atol=1e-12)
  # A whole split prepared once, addressed by dataset index, in any order and with repeats.
  split = scorer.prepare(references + corpus)
  order = rng.permutation(len(samples))
  np.testing.assert_allclose(scorer.score([samples[i] for i in order], split, by_sample[order]),
                             uncached[order], rtol=0, atol=1e-12)


@pytest.mark.parametrize('chunk_references', [1, 7, 40])
def test_cooking_in_chunks_changes_no_score(chunk_references):
  # COCO's references are cooked a chunk of images at a time to bound memory: the document frequencies
  # summed over chunks, the (n-gram, image) pairs and the n-grams the corpus lacks (numbered per chunk,
  # then renumbered) must come out as if cooked at once, bit for bit.
  rng = np.random.default_rng(13)
  _, references, corpus = random_problem(13)
  whole = cider.CiderD(corpus, chunk_references=10 ** 9)
  chunked = cider.CiderD(corpus, chunk_references=chunk_references)
  keys = cider.ngram_keys([[1], [2, 3], [4, 5, 6], [7, 8, 9, 10]])
  np.testing.assert_array_equal(chunked.idf(keys), whole.idf(keys))
  np.testing.assert_array_equal(chunked._corpus.keys[np.argsort(chunked._corpus.keys)],
                                np.sort(whole._corpus.keys))
  # References the corpus has never seen, several images' worth per chunk.
  novel = random_references(rng, 30, 300)
  split = references + novel
  samples = candidates_like(rng, split, 300)
  index = rng.integers(0, len(split), len(samples))
  expected = whole.score(samples, whole.prepare(split), index)
  prepared = chunked.prepare(split)
  assert len(prepared.unseen) > 100
  np.testing.assert_array_equal(chunked.score(samples, prepared, index), expected)
  with pytest.raises(ValueError, match='chunk_references'):
    cider.CiderD(corpus, chunk_references=0)


def test_edge_cases():
  rng = np.random.default_rng(12)
  corpus = random_references(rng, 20, 10)
  scorer = cider.CiderD(corpus)
  references = [[[1, 2, 3, 4]], [[1, 2, 3, 4], [], [4, 3]], [[]], [[11, 12, 13]]]
  candidates = [[], [1, 2, 3, 4], [1, 2, 3], [11, 12, 13]]  # empty; copy; against an empty ref; unseen
  got = scorer.score(candidates, references)
  assert np.isfinite(got).all() and got[0] == 0.0 and got[2] == 0.0 and got[3] > 0
  np.testing.assert_allclose(got, cider_reference.cider_d(candidates, references, corpus), atol=1e-6)
  assert scorer.score([], []).shape == (0,)
  rows = np.array([[END, 5, 6], [PAD, PAD, PAD]])  # nothing before END; all padding
  np.testing.assert_array_equal(scorer.score(rows, references[:2], end_id=END, pad_id=PAD), [0.0, 0.0])


def test_rejects_bad_input():
  scorer = cider.CiderD([[[1, 2, 3]], [[2, 3]]])
  with pytest.raises(ValueError, match='token ids'):
    scorer.score([[2 ** 15]], [[[1]]])
  with pytest.raises(ValueError, match='token ids'):
    scorer.score([[-1]], [[[1]]])
  with pytest.raises(ValueError, match='at least one reference'):
    scorer.prepare([[[1, 2]], []])
  with pytest.raises(ValueError, match='another CiderD'):
    scorer.score([[1, 2]], cider.CiderD([[[1, 2]]]).prepare([[[1, 2]]]))
  prepared = scorer.prepare([[[1, 2]], [[2, 3]]])
  with pytest.raises(ValueError, match='pass image_index'):
    scorer.score([[1, 2]], prepared)
  with pytest.raises(ValueError, match='out of range'):
    scorer.score([[1, 2]], prepared, [2])
  with pytest.raises(ValueError, match='shape'):
    scorer.score([[1, 2]], prepared, [0, 1])
  with pytest.raises(ValueError, match='n must be'):
    cider.CiderD([[[1]]], n=5)


# ----------------------------------------------------------------------------- pycocoevalcap

@pytest.mark.parametrize('seed', [20, 21])
def test_agrees_with_pycocoevalcap_when_the_corpus_is_the_evaluated_references(seed):
  """pycocoevalcap's Cider takes df from the evaluated references: with corpus = those, the same numbers."""
  rng = np.random.default_rng(seed)
  references = random_references(rng, 40, len(WORDS), max_refs=5, max_len=14)
  candidates = candidates_like(rng, references, len(WORDS))
  text = lambda caption: ' '.join(WORDS[t] for t in caption)  # noqa: E731
  gts = {str(i): [text(r) for r in refs] for i, refs in enumerate(references)}
  res = {str(i): [text(c)] for i, c in enumerate(candidates)}
  _, expected = Cider().compute_score(gts, res)
  assert expected.max() > 2.0
  np.testing.assert_allclose(cider.CiderD(references).score(candidates, references), expected,
                             rtol=0, atol=1e-6)
  np.testing.assert_allclose(cider_reference.cider_d(candidates, references, references), expected,
                             rtol=0, atol=1e-6)
