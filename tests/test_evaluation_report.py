"""The evaluation report end to end: a tiny model trained once, then the demo's final report,
`--mode=eval` (greedy and beam) and `--mode=compare` write JSON + HTML whose numbers, provenance and
collapse warning are checked against independent computations, and the HTML is opened in Chromium."""

from collections import Counter
import contextlib
import dataclasses
import importlib.metadata
import io
import json
import os
import pathlib
import shutil
import subprocess
from typing import Any

import jax
import numpy as np
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
import pytest
from selenium.webdriver.common.by import By

from capjax import caption_analysis
from capjax import cli
from capjax import evaluation
from capjax import inference
from capjax import input_pipeline
from capjax import report
from capjax import vocab as vocab_lib
from capjax import workdir as workdir_lib
from capjax.data import prepare
from configs import tiny

import browser

ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Trained:
  config: Any
  workdir: str
  summary: cli.FinalReport
  printed: str  # what training printed, its final report included
  final_record: dict  # the final report's JSON, read before evaluations of the same weights replace it


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """One tiny training run, shared by the module."""
  base = tmp_path_factory.mktemp('evalreport')
  config = tiny.get_config()
  config.data.data_dir = str(base / 'data')
  workdir = str(base / 'workdir')
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    summary = cli.train(config, workdir)
  final = json.load(open(os.path.join(workdir, f'eval_test_{_latest_step(workdir)}_greedy.json')))
  return Trained(config, workdir, summary, printed.getvalue(), final)


@pytest.fixture(scope='module')
def evaluated(trained):
  """--mode=eval of the latest checkpoint, greedy and beam 2: {'greedy'|'beam2': (record, printed)}."""
  workdir = trained.workdir
  runs = {}
  for name, beam in (('greedy', 1), ('beam2', 2)):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
      record = evaluation.evaluate_workdir(workdir, checkpoint='latest', beam_size=beam)
    runs[name] = record, printed.getvalue()
  return runs


def _latest_step(workdir: str) -> int:
  return max(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())


def _git(*args: str) -> str:
  return subprocess.run(['git', '-C', str(ROOT), *args], capture_output=True, text=True, check=True).stdout


# ----------------------------------------------------------------------------- file names and contents

def test_decode_settings_name_the_files():
  names = {evaluation.eval_stem('test', 248, evaluation.DecodeSettings(*s))
           for s in ((1,), (1, 0.6), (3,), (3, 0.6), (3, 0.6, 3), (1, 0.0, 3))}
  assert names == {'eval_test_248_greedy', 'eval_test_248_beam3', 'eval_test_248_beam3_lp0.6',
                   'eval_test_248_beam3_lp0.6_nr3', 'eval_test_248_greedy_nr3'}  # greedy ignores lp


def test_final_report_writes_the_test_report(trained):
  workdir, summary, printed = trained.workdir, trained.summary, trained.printed
  stem = os.path.join(workdir, f'eval_test_{_latest_step(workdir)}_greedy')
  for ext in ('json', 'html', 'png'):
    assert os.path.exists(f'{stem}.{ext}'), ext
  record = trained.final_record
  assert record['metrics'] == summary.metrics and record['beam_size'] == 1
  assert record['provenance']['checkpoint_choice'].startswith('end of training')
  assert record['content'] == summary.content and record['content']['images'] == 16
  for line in ('Test loss (per token):', 'Held-out test images (greedy):', 'Test BLEU-4', 'Trivial baseline',
               'Test content:', 'Provenance: capjax ', f'Test report: {stem}.html'):
    assert line in printed, line


def test_greedy_and_beam_write_different_files(trained, evaluated):
  workdir = trained.workdir
  step = _latest_step(workdir)
  greedy, beam = evaluated['greedy'][0], evaluated['beam2'][0]
  assert greedy['files']['json'] == f'eval_test_{step}_greedy.json'
  assert beam['files']['json'] == f'eval_test_{step}_beam2.json'
  for record in (greedy, beam):
    for name in record['files'].values():
      assert os.path.exists(os.path.join(workdir, name)), name
    on_disk = json.load(open(os.path.join(workdir, record['files']['json'])))
    assert on_disk['beam_size'] == record['beam_size'] and len(on_disk['captions']) == 16
  assert (greedy['beam_size'], beam['beam_size']) == (1, 2)
  assert {'Bleu_4', 'ROUGE_L', 'CIDEr'} <= set(greedy['metrics'])
  if shutil.which('java'):
    assert 'METEOR' in greedy['metrics']


