"""What an evaluation's captions say beyond the corpus scores: per-image scores, paper-style BLEU, and
signs of mode collapse (one caption for every image).

Pure functions (Python and numpy; no JAX), whose outputs go into the evaluation report
(`capjax/evaluation/report.py`) and its JSON:

- `per_image_scores`: pycocoevalcap's own CIDEr-D and BLEU scorers, per image and for the corpus, on
  captions tokenised exactly as `metrics.compute_caption_metrics` tokenises them, so that the mean of the
  per-image CIDEr is the corpus CIDEr that the metrics table reports (an evaluation gets both from one
  `metrics.score_tokenized` call).
- `paper_bleu`: BLEU-1..4 the way many papers and PyTorch repositories compute it (NLTK's
  `corpus_bleu`), which is not coco-caption's BLEU; the differences are listed in its docstring.
- `collapse_report`: a `CollapseReport` of distinct captions, the most repeated ones, captions copied from
  the training set, vocabulary use, caption lengths, and a warning sentence when the model says the same
  thing for most images.
"""

from __future__ import annotations

from collections import Counter
import dataclasses
from typing import Hashable, Iterable, Mapping, Sequence
import warnings

from nltk.translate import bleu_score
import numpy as np

from capjax.evaluation import metrics as metrics_lib
from capjax import vocab as vocab_lib

# collapse_report's warning fires, on at least MIN_IMAGES_FOR_WARNING images, when the TOP_FEW most
# common repeated captions (each written for 2+ images) are written for at least TOP_SHARE_WARNING of
# the images, or when fewer than DISTINCT_RATIO_WARNING captions per image are distinct. A trained COCO
# captioner with greedy or beam decoding repeats itself (typically a third to two thirds of its
# captions are distinct, and its most common caption covers a few percent of the images); a collapsed
# one writes a handful of captions in all. Counting the few most common captions, not only the first,
# catches a model that alternates between two or three ('a a a on on' and 'a on on on' for 12 of 16
# images, as an undertrained demo model does); counting only repeated ones keeps a handful of
# images with all-different captions from looking collapsed.
TOP_SHARE_WARNING = 0.5
TOP_FEW = 3
DISTINCT_RATIO_WARNING = 0.2
MIN_IMAGES_FOR_WARNING = 5
MOST_REPEATED = 10

# What paper_bleu computes, in one line for the evaluation JSON (its docstring has the details).
PAPER_BLEU_VARIANT = ('NLTK corpus_bleu (nltk.translate.bleu_score), no smoothing, uniform weights over '
                      '1..n-grams, every reference, captions lower-cased and split on whitespace '
                      '(punctuation stays on the words); not coco-caption BLEU')

# paper_bleu's BLEU-n: uniform weights over 1..n-grams, as papers report BLEU-1..4.
_PAPER_BLEU_WEIGHTS = {f'BLEU-{n}': (1.0 / n,) * n for n in range(1, 5)}


# ----------------------------------------------------------------------------- per-image scores

@dataclasses.dataclass(frozen=True)
class CaptionScores:
  """`per_image_scores`' result.

  corpus: {'CIDEr', 'Bleu_1'..'Bleu_4'}, equal to what `compute_caption_metrics` reports for them.
  per_image: image id -> {'CIDEr': float, 'Bleu_4': float}, in the order of the candidates. The
    corpus CIDEr is the mean of the per-image CIDEr; the corpus BLEU is not the mean of per-image BLEU
    (BLEU pools n-gram counts over the corpus before dividing).
  tokenizer: 'ptb' or 'python', the tokeniser actually used (for the report's provenance).
  """
  corpus: dict[str, float]
  per_image: dict[Hashable, dict[str, float]]
  tokenizer: str


def per_image_scores(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
                     tokenizer: str = 'auto') -> CaptionScores:
  """CIDEr-D and BLEU-4 of every image, and the corpus CIDEr-D and BLEU-1..4, by pycocoevalcap.

  candidates, references and tokenizer are as in `capjax.evaluation.metrics.compute_caption_metrics` (one
  generated caption per image id; the references must cover every candidate id). As there, 'auto'
  falls back to the Python tokeniser when Java is missing or fails.
  """
  tokenized = metrics_lib.tokenize_for_scoring(references, {'candidates': candidates}, tokenizer)
  scores = metrics_lib.score_tokenized(tokenized, 'candidates', metrics=('cider', 'bleu'))
  per_image = {i: {'CIDEr': s['CIDEr'], 'Bleu_4': s['Bleu_4']} for i, s in scores.per_image.items()}
  return CaptionScores(corpus=scores.corpus, per_image=per_image, tokenizer=tokenized.tokenizer)


