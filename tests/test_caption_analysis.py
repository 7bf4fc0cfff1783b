"""capjax.evaluation.caption_analysis: per-image scores that add up to the corpus scores, paper-style BLEU
checked by hand, and the collapse detectors."""

import math
import shutil

from pycocoevalcap.bleu.bleu import Bleu
import pytest

from capjax.evaluation import caption_analysis
from capjax.evaluation import metrics

needs_java = pytest.mark.skipif(shutil.which('java') is None, reason='the PTB tokenizer needs Java')

REFERENCES = {
    'surf': ['A man riding a wave on top of a surfboard.', 'A surfer rides a large wave in the ocean!',
             "The surfer's board cuts through the wave."],
    'dogs': ['Two dogs playing with a frisbee in the park.',
             'Dogs run across the grass (chasing a frisbee).'],
    'food': ['A plate with a sandwich and fries on it.', 'A sandwich, cut in half, next to French fries.'],
    'bus': ['A red double-decker bus parked on the street.', 'A big red bus in London, England.'],
    'cat': ['A cat laying on top of a laptop computer.', "A cat doesn't want its owner to work..."],
    'sign': ['A STOP sign at the corner of an intersection.', 'A red stop sign next to the road.'],
}
CANDIDATES = {
    'surf': 'a man riding a wave on a surfboard', 'dogs': 'two dogs play with a frisbee',
    'food': 'a sandwich and fries on a plate', 'bus': 'a red bus on the street',
    'cat': "a cat's sleeping on a laptop", 'sign': 'a stop sign on a street corner',
}


# ----------------------------------------------------------------------------- per-image scores

@pytest.mark.parametrize('tokenizer', ['python', pytest.param('ptb', marks=needs_java)])
def test_per_image_scores_add_up_to_the_corpus_scores(tokenizer):
  scores = caption_analysis.per_image_scores(CANDIDATES, REFERENCES, tokenizer=tokenizer)
  corpus = metrics.compute_caption_metrics(CANDIDATES, REFERENCES, metrics=('bleu', 'cider'),
                                           tokenizer=tokenizer)
  assert scores.tokenizer == tokenizer and list(scores.per_image) == list(CANDIDATES)
  assert scores.corpus == pytest.approx(corpus, abs=1e-12, rel=0)
  mean_cider = sum(s['CIDEr'] for s in scores.per_image.values()) / len(CANDIDATES)
  assert mean_cider == pytest.approx(corpus['CIDEr'], abs=1e-12, rel=0)
  assert all(set(s) == {'CIDEr', 'Bleu_4'} and all(isinstance(v, float) for v in s.values())
             for s in scores.per_image.values())


def test_per_image_bleu_is_the_bleu_of_that_image_alone():
  scores = caption_analysis.per_image_scores(CANDIDATES, REFERENCES, tokenizer='python')
  for image_id in ('surf', 'cat'):
    alone = metrics.compute_caption_metrics({image_id: CANDIDATES[image_id]}, REFERENCES, metrics=('bleu',),
                                            tokenizer='python')
    assert scores.per_image[image_id]['Bleu_4'] == pytest.approx(alone['Bleu_4'], abs=1e-12, rel=0)


def test_per_image_scores_checks_its_input():
  with pytest.raises(ValueError, match='no references'):
    caption_analysis.per_image_scores({'x': 'a dog'}, REFERENCES, tokenizer='python')
  with pytest.raises(ValueError, match='tokenizer'):
    caption_analysis.per_image_scores(CANDIDATES, REFERENCES, tokenizer='spacy')


# ----------------------------------------------------------------------------- paper-style BLEU

# Three captions whose n-gram counts are easy to do by hand (lower-cased, split on spaces: 'grass.'
# keeps its period).
HAND_CANDIDATES = {1: 'a dog runs on grass', 2: 'two cats sleeping', 3: 'a cat a cat'}
HAND_REFERENCES = {1: ['A dog runs on the grass.', 'A brown dog is running outside.'],
                   2: ['Two cats are sleeping on a bed', 'two cats sleeping'],
                   3: ['A cat on a mat']}


