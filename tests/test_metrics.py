"""capjax.evaluation.metrics against pycocoevalcap's scorers called directly, the standard coco-caption
way."""

import contextlib
import io
import logging
import shutil

import pytest

from capjax.evaluation import metrics

HAVE_JAVA = shutil.which('java') is not None
needs_java = pytest.mark.skipif(not HAVE_JAVA, reason='the PTB tokenizer and METEOR need Java')

# Raw captions with capitals and punctuation, 3-5 references per image.
REFERENCES = {
    '1': [
        'A man riding a wave on top of a surfboard.', 'A surfer rides a large wave in the ocean!',
        "The surfer's board cuts through the wave.", 'A person surfing on a big, blue wave.'
    ],
    '2': [
        "Two dogs playing with a frisbee in the park.", 'Dogs run across the grass (chasing a frisbee).',
        'A pair of dogs play together on a sunny day.'
    ],
    '3': [
        'A plate with a sandwich and fries on it.', 'A sandwich, cut in half, next to French fries.',
        'Lunch: a sandwich & some fries on a white plate.', "A diner's plate holding a club sandwich.",
        'Food on a plate -- a sandwich and chips.'
    ],
    '4': [
        'A red double-decker bus parked on the street.', 'The bus is stopped at the curb; people wait.',
        'A big red bus in London, England.'
    ],
    '5': [
        'A cat laying on top of a laptop computer.', "A cat doesn't want its owner to work...",
        'The kitten is sleeping on the keyboard of a laptop.', 'A grey cat lies on an open laptop.'
    ],
    '6': [
        'A giraffe standing next to a tall tree.', 'Two giraffes eat leaves from a tree.',
        'A giraffe reaches up to eat from the branches; another one watches.'
    ],
    '7': [
        'A kitchen with stainless steel appliances.', 'A modern kitchen: fridge, stove and microwave.',
        "It's a clean kitchen with white cabinets.", 'The kitchen has a "new" look.'
    ],
    '8': [
        'A STOP sign at the corner of an intersection.', "A sign that says 'STOP' on a street corner.",
        'A red stop sign next to the road.', 'A street sign at an intersection, 5:30 p.m.'
    ],
}
CANDIDATES = {
    '1': 'A man riding a wave on a surfboard.',
    '2': 'Two dogs play with a frisbee.',
    '3': 'A sandwich and fries on a plate!',
    '4': 'A red bus on the street.',
    '5': "A cat's sleeping on a laptop.",
    '6': 'A giraffe standing next to a tree.',
    '7': 'A kitchen with a stove and a fridge.',
    '8': 'A stop sign on a street corner.',
}

# Java PTBTokenizer output after pycocoevalcap's punctuation removal (recorded from pycocoevalcap 1.2),
# so that the python tokenizer is checked even where Java is missing.
RECORDED_PTB = [
    ("A woman's hand holding a cell phone, next to a laptop.",
     "a woman 's hand holding a cell phone next to a laptop"),
    ('Is this a cat? Yes, it\'s a cat.', "is this a cat yes it 's a cat"),
    ('A plate with a sandwich (and fries) on it.', 'a plate with a sandwich -lrb- and fries -rrb- on it'),
    ('A t-shirt that reads "I love NY".', 'a t-shirt that reads i love ny'),
    ('People at the U.S. Open, watching tennis at 5:30 p.m.',
     'people at the u.s. open watching tennis at 5:30 p.m.'),
    ("A man doesn't want to eat his pizza...", "a man does n't want to eat his pizza"),
    ("They're sitting on a bench -- talking.", "they 're sitting on a bench talking"),
    ('a pizza with 1/2 pepperoni and 1,000 toppings', 'a pizza with 1/2 pepperoni and 1,000 toppings'),
    ("Mr. Smith's dog is on St. Patrick's day parade", "mr. smith 's dog is on st. patrick 's day parade"),
    ('The clock reads 10:30am on the tower', 'the clock reads 10:30 am on the tower'),
    ("a man's reflection in a mirror?!", "a man 's reflection in a mirror ?!"),
    ("The kids' bikes are parked outside", 'the kids bikes are parked outside'),
    ('A woman \u2013 holding an umbrella \u2014 in the rain.', 'a woman holding an umbrella in the rain'),
    ('A man \u201csmiling\u201d at the camera\u2019s lens\u2026', "a man smiling at the camera 's lens"),
    ("A dog can't catch the ball; it won't try.", "a dog ca n't catch the ball it wo n't try"),
    ('Boats docked at a pier, e.g. sailboats, etc.', 'boats docked at a pier e.g. sailboats etc.'),
    ('A store selling hot dogs for $5.00 each, 50% off.',
     'a store selling hot dogs for $ 5.00 each 50 % off'),
    ('a teddy bear sitting on a chair[with a bow]', 'a teddy bear sitting on a chair -lsb- with a bow -rsb-'),
    ('cannot find the remote control', 'can not find the remote control'),
    ("a little girl 's face is painted .", "a little girl 's face is painted"),
    ('Several motorcycles parked in a row outside a caf\u00e9.',
     'several motorcycles parked in a row outside a caf\u00e9'),
]

# METEOR of CANDIDATES/REFERENCES from pycocoevalcap 1.2's Meteor called directly on the
# PTBTokenizer output (gts/res as in coco_reference_scores below), with Java 17. Stored so that the
# test starts only one METEOR JVM (~9 s); regenerate with
# `Meteor().compute_score(*ptb_tokenized(CANDIDATES, REFERENCES))` if pycocoevalcap changes.
EXPECTED_METEOR = 0.35987195000261185