# ----------------------------------------------------------------------------- paper-style BLEU

def paper_bleu(candidates: Mapping[Hashable, str],
               references: Mapping[Hashable, Sequence[str]]) -> dict[str, float]:
  """BLEU-1..4 as many captioning papers and PyTorch repositories report them: {'BLEU-1'..'BLEU-4'}.

  The variant: NLTK's `corpus_bleu` (nltk.translate.bleu_score) with no smoothing, BLEU-n with uniform
  weights 1/n over 1..n-grams (BLEU-4: the default (0.25,) * 4), every reference of an image, on
  captions that are only lower-cased and split on whitespace.

  How it differs from coco-caption's Bleu_1..Bleu_4 (pycocoevalcap/bleu/bleu_scorer.py), which
  `capjax.evaluation.metrics` reports:
  - Tokens. coco-caption runs the PTB tokenizer and drops punctuation: 'surfboard.' -> 'surfboard',
    "man's" -> "man 's". Here punctuation stays on the word, so 'surfboard' in a generated caption does
    not match 'surfboard.' at the end of a reference, and the scores come out lower. (Repositories that
    feed NLTK Karpathy's pre-tokenised 'tokens' field have no punctuation either; they still differ
    from coco-caption in the two points below.)
  - Short candidates. For a candidate with fewer than n words NLTK still adds 1 to the corpus n-gram
    denominator (its `modified_precision` divides by max(1, count)); coco-caption adds 0
    (guess = max(0, len - n + 1)). So captions of 1-3 words lower NLTK's BLEU-4 and coco's not.
  - No n-gram match. When no n-gram of some order k <= n matches in the whole corpus, NLTK's BLEU-n is
    0 (it uses the smallest float for that precision; and it returns exactly 0 when no unigram
    matches). coco-caption adds tiny = 1e-15 to every corpus match count and small = 1e-9 to every
    corpus n-gram count, so its BLEU-n is small but not 0: precision_k becomes 1e-15 / count_k, e.g.
    BLEU-4 ~ 1e-4 when only the 4-grams miss, far less when lower orders miss too. Where every order
    has a match the constants change the scores by less than 1e-8. (Per-image BLEU, which NLTK's
    corpus_bleu does not give, has the same constants in coco-caption.)
  - Brevity penalty: the same. Both sum, over the corpus, the candidate lengths c and the reference
    length closest to each candidate's (a tie goes to the shorter reference), and multiply by
    exp(1 - r / c) when c < r; coco-caption computes c / r with its tiny constants (c + 1e-15) /
    (r + 1e-9), which differs from NLTK by less than 1e-8 (and gives exp(-1e-9 / c), not 1, at c = r).
  """
  image_ids = metrics_lib.check_image_ids(candidates, references)
  hypotheses = [_lower_split(candidates[i]) for i in image_ids]
  list_of_references = [[_lower_split(r) for r in references[i]] for i in image_ids]
  with warnings.catch_warnings():
    # method0 warns, once per n-gram order without a match, that BLEU-n "evaluates to 0".
    warnings.simplefilter('ignore', UserWarning)
    scores = bleu_score.corpus_bleu(list_of_references, hypotheses,
                                    weights=list(_PAPER_BLEU_WEIGHTS.values()))
  return {name: float(s) for name, s in zip(_PAPER_BLEU_WEIGHTS, scores)}


def _lower_split(caption: str) -> list[str]:
  return caption.lower().split()


# ----------------------------------------------------------------------------- collapse detectors