def test_per_image_cider_averages_to_the_corpus_cider(evaluated):
  record = evaluated['greedy'][0]
  captions = record['captions']
  mean = np.mean([c['CIDEr'] for c in captions])
  assert mean == pytest.approx(record['metrics']['CIDEr'], abs=1e-9)
  if shutil.which('java'):  # and the corpus CIDEr is coco-caption's own, tokenised by its PTBTokenizer
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{'caption': r} for r in c['references']] for i, c in enumerate(captions)})
    res = tokenizer.tokenize({i: [{'caption': c['caption']}] for i, c in enumerate(captions)})
    corpus, _ = Cider().compute_score(gts, res)
    assert mean == pytest.approx(corpus, abs=1e-9)
  assert all(set(c) == {'image_id', 'caption', 'references', 'CIDEr', 'Bleu_4'} for c in captions)


def test_paper_bleu_sits_next_to_coco_bleu(evaluated):
  record, printed = evaluated['greedy']
  candidates = {i: c['caption'] for i, c in enumerate(record['captions'])}
  references = {i: c['references'] for i, c in enumerate(record['captions'])}
  assert record['paper_bleu'] == caption_analysis.paper_bleu(candidates, references)
  assert 'NLTK corpus_bleu' in record['paper_bleu_variant'] and 'no smoothing' in record['paper_bleu_variant']
  assert 'Paper-style BLEU (NLTK corpus_bleu' in printed


def test_best_worst_and_random_examples(evaluated):
  record = evaluated['greedy'][0]
  cider = {c['image_id']: c['CIDEr'] for c in record['captions']}
  best, worst = record['examples']['best'], record['examples']['worst']
  assert len(best) == len(worst) == len(record['examples']['random']) == 8
  assert min(cider[i] for i in best) >= max(cider[i] for i in cider if i not in best)
  assert max(cider[i] for i in worst) <= min(cider[i] for i in cider if i not in worst)


# ----------------------------------------------------------------------------- provenance

def test_provenance_fields_are_present_and_true(trained, evaluated):
  config, workdir = trained.config, trained.workdir
  record, printed = evaluated['beam2']
  p = record['provenance']
  head = subprocess.run(['git', '-C', str(ROOT), 'rev-parse', 'HEAD'], capture_output=True, text=True)
  if head.returncode == 0:
    assert p['capjax_commit'] == head.stdout.strip()
    assert p['capjax_dirty'] == bool(_git('status', '--porcelain', '--', 'capjax', 'configs', 'launch.py'))
  else:
    assert p['capjax_commit'] is None and p['capjax_dirty'] is None
  for package in ('jax', 'jaxlib', 'flax', 'pycocoevalcap', 'nltk'):
    assert p[package] == importlib.metadata.version(package), package
  assert (p['java'] == 'absent') == (shutil.which('java') is None)
  assert p['tokenizer'].startswith('PTB' if shutil.which('java') else 'python')
  assert (p['dataset'], p['dataset_layout'], p['split']) == ('shapes', 'shapes', 'test')
  assert p['dataset_config'].startswith('capjax_captions/shapes_48_16_16_48px/')
  assert os.path.isdir(p['data_dir']) and p['data_dir'].startswith(config.data.data_dir)
  assert p['images'] == p['split_images'] == 16
  assert (p['checkpoint_step'], p['checkpoint_choice']) == (_latest_step(workdir), 'latest')
  assert (p['beam_size'], p['length_penalty'], p['no_repeat_ngram'], p['max_len']) == (
      2, 0.0, 0, config.data.max_caption_len - 1)
  assert p['decoding'].startswith('beam search, 2 beams') and p['seed'] == config.seed
  assert p['workdir'] == os.path.abspath(workdir)
  assert p['devices'] == f'{jax.device_count()} x {jax.devices()[0].device_kind}'
  # The same data gives the same fingerprint; other references do not.
  assert p['data_fingerprint'] == evaluated['greedy'][0]['provenance']['data_fingerprint']
  results = [{'image_id': c['image_id'], 'references': c['references']} for c in record['captions']]
  changed = [dict(results[0], references=results[0]['references'][:-1]), *results[1:]]
  assert evaluation.data_fingerprint(results) != evaluation.data_fingerprint(changed)
  # One line of it under the metrics table.
  line = next(x for x in printed.splitlines() if x.startswith('Provenance: '))
  assert f"checkpoint {p['checkpoint_step']}, latest;" in line and p['data_fingerprint'] in line
  assert (p['capjax_commit'] or 'not a git checkout')[:10] in line
  assert printed.index('CIDEr') < printed.index('Provenance: ')