def ptb_tokenized(candidates, references):
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
  tokenizer = PTBTokenizer()
  gts = tokenizer.tokenize({i: [{'caption': c} for c in references[i]] for i in candidates})
  res = tokenizer.tokenize({i: [{'caption': candidates[i]}] for i in candidates})
  return gts, res


def coco_reference_scores(candidates, references):
  """BLEU/ROUGE-L/CIDEr exactly as coco-caption's COCOEvalCap.evaluate computes them."""
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.rouge.rouge import Rouge
  gts, res = ptb_tokenized(candidates, references)
  with contextlib.redirect_stdout(io.StringIO()):
    bleu, _ = Bleu(4).compute_score(gts, res)
  scores = dict(zip(['Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4'], bleu))
  scores['ROUGE_L'], _ = Rouge().compute_score(gts, res)
  scores['CIDEr'], _ = Cider().compute_score(gts, res)
  return scores


NO_METEOR = ('bleu', 'rouge', 'cider')


@pytest.fixture(scope='module')
def reference_scores():
  return coco_reference_scores(CANDIDATES, REFERENCES)


# ----------------------------------------------------------------------------- agreement with pycocoevalcap


@needs_java
def test_matches_pycocoevalcap(reference_scores, capsys):
  ours = metrics.compute_caption_metrics(CANDIDATES, REFERENCES, metrics=NO_METEOR, tokenizer='ptb')
  assert set(ours) == set(reference_scores)
  for key, value in reference_scores.items():
    assert ours[key] == pytest.approx(value, abs=1e-9, rel=0), key
    assert isinstance(ours[key], float)
  assert 0 < ours['Bleu_4'] < ours['Bleu_1'] < 1 and ours['CIDEr'] > 0
  assert capsys.readouterr().out == ''  # BLEU's prints are swallowed


@needs_java
def test_meteor_matches_pycocoevalcap():
  ours = metrics.compute_caption_metrics(CANDIDATES, REFERENCES, metrics=('meteor',))
  assert set(ours) == {'METEOR'}
  assert ours['METEOR'] == pytest.approx(EXPECTED_METEOR, abs=1e-9, rel=0)


@needs_java
def test_extra_references_are_ignored(reference_scores):
  references = dict(REFERENCES, unused=['A caption for an image without a candidate.'])
  ours = metrics.compute_caption_metrics(CANDIDATES, references, metrics=('cider',))
  assert ours['CIDEr'] == pytest.approx(reference_scores['CIDEr'], abs=1e-9, rel=0)


@pytest.mark.parametrize('tokenizer', ['python', pytest.param('ptb', marks=needs_java)])
def test_perfect_candidates(tokenizer):
  perfect = {i: refs[0] for i, refs in REFERENCES.items()}
  ours = metrics.compute_caption_metrics(perfect, REFERENCES, metrics=NO_METEOR, tokenizer=tokenizer)
  assert ours['Bleu_4'] == pytest.approx(1.0, abs=1e-6)
  assert ours['ROUGE_L'] == pytest.approx(1.0, abs=1e-12)


# ----------------------------------------------------------------------------- python tokenizer fallback


@pytest.mark.parametrize('raw, expected', RECORDED_PTB)
def test_python_tokenizer_reproduces_recorded_ptb_output(raw, expected):
  assert metrics.python_ptb_tokenize(raw) == expected


@needs_java
def test_python_tokenizer_equals_ptb_on_fixture(reference_scores):
  gts, res = ptb_tokenized(CANDIDATES, REFERENCES)
  assert gts == metrics.tokenize_captions({i: REFERENCES[i] for i in CANDIDATES}, use_ptb=False)
  assert res == metrics.tokenize_captions({i: [c] for i, c in CANDIDATES.items()}, use_ptb=False)
  ours = metrics.compute_caption_metrics(CANDIDATES, REFERENCES, metrics=NO_METEOR, tokenizer='python')
  for key, value in reference_scores.items():
    assert ours[key] == pytest.approx(value, abs=1e-9, rel=0), key


@needs_java
def test_without_java_auto_falls_back_and_skips_meteor(monkeypatch, caplog, reference_scores):
  monkeypatch.setattr(metrics.shutil, 'which', lambda name: None)
  with caplog.at_level(logging.WARNING, logger='capjax.evaluation.metrics'):
    ours = metrics.compute_caption_metrics(CANDIDATES, REFERENCES)  # METEOR requested by default
  assert 'METEOR' not in ours
  assert 'METEOR skipped' in caplog.text and 'Java not found' in caplog.text
  for key, value in reference_scores.items():
    assert ours[key] == pytest.approx(value, abs=1e-9, rel=0), key
  with pytest.raises(RuntimeError, match='Java'):
    metrics.compute_caption_metrics(CANDIDATES, REFERENCES, tokenizer='ptb')


# ----------------------------------------------------------------------------- arguments and formatting


@pytest.mark.parametrize('kwargs, error', [
    (dict(metrics=('spice',)), 'SPICE'),
    (dict(metrics=('bleu', 'wer')), 'unknown metrics'),
    (dict(tokenizer='spacy'), 'tokenizer'),
])
def test_bad_arguments(kwargs, error):
  with pytest.raises(ValueError, match=error):
    metrics.compute_caption_metrics(CANDIDATES, REFERENCES, **kwargs)


def test_candidates_need_references():
  with pytest.raises(ValueError, match='no references'):
    metrics.compute_caption_metrics(dict(CANDIDATES, extra='A dog.'), REFERENCES, tokenizer='python')


def test_format_metrics_table():
  table = metrics.format_metrics_table({'CIDEr': 0.91234, 'Bleu_1': 0.7, 'ROUGE_L': 0.5})
  assert table.splitlines() == ['Bleu_1   0.7000', 'ROUGE_L  0.5000', 'CIDEr    0.9123']
