"""coco-caption's CIDEr-D scorer ported line by line onto token ids: the independent implementation that
`capjax.evaluation.cider` (the vectorised reward) is tested against. Dicts and loops; for tests only."""

from collections import defaultdict
from typing import Sequence

import numpy as np


def cider_d(candidates: Sequence[Sequence[int]], references: Sequence[Sequence[Sequence[int]]],
            corpus_references: Sequence[Sequence[Sequence[int]]], n: int = 4,
            sigma: float = 6.0) -> np.ndarray:
  """coco-caption's ``CiderScorer`` ported line by line onto token ids, with df from
  ``corpus_references`` (as ciderD_scorer.py with a precomputed df): dicts and loops, for tests.

  One change: ``n`` reaches the n-gram counting too. The original's ``cook_refs``/``cook_test`` always
  count 1- to 4-grams, so there any n < 4 raises an IndexError and n > 4 scores nothing above 4-grams.
  """
  def precook(caption):
    words = [int(t) for t in caption]
    counts = defaultdict(int)
    for k in range(1, n + 1):
      for i in range(len(words) - k + 1):
        counts[tuple(words[i:i + k])] += 1
    return counts

  document_frequency = defaultdict(float)
  for refs in corpus_references:
    for ngram in set(ngram for ref in refs for ngram in precook(ref)):
      document_frequency[ngram] += 1
  ref_len = np.log(float(len(corpus_references)))

  def counts2vec(cnts):
    vec = [defaultdict(float) for _ in range(n)]
    length = 0
    norm = [0.0 for _ in range(n)]
    for ngram, term_freq in cnts.items():
      df = np.log(max(1.0, document_frequency[ngram]))
      order = len(ngram) - 1
      vec[order][ngram] = float(term_freq) * (ref_len - df)
      norm[order] += pow(vec[order][ngram], 2)
      if order == 1:
        length += term_freq
    return vec, [np.sqrt(x) for x in norm], length

  def sim(vec_hyp, vec_ref, norm_hyp, norm_ref, length_hyp, length_ref):
    delta = float(length_hyp - length_ref)
    val = np.zeros(n)
    for order in range(n):
      for ngram in vec_hyp[order]:
        val[order] += min(vec_hyp[order][ngram], vec_ref[order][ngram]) * vec_ref[order][ngram]
      if norm_hyp[order] != 0 and norm_ref[order] != 0:
        val[order] /= norm_hyp[order] * norm_ref[order]
      val[order] *= np.e ** (-(delta ** 2) / (2 * sigma ** 2))
    return val

  scores = []
  for test, refs in zip(candidates, references):
    vec, norm, length = counts2vec(precook(test))
    score = np.zeros(n)
    for ref in refs:
      vec_ref, norm_ref, length_ref = counts2vec(precook(ref))
      score += sim(vec, vec_ref, norm, norm_ref, length, length_ref)
    scores.append(np.mean(score) / len(refs) * 10.0)
  return np.array(scores, np.float64)