def test_paper_bleu_matches_a_hand_computation():
  # Clipped n-gram matches / candidate n-grams, per caption, for n = 1..4:
  #   1 'a dog runs on grass' (refs of 6 and 6 words): 1-grams 4/5 ('grass' is not 'grass.'),
  #     2-grams 3/4 (a dog, dog runs, runs on), 3-grams 2/3, 4-grams 1/2 (a dog runs on).
  #   2 'two cats sleeping' (refs of 7 and 3 words): 3/3, 2/2, 1/1, and 4-grams 0/1: NLTK counts a
  #     denominator of max(1, 0) = 1 for a caption shorter than n.
  #   3 'a cat a cat' (ref 'a cat on a mat', 5 words): 1-grams a x2 (ref has 2) + cat x2 (ref has 1)
  #     -> 3/4; 2-grams 'a cat' x2 clipped to 1, 'cat a' 0 -> 1/3; 3-grams 0/2; 4-grams 0/1.
  p = [(4 + 3 + 3) / (5 + 3 + 4), (3 + 2 + 1) / (4 + 2 + 3), (2 + 1 + 0) / (3 + 1 + 2),
       (1 + 0 + 0) / (2 + 1 + 1)]
  # Candidate length c = 5 + 3 + 4 = 12; closest reference lengths r = 6 + 3 + 5 = 14 (a tie: the shorter).
  brevity = math.exp(1 - 14 / 12)
  expected = {f'BLEU-{n}': brevity * math.prod(p[:n]) ** (1 / n) for n in range(1, 5)}
  assert caption_analysis.paper_bleu(HAND_CANDIDATES, HAND_REFERENCES) == pytest.approx(expected, rel=1e-12)


def test_paper_bleu_differs_from_coco_bleu_where_documented():
  # coco-caption's BleuScorer on the very same tokens: caption 2 adds 0, not 1, to the 4-gram count.
  gts = {i: [r.lower() for r in refs] for i, refs in HAND_REFERENCES.items()}
  res = {i: [c] for i, c in HAND_CANDIDATES.items()}
  coco, _ = Bleu(4).compute_score(gts, res, verbose=0)
  p = [10 / 12, 6 / 9, 3 / 6, 1 / 3]
  assert coco[3] == pytest.approx(math.exp(1 - 14 / 12) * math.prod(p) ** 0.25, rel=1e-7)
  # No 4-gram matches at all (1-, 2-, 3-grams 5/5, 2/4, 1/3; 4-grams 0/2): NLTK's BLEU-4 is 0,
  # coco-caption's is small but not 0: exp(1 - 6/5) * (1 * 2/4 * 1/3 * 1e-15 / 2) ** (1/4).
  candidates, references = {1: 'the dog is on grass'}, {1: ['a dog is on the grass']}
  assert caption_analysis.paper_bleu(candidates, references)['BLEU-4'] < 1e-50
  coco, _ = Bleu(4).compute_score({1: references[1]}, {1: [candidates[1]]}, verbose=0)
  assert coco[3] == pytest.approx(math.exp(1 - 6 / 5) * (1 / 2 * 1 / 3 * 1e-15 / 2) ** 0.25, rel=1e-6)
  assert 1e-5 < coco[3] < 1e-3
  # Punctuation: coco-caption drops it, the paper style keeps it on the word.
  perfect = {1: 'a dog runs on the grass'}, {1: ['A dog runs on the grass.']}
  coco_bleu = metrics.compute_caption_metrics(*perfect, metrics=('bleu',), tokenizer='python')
  assert coco_bleu['Bleu_1'] == pytest.approx(1.0, abs=1e-8)
  assert caption_analysis.paper_bleu(*perfect)['BLEU-1'] == pytest.approx(5 / 6)


def test_paper_bleu_of_perfect_and_unrelated_captions():
  perfect = {i: refs[0] for i, refs in REFERENCES.items()}
  assert caption_analysis.paper_bleu(perfect, REFERENCES) == pytest.approx(
      {f'BLEU-{n}': 1.0 for n in range(1, 5)})
  unrelated = {i: 'xyzzy plugh' for i in REFERENCES}
  assert caption_analysis.paper_bleu(unrelated, REFERENCES) == {f'BLEU-{n}': 0.0 for n in range(1, 5)}


# ----------------------------------------------------------------------------- collapse detectors

TRAIN = ['A man riding a wave on top of a surfboard.', 'Two dogs play with a frisbee!', 'A red bus.']