def test_best_checkpoint_says_how_it_was_chosen(trained):
  config, workdir = trained.config, trained.workdir
  history = json.load(open(os.path.join(workdir, 'history.json')))
  step = inference.restore_variables(workdir, 'best', inference.mesh_lib.make_mesh())[-1]
  value = next(h['CIDEr'] for h in history if h['step'] == step)
  chosen = evaluation.checkpoint_choice(workdir, config, 'best', step)
  assert chosen == f'best by validation CIDEr: {value:.4f}'
  assert evaluation.checkpoint_choice(workdir, config, '10', 10) == 'explicit (--checkpoint_step=10)'


def test_capjax_checkout_is_absent_outside_git(monkeypatch):
  def no_git(*args, **kwargs):
    raise FileNotFoundError('git')
  monkeypatch.setattr(evaluation.subprocess, 'run', no_git)
  assert evaluation.capjax_checkout() == (None, None)


# ----------------------------------------------------------------------------- collapse

def test_no_collapse_warning_for_captions_that_describe_each_image(trained):
  # What a captioner that describes every image writes, run through the same analysis as a model's
  # captions: the first reference of each test image.
  config, workdir = trained.config, trained.workdir
  splits = prepare.open_dataset(config.data, build_demo=False)
  results = []
  for i in range(len(splits['test'])):
    references = input_pipeline.record_captions(splits['test'][i])
    results.append({'index': i, 'image_id': str(i), 'caption': references[0], 'references': references})
  described = evaluation.analyse(
      results, source=splits['test'], train_captions=evaluation.training_captions(splits['train']),
      vocab=workdir_lib.load_vocab(workdir), provenance={}, stem='x', metrics=('cider',))
  collapse = described.record['collapse']
  assert collapse['warning'] is None and collapse['distinct_ratio'] > 0.5, collapse
  assert described.record['content']['objects_right'] > 0.9  # the content score agrees they are right


def test_the_trained_models_report_says_whether_it_collapsed(trained, evaluated):
  # The tiny model (48 training images, a width-8 ResNet at 32 px) learns the captions' grammar, not the
  # pictures: it writes two or three captions in all. Whichever it does, the warning must say so, in the
  # JSON, under the printed metrics, and at the top of the HTML report.
  workdir, printed = trained.workdir, trained.printed
  record, eval_printed = evaluated['greedy']
  counts = sorted(Counter(' '.join(vocab_lib.tokenize(c['caption'])) for c in record['captions']).values())
  few = sum(n for n in counts[-3:] if n > 1) / len(record['captions'])
  collapsed = few >= 0.5 or len(counts) / len(record['captions']) < 0.2
  assert (record['collapse']['warning'] is not None) == collapsed, record['collapse']
  assert ('WARNING: Mode collapse' in eval_printed) == collapsed
  assert ('WARNING: Mode collapse' in printed) == collapsed  # the demo's final report
  page = (pathlib.Path(workdir) / record['files']['html']).read_text()
  assert ('class="warning"' in page) == collapsed


