"""capjax.evaluation.report: the HTML evaluation report, read as text (escaping, sections, nothing fetched
from the network) and opened in headless Chromium (images render, sections hold cards, the warning shows)."""

import base64
import io
import pathlib
import re

import numpy as np
from PIL import Image
import pytest
from selenium.webdriver.common.by import By

from capjax.evaluation import caption_analysis
from capjax.evaluation import markup
from capjax.evaluation import report

import browser

# (generated caption, references) of synthetic scenes; the picture of each is drawn by _picture.
SCENES = [
    ('a red bus parked on the street', ['A red double-decker bus parked on the street.',
                                        'The bus is stopped at the curb; people wait.', 'A big red bus.']),
    ('a dog running on the grass', ['A brown dog runs across the grass.', 'A dog is running in a park.',
                                    'A puppy plays on a green lawn.']),
    ('a man riding a wave on a surfboard', ['A man riding a wave on top of a surfboard.',
                                            'A surfer rides a large wave in the ocean!']),
    ('a plate of food on a table', ['A plate with a sandwich and fries on it.',
                                    'Lunch: a sandwich & some fries on a white plate.']),
    ('a cat sitting on a laptop', ['A cat laying on top of a laptop computer.',
                                   'A grey cat lies on an open laptop.']),
    ('a giraffe standing next to a tree', ['A giraffe standing next to a tall tree.',
                                           'Two giraffes eat leaves from a tree.']),
    ('a kitchen with a stove', ['A kitchen with stainless steel appliances.',
                                'A modern kitchen: fridge, stove and microwave.']),
    ('a stop sign on a street corner', ['A STOP sign at the corner of an intersection.',
                                        'A red stop sign next to the road.']),
    ('a group of people skiing down a hill', ['Skiers going down a snowy slope.',
                                              'People ski down a mountain on a sunny day.']),
    ('two zebras grazing in a field', ['Two zebras eating grass in a field.',
                                       'A pair of zebras graze on the savanna.']),
    ('a train on the tracks', ['A passenger train pulling into a station.',
                               'A yellow train travels down the tracks.']),
    ('a bowl of fruit', ['A bowl filled with apples and oranges.', 'Fresh fruit in a wooden bowl.']),
]
HOSTILE = '<script>alert("x")</script> & a dog'
HOSTILE_REFERENCE = '<img src=x onerror=alert(1)> "a dog" & a cat'
COLLAPSED_CAPTION = 'a man riding a wave on top of a surfboard'


def _picture(i: int, size: int = 128) -> np.ndarray:
  """A distinct synthetic picture per index: a coloured gradient with a disc and a bar."""
  rng = np.random.default_rng(i)
  y, x = np.mgrid[0:size, 0:size] / size
  base, accent = rng.uniform(40, 215, 3), rng.uniform(0, 255, 3)
  image = base * (0.6 + 0.4 * x[..., None]) + 30 * y[..., None]
  cy, cx, r = rng.uniform(0.3, 0.7, 2).tolist() + [rng.uniform(0.12, 0.25)]
  image[(y - cy) ** 2 + (x - cx) ** 2 < r ** 2] = accent
  image[int(size * 0.85):int(size * 0.9), int(size * 0.1):int(size * 0.7)] = 255 - accent
  return np.clip(image, 0, 255).astype(np.uint8)


def _attention_maps(picture: np.ndarray, caption: str) -> list[dict]:
  """One map per word: the picture darkened except around a blob that moves along the words."""
  words = caption.split()
  y, x = np.mgrid[0:56, 0:56] / 56
  small = np.asarray(Image.fromarray(picture).resize((56, 56)), np.float32)
  maps = []
  for k, word in enumerate(words):
    heat = np.exp(-((x - (k + 0.5) / len(words)) ** 2 + (y - 0.5) ** 2) / 0.03)[..., None]
    overlay = small * (0.3 + 0.7 * heat) + np.array([255, 60, 0]) * 0.35 * heat
    maps.append({'word': word, 'image': markup.image_data_uri(np.clip(overlay, 0, 255).astype(np.uint8))})
  return maps