def test_collapse_warning_fires_on_one_caption_for_every_image():
  captions = {i: 'a man riding a wave on top of a surfboard' for i in range(20)}
  report = caption_analysis.collapse_report(captions, TRAIN, 1000, {i: ['A man surfing.'] for i in range(20)})
  assert report.warning.startswith('Mode collapse: 1 distinct caption for 20 images')
  assert '"a man riding a wave on top of a surfboard"' in report.warning
  assert (report.distinct_captions, report.top_caption_share, report.in_train_fraction) == (1, 1, 1)
  assert report.most_repeated == [{'caption': 'a man riding a wave on top of a surfboard', 'count': 20,
                                   'share': 1.0}]


def test_collapse_warning_fires_on_a_handful_of_captions():
  # No caption covers half the images, but only 3 distinct captions for 20 images (15% < 20%).
  captions = {i: ['a dog', 'a cat', 'a bus'][i % 3] for i in range(20)}
  report = caption_analysis.collapse_report(captions, TRAIN, 1000)
  assert report.top_caption_share < caption_analysis.TOP_SHARE_WARNING and report.warning


def test_collapse_warning_fires_on_two_or_three_alternating_captions():
  # What an undertrained demo model wrote for 16 test images: no caption covers half of them and a
  # quarter are distinct, but three captions cover 15 of the 16.
  written = ['a on on on'] * 6 + ['a a a on on'] * 6 + ['a a a the the the'] * 3 + ['a on']
  report = caption_analysis.collapse_report(dict(enumerate(written)), TRAIN, 33)
  assert report.top_caption_share < caption_analysis.TOP_SHARE_WARNING <= report.top_few_share
  assert report.distinct_ratio >= caption_analysis.DISTINCT_RATIO_WARNING
  assert report.top_few_share == 15 / 16
  assert report.warning.startswith('Mode collapse: 4 distinct captions for 16 images (25%); the most '
                                   'common one, "a on on on", is written for 6 of them (38%), and the 3 '
                                   'most common for 15 (94%).')


def test_no_collapse_warning_for_varied_captions_or_too_few_images():
  assert caption_analysis.collapse_report(CANDIDATES, TRAIN, 1000, REFERENCES).warning is None
  # A healthy captioner repeats its commonest captions now and then: 3 captions for 2-3 images each.
  varied = [f'a {c} {s} on the {p}' for c in ('red', 'blue', 'green') for s in ('circle', 'square')
            for p in ('left', 'right', 'top')]
  report = caption_analysis.collapse_report(dict(enumerate(varied + varied[:3] + varied[:1])), TRAIN, 33)
  assert report.top_few_share == pytest.approx(7 / 22) and report.warning is None
  few = {i: 'a dog' for i in range(caption_analysis.MIN_IMAGES_FOR_WARNING - 1)}
  assert caption_analysis.collapse_report(few, TRAIN, 1000).warning is None


def test_collapse_counts_on_a_hand_built_case():
  captions = {
      1: 'a man riding a wave on top of a surfboard',  # a training caption, without its period
      2: 'two dogs play with a frisbee',  # a training caption, without its '!'
      3: 'two dogs play with a frisbee',
      4: 'a red bus <UNK>',  # not in training ('a red bus' is)
      5: 'a cat on a laptop',
  }
  references = {1: ['A surfer.', 'A man rides a big wave!'], 2: ['Two dogs.'], 3: ['Dogs play.'],
                4: ['A red bus on the street.'], 5: ['A cat on a laptop computer.']}
  report = caption_analysis.collapse_report(captions, TRAIN, 50, references)
  assert report.images == 5 and report.distinct_captions == 4 and report.distinct_ratio == 0.8
  assert report.most_repeated == [{'caption': 'two dogs play with a frisbee', 'count': 2, 'share': 0.4}]
  assert report.in_train_fraction == pytest.approx(3 / 5)
  assert report.novel_fraction == pytest.approx(2 / 5)
  # Distinct words, <UNK> not counted: a man riding wave on top of surfboard two dogs play with frisbee
  # red bus cat laptop.
  assert report.words_used == 17 and report.vocab_coverage == pytest.approx(17 / 50)
  histogram = report.length_histogram
  assert histogram['lengths'] == list(range(11))
  assert histogram['generated'] == [0, 0, 0, 0, 1, 1, 2, 0, 0, 0, 1]  # 10, 6, 6, 4 ('unk' is a word), 5
  assert histogram['references'] == [0, 0, 3, 0, 0, 0, 3, 0, 0, 0, 0]  # 2, 6, 2, 2, 6, 6
  assert report.mean_length == {'generated': pytest.approx(31 / 5), 'references': pytest.approx(24 / 6)}
  assert report.warning is None