@dataclasses.dataclass(frozen=True)
class CollapseReport:
  """Signs that a model writes the same caption whatever the image (`collapse_report`).

  Captions are compared after `capjax.vocab.tokenize` (lower-case, punctuation dropped), the model's own
  view of its training text, so 'A dog on a couch.' in the training set matches a generated 'a dog on a
  couch'.
    images, distinct_captions, distinct_ratio (distinct / images),
    most_repeated: up to 10 [{'caption', 'count', 'share'}] of the captions written for 2+ images,
    top_caption_share: the share of images that get the most common caption,
    top_few_share: the share of images that get one of the TOP_FEW most common captions written for
      2+ images (0 when no caption repeats),
    in_train_fraction: share of generated captions that are, verbatim, a training caption;
      novel_fraction = 1 - in_train_fraction ("novelty" in the captioning literature),
    words_used (distinct words in the generated captions, specials such as <UNK> not counted),
      vocab_size, vocab_coverage = words_used / vocab_size,
    mean_length {'generated', 'references'} in words,
    length_histogram {'lengths': [0..longest], 'generated': [count per length],
                      'references': [count per length] (zeros without references)},
    thresholds: the values the warning uses (module constants),
    warning: a sentence when the captions look collapsed (see TOP_SHARE_WARNING), else None.
  The warning thresholds suit test splits of tens of images and more; on a handful of images it is
  noise. `as_dict()` is the JSON form (the evaluation record's 'collapse').
  """
  images: int
  distinct_captions: int
  distinct_ratio: float
  most_repeated: list[dict]
  top_caption_share: float
  top_few_share: float
  in_train_fraction: float
  novel_fraction: float
  words_used: int
  vocab_size: int
  vocab_coverage: float
  mean_length: dict
  length_histogram: dict
  thresholds: dict
  warning: str | None

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def collapse_report(captions: Mapping[Hashable, str], train_captions: Iterable[str], vocab_size: int,
                    references: Mapping[Hashable, Sequence[str]] | None = None) -> CollapseReport:
  """A `CollapseReport` of generated captions.

  captions: image id -> generated caption (the decoder's words joined by spaces). train_captions: the
  training split's reference captions (raw text). vocab_size: how many words the model can write,
  e.g. `len(vocab) - len(vocab_lib.SPECIALS)`. references: image id -> reference captions, for the
  length histogram (optional).
  """
  if not captions:
    raise ValueError('no captions to analyse')
  normalised = {i: _normalise(c) for i, c in captions.items()}
  counts = Counter(normalised.values())
  images, distinct = len(normalised), len(counts)
  top_caption, top_count = counts.most_common(1)[0]
  train = {_normalise(c) for c in train_captions}
  in_train = sum(c in train for c in normalised.values()) / images
  words = {w for c in captions.values() for w in c.split() if w not in vocab_lib.SPECIALS}
  facts = {
      'images': images, 'distinct_captions': distinct, 'distinct_ratio': distinct / images,
      'most_repeated': [{'caption': c, 'count': n, 'share': n / images}
                        for c, n in counts.most_common(MOST_REPEATED) if n > 1],
      'top_caption_share': top_count / images,
      'top_few_share': sum(n for _, n in counts.most_common(TOP_FEW) if n > 1) / images,
      'in_train_fraction': in_train, 'novel_fraction': 1.0 - in_train,
      'words_used': len(words), 'vocab_size': int(vocab_size),
      'vocab_coverage': len(words) / vocab_size if vocab_size else 0.0,
      **_lengths(captions.values(), [r for refs in (references or {}).values() for r in refs]),
      'thresholds': {'top_few': TOP_FEW, 'top_few_share': TOP_SHARE_WARNING,
                     'distinct_ratio': DISTINCT_RATIO_WARNING, 'min_images': MIN_IMAGES_FOR_WARNING},
  }
  return CollapseReport(**facts, warning=_collapse_warning(facts, top_caption, top_count))


def _normalise(caption: str) -> str:
  return ' '.join(vocab_lib.tokenize(caption))


def _lengths(generated: Iterable[str], references: list[str]) -> dict:
  generated = [len(vocab_lib.tokenize(c)) for c in generated]
  referenced = [len(vocab_lib.tokenize(r)) for r in references]
  longest = max(generated + referenced)
  return {
      'mean_length': {'generated': float(np.mean(generated)),
                      'references': float(np.mean(referenced)) if referenced else None},
      'length_histogram': {'lengths': list(range(longest + 1)),
                           'generated': np.bincount(generated, minlength=longest + 1).tolist(),
                           'references': np.bincount(referenced, minlength=longest + 1).tolist()},
  }


def _collapse_warning(report: dict, top_caption: str, top_count: int) -> str | None:
  """One sentence for the report's banner, or None when the captions vary enough (or too few images)."""
  images, distinct, few_share = report['images'], report['distinct_captions'], report['top_few_share']
  top_share, distinct_ratio = top_count / images, distinct / images
  if images < MIN_IMAGES_FOR_WARNING or (few_share < TOP_SHARE_WARNING and
                                         distinct_ratio >= DISTINCT_RATIO_WARNING):
    return None
  plural = 's' if distinct != 1 else ''
  few = min(TOP_FEW, len(report['most_repeated']))
  few_clause = (f', and the {few} most common for {round(few_share * images)} ({few_share:.0%})'
                if few > 1 else '')
  return (f'Mode collapse: {distinct} distinct caption{plural} for {images} images ({distinct_ratio:.0%}); '
          f'the most common one, "{top_caption}", is written for {top_count} of them ({top_share:.0%})'
          f'{few_clause}. The model says nearly the same thing whatever the picture, so its scores measure '
          'how well a few generic captions fit this image set, not how well it describes images.')