def test_collapse_warning_fires_on_a_model_forced_to_say_one_thing(trained, tmp_path, monkeypatch, capsys):
  workdir = trained.workdir
  copy = tmp_path / 'forced'  # its report must not replace the trained model's
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns('*.lock'))
  restore = inference.restore_variables

  def one_caption_model(*args, **kwargs):
    # The output layer's bias pinned to one word: whatever the image, the model says 'a a a ...'.
    config, vocab, model, variables, step = restore(*args, **kwargs)
    word = vocab.words.index('a')
    variables = jax.tree_util.tree_map_with_path(lambda path, x: _pin(path, x, word, len(vocab)), variables)
    return config, vocab, model, variables, step

  monkeypatch.setattr(inference, 'restore_variables', one_caption_model)
  record = evaluation.evaluate_workdir(str(copy), checkpoint='latest', beam_size=1)
  collapse = record['collapse']
  assert {c['caption'] for c in record['captions']} == {' '.join(['a'] * record['provenance']['max_len'])}
  assert collapse['distinct_captions'] == 1 and collapse['top_caption_share'] == 1.0
  assert collapse['warning'].startswith('Mode collapse: 1 distinct caption for 16 images')
  assert 'WARNING: Mode collapse' in capsys.readouterr().out
  page = (copy / record['files']['html']).read_text()
  assert page.index('class="warning"') < page.index('<nav>')


def _pin(path, leaf, word: int, vocab_size: int):
  """A bias of vocab_size entries: -1e4 everywhere but 1e4 at `word`; every other leaf as it is."""
  if getattr(path[-1], 'key', None) == 'bias' and leaf.shape == (vocab_size,):
    return jax.numpy.full_like(leaf, -1e4).at[word].set(1e4)
  return leaf


# ----------------------------------------------------------------------------- attention maps

def test_attention_maps_reach_the_report_and_the_content_score(tmp_path):
  rng = np.random.default_rng(0)
  objects = [{'shape': 'circle', 'colour': 'red', 'size': 'big', 'position': 'left', 'box': [0, 0, .5, .5]}]
  source = [{'pixels': rng.integers(0, 255, (48, 48, 3), dtype=np.uint8), 'image_id': f'im{i}',
             'captions': ['a red circle on the left', 'the circle is red'],
             'objects': json.dumps(objects)} for i in range(6)]
  results = []
  for i in range(6):
    words = ['a', 'red', 'circle'] if i % 2 else ['a', 'blue', 'square', 'on', 'the', 'right']
    attention = np.full((len(words), 4, 4), 1 / 16, np.float32)
    attention[:, 0, 0] += 1.0  # the peak in the top-left cell, inside the circle's box
    results.append({'index': i, 'image_id': f'im{i}', 'caption': ' '.join(words),
                    'references': source[i]['captions'], 'words': words, 'attention': attention})
  facts = {'split': 'test', 'checkpoint_step': 1, 'decoding': 'greedy', 'data_fingerprint': 'x'}
  vocab = vocab_lib.Vocabulary((*vocab_lib.SPECIALS, 'a', 'red', 'circle', 'blue', 'square'))
  result = evaluation.analyse(results, source=source, train_captions=['a red circle'], vocab=vocab,
                              provenance=facts, stem='eval_test_1_greedy', metrics=('bleu', 'cider'))
  shown = [e for e in result.page['examples'] if e['image']]
  assert shown and all(len(e['attention']) == len(e['caption'].split()) for e in shown)
  assert [m['word'] for m in shown[0]['attention']] == shown[0]['caption'].split()
  assert result.record['content']['pointing'] == 1.0  # 'red' and 'circle' of the 3 correct captions
  assert result.record['content']['pointing_words_checked'] == 6
  assert result.record['content']['pointing_chance'] == 4 / 16  # the box [0, .5]^2 covers 4 of 16 cells
  page = report.render_report(result.page)
  sections = result.page['sections']
  maps = sum(len(result.page['examples'][i]['attention']) for shown in sections.values() for i in shown)
  assert page.count('<figcaption>') == maps > 0
  json.dumps(result.record)  # no arrays in the JSON


# ----------------------------------------------------------------------------- compare mode

