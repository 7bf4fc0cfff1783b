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

from capjax import cli
from capjax import errors
from capjax import inference
from capjax import vocab as vocab_lib
from capjax import workdir as workdir_lib
from capjax.data import prepare
from capjax.data import records as records_lib
from capjax.evaluation import analysis
from capjax.evaluation import caption_analysis
from capjax.evaluation import captioning
from capjax.evaluation import evaluator
from capjax.evaluation import metrics as metrics_lib
from capjax.evaluation import modes
from capjax.evaluation import provenance as provenance_lib
from capjax.evaluation import report
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
      record = modes.evaluate_workdir(workdir, checkpoint='latest', beam_size=beam)
    runs[name] = record, printed.getvalue()
  return runs


def _latest_step(workdir: str) -> int:
  return max(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())


def _provenance(**changes) -> provenance_lib.Provenance:
  """A provenance for captions analysed outside an evaluation run (every field a placeholder)."""
  fields = {f.name: None for f in dataclasses.fields(provenance_lib.Provenance)}
  fields.update(split='test', checkpoint_step=1, decoding='greedy', data_fingerprint='x', **changes)
  return provenance_lib.Provenance(**fields)


def _git(*args: str) -> str:
  return subprocess.run(['git', '-C', str(ROOT), *args], capture_output=True, text=True, check=True).stdout


# ----------------------------------------------------------------------------- file names and contents

def test_decode_settings_name_the_files():
  names = {captioning.eval_stem('test', 248, captioning.DecodeSettings(*s))
           for s in ((1,), (1, 0.6), (3,), (3, 0.6), (3, 0.6, 3), (1, 0.0, 3))}
  assert names == {'eval_test_248_greedy', 'eval_test_248_beam3', 'eval_test_248_beam3_lp0.6',
                   'eval_test_248_beam3_lp0.6_nr3', 'eval_test_248_greedy_nr3'}  # greedy ignores lp


def test_final_report_writes_the_test_report(trained):
  workdir, summary, printed = trained.workdir, trained.summary, trained.printed
  stem = os.path.join(workdir, f'eval_test_{_latest_step(workdir)}_greedy')
  for ext in ('json', 'html', 'png'):
    assert os.path.exists(f'{stem}.{ext}'), ext
  record = trained.final_record
  assert record['metrics'] == summary.evaluation.metrics and record['beam_size'] == 1
  assert record['provenance']['checkpoint_choice'].startswith('end of training')
  assert record['content'] == summary.evaluation.content.as_dict() and record['content']['images'] == 16
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


def test_one_evaluation_tokenizes_once_and_scores_once(trained, monkeypatch):
  # The end-of-training evaluation (the model's captions, per-image scores and the trivial baseline):
  # one tokenizer run (one Java start when Java is there) for all of it, and each scorer once per
  # candidate set (CIDEr-D and BLEU for the model, their per-image values from the same calls).
  config, workdir = trained.config, trained.workdir
  tokenizer_runs, scorer_calls = [], []
  tokenize = metrics_lib.tokenize_captions
  monkeypatch.setattr(metrics_lib, 'tokenize_captions',
                      lambda captions, **kw: tokenizer_runs.append(len(captions)) or tokenize(captions, **kw))
  scorers = metrics_lib._SCORERS  # pylint: disable=protected-access
  for name, scorer in list(scorers.items()):
    monkeypatch.setitem(scorers, name, lambda gts, res, name=name, scorer=scorer:
                        scorer_calls.append(name) or scorer(gts, res))
  mesh = inference.mesh_lib.make_mesh()
  _, vocab, model, variables, step = inference.restore_variables(workdir, 'latest', mesh)
  splits = prepare.open_dataset(config.data, build_demo=False)
  evaluated = evaluator.evaluate(model, variables, config=config, vocab=vocab, splits=splits,
                                 split='test', mesh=mesh, decode=captioning.DecodeSettings(),
                                 workdir=workdir, step=step, checkpoint_choice='latest', baseline=True)
  assert len(tokenizer_runs) == 1 and tokenizer_runs[0] == 16 * 3  # references, model and baseline captions
  assert sorted(scorer_calls) == sorted([*(['meteor'] if shutil.which('java') else []), 'bleu', 'rouge',
                                         'cider', 'bleu', 'cider'])  # the model's, then the baseline's
  assert evaluated.baseline and evaluated.baseline.metrics['CIDEr'] >= 0
  mean_cider = np.mean([s.cider for s in evaluated.per_image])
  assert mean_cider == pytest.approx(evaluated.metrics['CIDEr'], abs=1e-9)


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
  images = [(c['image_id'], c['references']) for c in record['captions']]
  changed = [(images[0][0], images[0][1][:-1]), *images[1:]]
  assert provenance_lib.data_fingerprint(images) != provenance_lib.data_fingerprint(changed)
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
  chosen = provenance_lib.checkpoint_choice(workdir, config, 'best', step)
  assert chosen == f'best by validation CIDEr: {value:.4f}'
  assert provenance_lib.checkpoint_choice(workdir, config, '10', 10) == 'explicit (--checkpoint_step=10)'