def build_payload(n: int = 24, *, collapsed: bool = False, hostile: bool = True, content=True) -> dict:
  """A report payload as analysis.report_page builds it, for synthetic images and hand-written captions."""
  pictures = [_picture(i) for i in range(n)]
  references = {f'img{i:03d}': SCENES[i % len(SCENES)][1] for i in range(n)}
  candidates = {f'img{i:03d}': COLLAPSED_CAPTION if collapsed else SCENES[(i + i // 12) % len(SCENES)][0]
                for i in range(n)}
  if hostile:
    candidates['img001'] = HOSTILE
    references['img001'] = [*references['img001'], HOSTILE_REFERENCE]
  scores = caption_analysis.per_image_scores(candidates, references, tokenizer='python')
  train = [r for refs in references.values() for r in refs] + ['A dog running on the grass.']
  examples = [{'image_id': i, 'image': markup.image_data_uri(pictures[k]), 'caption': candidates[i],
               'references': references[i], 'scores': scores.per_image[i]}
              for k, i in enumerate(candidates)]
  for k in range(0, n, 5):
    examples[k]['attention'] = _attention_maps(pictures[k], examples[k]['caption'])
  return {
      'title': 'capjax evaluation: test split, checkpoint 20000',
      'provenance': {'model': 'resnet50-lstm-attention',
                     'workdir': '/tmp/runs/flickr8k & co <b>' if hostile else '/tmp/runs/flickr8k',
                     'checkpoint_step': 20000, 'split': 'test', 'beam_size': 3, 'length_penalty': 0.0,
                     'tokenizer': scores.tokenizer, 'vocab_size': 2992, 'pretrained_encoder': True,
                     'git_commit': '3f2c1e9', 'notes': None},
      'metrics': dict(scores.corpus, ROUGE_L=0.52, METEOR=0.23),
      'paper_bleu': caption_analysis.paper_bleu(candidates, references),
      'collapse': caption_analysis.collapse_report(candidates, train, 2988, references).as_dict(),
      'content': ({'precision': 0.61, 'recall': 0.48, 'person': {'precision': 0.7, 'recall': 0.52},
                   'dog': {'precision': 0.55, 'recall': 0.61}} if content else None),
      'examples': examples,
      'sections': report.select_sections(examples, n=6, seed=0),
  }


@pytest.fixture(scope='module')
def payload():
  return build_payload()


@pytest.fixture(scope='module')
def clean_payload():
  """No hostile text: what the README's screenshot shows."""
  return build_payload(hostile=False)


@pytest.fixture(scope='module')
def collapsed_payload():
  return build_payload(collapsed=True, hostile=False, content=False)


def _decode(uri: str) -> Image.Image:
  header, data = uri.split(',', 1)
  assert header in ('data:image/jpeg;base64', 'data:image/png;base64'), header
  return Image.open(io.BytesIO(base64.b64decode(data)))


def _cards(page: str, section: str) -> int:
  match = re.search(rf'<section id="{section}">(.*?)</section>', page, re.S)
  assert match, f'no section {section}'
  return match.group(1).count('class="card"')


# ----------------------------------------------------------------------------- helpers for the caller

def test_image_data_uri_encodes_jpeg_and_png():
  picture = _picture(3, size=64)
  jpeg, png = _decode(markup.image_data_uri(picture)), _decode(markup.image_data_uri(picture, fmt='png'))
  assert (jpeg.format, jpeg.size, png.format) == ('JPEG', (64, 64), 'PNG')
  np.testing.assert_array_equal(np.asarray(png), picture)  # PNG is lossless
  assert np.abs(np.asarray(jpeg, np.int16) - picture).mean() < 8
  rgba = np.concatenate([picture, np.full((64, 64, 1), 128, np.uint8)], -1)
  assert _decode(markup.image_data_uri(rgba)).mode == 'RGB'  # JPEG has no alpha
  assert _decode(markup.image_data_uri(picture[..., :1])).mode == 'L'
  assert _decode(markup.image_data_uri(np.zeros((300, 150, 3), np.uint8), max_side=128)).size == (64, 128)
  with pytest.raises(TypeError):
    markup.image_data_uri(picture.astype(np.float32))
  with pytest.raises(ValueError):
    markup.image_data_uri(picture, fmt='GIF')


def test_select_sections_picks_best_worst_and_a_seeded_sample():
  examples = [{'scores': {'CIDEr': c}} for c in (0.5, 2.0, 0.0, 1.0, 2.0, 0.1)]
  sections = report.select_sections(examples, n=2, seed=0)
  assert sections['best'] == [1, 4] and sections['worst'] == [2, 5]
  assert len(sections['random']) == 2 and sections['random'] == sorted(sections['random'])
  assert sections == report.select_sections(examples, n=2, seed=0)
  assert sorted(report.select_sections(examples, n=10)['random']) == list(range(6))


# ----------------------------------------------------------------------------- the page as text

def test_report_escapes_model_output_and_user_data(payload):
  page = report.render_report(dict(payload, sections={'best': [1], 'worst': [], 'random': []}))
  assert '<script' not in page and HOSTILE not in page and '<img src=x' not in page
  assert '&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; a dog' in page  # the caption
  assert '&lt;img src=x onerror=alert(1)&gt; &quot;a dog&quot; &amp; a cat' in page  # a reference
  assert '/tmp/runs/flickr8k &amp; co &lt;b&gt;' in page  # a provenance value


def test_report_has_every_section_and_provenance_key(payload):
  page = report.render_report(payload)
  for section in ('metrics', 'provenance', 'collapse', 'charts', 'content', 'best', 'worst', 'random', 'all'):
    assert f'<section id="{section}">' in page, section
  for section in ('best', 'worst', 'random'):
    assert _cards(page, section) == 6, section
  for key in payload['provenance']:
    assert f'<td>{key}</td>' in page, key
  for name in ('Bleu_4', 'CIDEr', 'METEOR', 'BLEU-4'):
    assert f'<td>{name}</td>' in page, name
  assert page.count('<svg') == 2  # caption lengths and per-image CIDEr
  shown = [payload['examples'][i] for indices in payload['sections'].values() for i in indices]
  assert page.count('<figcaption>') == sum(len(e.get('attention', [])) for e in shown) > 0
  assert 'class="warning"' not in page
  assert '<section id="content">' not in report.render_report(dict(payload, content=None))


def test_report_is_self_contained(payload):
  page = report.render_report(payload)
  assert 'http://' not in page and 'https://' not in page
  assert not re.search(r'(src|href)="(?!data:image/|#)', page)
  bad = dict(payload, examples=[dict(payload['examples'][0], image='https://example.com/a.jpg')],
             sections={'best': [0], 'worst': [], 'random': []})
  with pytest.raises(ValueError, match='data URIs or relative paths'):
    report.render_report(bad)
  relative = dict(bad, examples=[dict(bad['examples'][0], image='thumbs/a b.jpg')])
  assert 'src="thumbs/a b.jpg"' in report.render_report(relative)


def test_collapse_warning_is_shown_prominently(collapsed_payload):
  page = report.render_report(collapsed_payload)
  assert collapsed_payload['collapse']['warning']
  assert page.count('class="warning"') == 2  # above the contents and in the collapse section
  assert page.index('class="warning"') < page.index('<nav>')
  assert f'<td>{COLLAPSED_CAPTION}</td><td class="num">24</td>' in page


def test_sections_are_computed_when_missing(payload):
  page = report.render_report({k: v for k, v in payload.items() if k != 'sections'})
  assert _cards(page, 'best') == 8 and _cards(page, 'random') == 8


def test_write_report_writes_the_rendered_page(payload, tmp_path):
  path = tmp_path / 'eval_test_20000.html'
  report.write_report(str(path), payload)
  assert path.read_text(encoding='utf-8') == report.render_report(payload)
  assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_comparison_puts_two_models_side_by_side(payload, collapsed_payload):
  page = report.render_comparison(collapsed_payload, payload, labels=('baseline', 'attention <v2>'))
  assert 'attention &lt;v2&gt;' in page and '<v2>' not in page and '<script' not in page
  for section in ('metrics', 'provenance', 'differences', 'gains', 'losses', 'random'):
    assert f'<section id="{section}">' in page, section
  assert _cards(page, 'gains') == 8 and _cards(page, 'losses') == 8
  assert page.count('<svg') == 1 and 'class="warning"' in page  # the baseline collapsed
  assert 'http://' not in page and 'https://' not in page
  a = {e['image_id']: e['scores']['CIDEr'] for e in collapsed_payload['examples']}
  diffs = {e['image_id']: e['scores']['CIDEr'] - a[e['image_id']] for e in payload['examples']}
  gains = re.search(r'<section id="gains">(.*?)</section>', page, re.S).group(1)
  assert f'\u0394 CIDEr-D {max(diffs.values()):+.3f}' in gains


# ----------------------------------------------------------------------------- the page in a browser

_IMAGES = 'return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]);'


@browser.needs_chromium
def test_report_renders_in_chromium(clean_payload, collapsed_payload, tmp_path):
  healthy, collapsed = tmp_path / 'report.html', tmp_path / 'collapsed.html'
  report.write_report(str(healthy), clean_payload)
  report.write_report(str(collapsed), collapsed_payload)
  with browser.chromium() as driver:
    driver.get(healthy.as_uri())
    images = driver.execute_script(_IMAGES)
    assert len(images) > 18 and all(done and w > 0 and h > 0 for done, w, h in images), images
    for section in ('best', 'worst', 'random'):
      cards = driver.find_elements(By.CSS_SELECTOR, f'section#{section} .card')
      assert len(cards) == 6 and all(c.is_displayed() for c in cards), section
    assert not driver.find_elements(By.CSS_SELECTOR, '.warning')
    assert len(driver.find_elements(By.CSS_SELECTOR, 'svg.chart rect')) > 20
    top = browser.save_screenshot(driver, 'eval_report_synthetic', tmp_path)
    driver.execute_script("document.getElementById('best').scrollIntoView();")
    examples = browser.save_screenshot(driver, 'eval_report_examples', tmp_path)

    driver.get(collapsed.as_uri())
    warning = driver.find_element(By.CSS_SELECTOR, '.warning')
    assert warning.is_displayed() and warning.rect['y'] < 200  # in the first screenful
    assert 'Mode collapse' in warning.text and COLLAPSED_CAPTION in warning.text
    browser.save_screenshot(driver, 'eval_report_collapsed', tmp_path)
  for path in (top, examples):
    with Image.open(path) as shot:
      assert shot.format == 'PNG' and shot.size[0] >= 1000, path


@browser.needs_chromium
def test_comparison_renders_in_chromium(payload, collapsed_payload, tmp_path):
  path = tmp_path / 'compare.html'
  report.write_comparison(str(path), collapsed_payload, payload, labels=('baseline', 'attention'))
  with browser.chromium() as driver:
    driver.get(pathlib.Path(path).as_uri())
    images = driver.execute_script(_IMAGES)
    assert images and all(done and w > 0 for done, w, _ in images), images
    assert len(driver.find_elements(By.CSS_SELECTOR, 'section#gains .card')) == 8
    browser.save_screenshot(driver, 'eval_comparison', tmp_path)