def test_compare_puts_two_checkpoints_side_by_side(trained, tmp_path, capsys):
  workdir = trained.workdir
  earlier = tmp_path / 'epoch1'
  shutil.copytree(workdir, earlier, ignore=shutil.ignore_patterns('*.lock'))
  shutil.rmtree(earlier / 'checkpoints' / str(_latest_step(workdir)))  # its latest is the first epoch's
  out = evaluation.compare_workdirs([workdir, str(earlier)], checkpoint='latest', beam_size=1)
  record = out['comparisons'][0]
  label_a = os.path.basename(workdir)
  step_a, step_b = _latest_step(workdir), _latest_step(str(earlier))
  assert step_b < step_a
  assert out['files'] == [os.path.join(workdir, f'compare_test_greedy_{label_a}-{step_a}_vs_epoch1-{step_b}'
                                                '.html')]
  assert os.path.exists(out['files'][0]) and os.path.exists(out['files'][0][:-5] + '.json')
  runs = record['runs']
  assert [runs[k]['provenance']['checkpoint_step'] for k in record['labels']] == [step_a, step_b]
  diffs = [r['CIDEr_difference'] for r in record['per_image']]
  assert len(diffs) == record['summary']['images'] == 16
  assert all(r['CIDEr_difference'] == pytest.approx(r['CIDEr_b'] - r['CIDEr_a']) for r in record['per_image'])
  assert record['summary']['mean_CIDEr_difference'] == pytest.approx(
      runs['epoch1']['metrics']['CIDEr'] - runs[label_a]['metrics']['CIDEr'], abs=1e-9)
  page = pathlib.Path(out['files'][0]).read_text()
  for section in ('metrics', 'provenance', 'differences', 'gains', 'losses', 'random'):
    assert f'<section id="{section}">' in page, section
  assert f'Wrote {out["files"][0]}' in capsys.readouterr().out
  with pytest.raises(evaluation.errors.InputError, match='two or more'):
    evaluation.compare_workdirs([workdir])


# ----------------------------------------------------------------------------- in a browser

_IMAGES = 'return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]);'


@pytest.fixture
def report_page(request) -> pathlib.Path:
  """The HTML report the browser test opens: the tiny model's, or CAPJAX_SCREENSHOT_REPORT (a report of a
  model worth showing, e.g. the demo's `workdirs/demo/eval_test_248_greedy.html`, for the README picture:
  `CAPJAX_SAVE_SCREENSHOTS=1 CAPJAX_SCREENSHOT_REPORT=... python -m pytest -k chromium <this file>`)."""
  given = os.environ.get('CAPJAX_SCREENSHOT_REPORT')
  if given:
    return pathlib.Path(given).resolve()
  workdir = request.getfixturevalue('trained').workdir
  return pathlib.Path(workdir) / request.getfixturevalue('evaluated')['greedy'][0]['files']['html']


@browser.needs_chromium
def test_report_renders_in_chromium(report_page, tmp_path):
  record = json.loads(report_page.with_suffix('.json').read_text())
  shown = min(8, len(record['captions']))
  with browser.chromium() as driver:
    driver.get(report_page.as_uri())
    images = driver.execute_script(_IMAGES)
    assert len(images) >= shown and all(done and w > 0 and h > 0 for done, w, h in images), images
    for section in ('best', 'worst', 'random'):
      cards = driver.find_elements(By.CSS_SELECTOR, f'section#{section} .card')
      assert len(cards) == shown and all(c.is_displayed() for c in cards), section
      assert all(c.find_element(By.CSS_SELECTOR, 'img.thumb').is_displayed() for c in cards), section
    sections = ['metrics', 'provenance', 'collapse', 'charts', 'all'] + ['content'] * bool(record['content'])
    for section in sections:
      assert driver.find_element(By.ID, section).is_displayed(), section
    assert 'BLEU-4' in driver.find_element(By.ID, 'metrics').text
    assert record['provenance']['data_fingerprint'] in driver.find_element(By.ID, 'provenance').text
    warnings = driver.find_elements(By.CSS_SELECTOR, '.warning')
    assert bool(warnings) == bool(record['collapse']['warning'])
    if warnings:  # in the first screenful, above everything else
      assert warnings[0].is_displayed() and warnings[0].rect['y'] < 300
    browser.save_screenshot(driver, 'eval_report', tmp_path, for_readme=True)
    driver.execute_script("document.getElementById('best').scrollIntoView();")
    browser.save_screenshot(driver, 'eval_report_examples', tmp_path)