def test_capjax_checkout_is_absent_outside_git(monkeypatch):
  def no_git(*args, **kwargs):
    raise FileNotFoundError('git')
  monkeypatch.setattr(provenance_lib.subprocess, 'run', no_git)
  assert provenance_lib.capjax_checkout() == (None, None)


# ----------------------------------------------------------------------------- collapse

def test_no_collapse_warning_for_captions_that_describe_each_image(trained):
  # What a captioner that describes every image writes, run through the same analysis as a model's
  # captions: the first reference of each test image.
  config, workdir = trained.config, trained.workdir
  splits = prepare.open_dataset(config.data, build_demo=False)
  captioned = []
  for i in range(len(splits['test'])):
    references = records_lib.record_captions(splits['test'][i])
    captioned.append(inference.CaptionedImage(i, str(i), references, references[0]))
  described = analysis.analyse(
      captioned, source=splits['test'], train_captions=records_lib.all_captions(splits['train']),
      vocab=workdir_lib.load_vocab(workdir), provenance=_provenance(), stem='x', metrics=('cider',))
  assert described.collapse.warning is None and described.collapse.distinct_ratio > 0.5, described.collapse
  assert described.content.objects_right > 0.9  # the content score agrees they are right


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
  record = modes.evaluate_workdir(str(copy), checkpoint='latest', beam_size=1)
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
  captioned = []
  for i in range(6):
    words = ['a', 'red', 'circle'] if i % 2 else ['a', 'blue', 'square', 'on', 'the', 'right']
    attention = np.full((len(words), 4, 4), 1 / 16, np.float32)
    attention[:, 0, 0] += 1.0  # the peak in the top-left cell, inside the circle's box
    caption = ' '.join(words)
    captioned.append(inference.CaptionedImage(i, f'im{i}', source[i]['captions'], caption,
                                              inference.AttendedCaption(caption, words, attention)))
  vocab = vocab_lib.Vocabulary((*vocab_lib.SPECIALS, 'a', 'red', 'circle', 'blue', 'square'))
  result = analysis.analyse(captioned, source=source, train_captions=['a red circle'], vocab=vocab,
                            provenance=_provenance(), stem='eval_test_1_greedy', metrics=('bleu', 'cider'))
  page = analysis.report_page(result, source)
  shown = [e for e in page['examples'] if e['image']]
  assert shown and all(len(e['attention']) == len(e['caption'].split()) for e in shown)
  assert [m['word'] for m in shown[0]['attention']] == shown[0]['caption'].split()
  record = result.record()
  assert record['content']['pointing'] == 1.0  # 'red' and 'circle' of the 3 correct captions
  assert record['content']['pointing_words_checked'] == 6
  assert record['content']['pointing_chance'] == 4 / 16  # the box [0, .5]^2 covers 4 of 16 cells
  html = report.render_report(page)
  maps = sum(len(page['examples'][i]['attention']) for shown in page['sections'].values() for i in shown)
  assert html.count('<figcaption>') == maps > 0
  json.dumps(record)  # no arrays in the JSON


# ----------------------------------------------------------------------------- compare mode

def test_compare_puts_two_checkpoints_side_by_side(trained, tmp_path, capsys):
  workdir = trained.workdir
  earlier = tmp_path / 'epoch1'
  shutil.copytree(workdir, earlier, ignore=shutil.ignore_patterns('*.lock'))
  shutil.rmtree(earlier / 'checkpoints' / str(_latest_step(workdir)))  # its latest is the first epoch's
  out = modes.compare_workdirs([workdir, str(earlier)], checkpoint='latest', beam_size=1)
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
  with pytest.raises(errors.InputError, match='two or more'):
    modes.compare_workdirs([workdir])


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
