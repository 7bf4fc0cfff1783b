"""The evaluation report: one self-contained HTML file a person can open, trust and read.

Pure functions from a payload (a JSON-ready dict) to an HTML string, plus `write_report`, which writes it
atomically. The page has inline CSS and hand-written inline SVG charts, no JavaScript, and nothing that
a browser would fetch from the network: images are data URIs (`markup.image_data_uri`) or paths relative to
the report. Every caption, reference, id and provenance value is escaped with `html.escape`, since captions
are model output and references are user data.

Payload (what `render_report` and `write_report` take; `analysis.report_page` builds it):

  {'title': str,                         # e.g. 'capjax evaluation: test split, checkpoint 20000'
   'provenance': {str: str | int | float | bool | None},
                                         # every key is listed, in order; those in HEADER_KEYS
                                         # ('model', 'workdir', 'checkpoint_step', ...), when present,
                                         # also head the page
   'metrics': {str: float},              # capjax.evaluation.metrics.compute_caption_metrics: Bleu_1..Bleu_4,
                                         # METEOR, ROUGE_L, CIDEr (any subset)
   'paper_bleu': {str: float} | None,    # caption_analysis.paper_bleu: BLEU-1..BLEU-4
   'collapse': dict | None,              # caption_analysis.collapse_report (its length histogram is charted)
   'content': dict | None,               # a content score: {name: number or str} and/or
                                         # {row name: {column: number or str}}, shown as tables
   'examples': [                         # every evaluated image, in evaluation order
       {'image_id': str,
        'image': str | None,             # markup.image_data_uri(...) of a ~128 px thumbnail, or a
                                         # relative path; needed for the examples in 'sections', may be
                                         # None elsewhere
        'caption': str,                  # the generated caption
        'references': [str],
        'scores': {'CIDEr': float, 'Bleu_4': float},  # caption_analysis.per_image_scores(...).per_image[id]
        'attention': [{'word': str, 'image': str}]},  # optional: one map per generated word, as 'image'
                                                      # (attention_map_images makes them)
       ...],
   'sections': {'best': [int], 'worst': [int], 'random': [int]}}
                                         # indices into 'examples' (select_sections); optional: computed
                                         # with select_sections(examples) when missing

The CIDEr histogram is computed from the examples' scores and the caption-length histogram taken from
'collapse', so the payload carries no chart data of its own.

`render_comparison(payload_a, payload_b)` puts two such payloads (two models on the same images) side by
side: metrics, provenance, the distribution of per-image CIDEr differences, and the images where the
second model gains or loses most (`select_comparison_sections`; only those need an 'image').
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from capjax import fileio
from capjax.evaluation import attention_figures as attention_lib
from capjax.evaluation import markup

COCO_METRICS = ('Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr')
PAPER_METRICS = ('BLEU-1', 'BLEU-2', 'BLEU-3', 'BLEU-4')
SECTIONS = ('best', 'worst', 'random')
HEADER_KEYS = ('model', 'workdir', 'checkpoint_step', 'checkpoint_choice', 'split', 'dataset', 'images',
               'decoding', 'tokenizer')

COCO_NOTE = ('coco-caption scores (pycocoevalcap, the MS-COCO evaluation code): corpus level, every '
             'reference of an image, captions lower-cased and PTB-tokenised with punctuation removed; '
             'CIDEr is CIDEr-D, with its IDF taken from these images\' references, so it only compares '
             'runs on the same image set. Papers usually print these \u00d7100.')
PAPER_NOTE = ('Paper-style BLEU: NLTK corpus_bleu, no smoothing, on captions only lower-cased and split '
              'on spaces (punctuation stays on the words), as many papers and PyTorch repositories '
              'compute it. It is not coco-caption\'s BLEU: compare a number only with one computed the '
              'same way.')
CONTENT_NOTE = ('Does the caption say what is in the picture? Checked against the ground truth the demo data '
                'stores (capjax/evaluation/content_score.py): objects right = the caption names exactly the '
                'true (colour, shape) pairs, nothing missing or extra; colours / shapes right = the same for '
                'colours or shapes alone; positions right = every position it claims is true, positions '
                'wrong = at least one is false (captions that claim none are neither). BLEU and CIDEr '
                'reward captions that sound like the references, even with the wrong shape or side.')
_COLOURS = {'generated': '#0969da', 'references': '#bf8700', 'a': '#8250df', 'b': '#1a7f37',
            'neutral': '#57606a'}


# ----------------------------------------------------------------------------- helpers for the caller

def attention_map_images(pixels_uint8_hwc, words: Sequence[str], attention, *,
                         size: int = 56) -> list[dict]:
  """The report's per-word attention maps: [{'word', 'image'}] for an example's 'attention' key.

  pixels_uint8_hwc: the image (H, W, 3). words: the generated words. attention: (len(words), gh, gw)
  weights over the encoder's grid (or more rows than words, e.g. one for <END>: they are not shown).
  Each map is spread over a `size` px thumbnail as caption mode's figures spread it
  (`attention_figures.upsample`: smooth, scaled to its own maximum, so a flat map looks flat, not blank)
  and drawn as the picture dimmed away from the attended cells, tinted red where the weight is high.
  """
  weights = np.asarray(attention, np.float32)
  if weights.ndim != 3 or weights.shape[0] < len(words):
    raise ValueError(f'attention must be (len(words)={len(words)}, gh, gw), got shape {weights.shape}')
  picture = Image.fromarray(np.asarray(pixels_uint8_hwc, np.uint8)).convert('RGB').resize((size, size))
  picture = np.asarray(picture, np.float32)
  figures = []
  for word, grid in zip(words, weights):
    heat = attention_lib.upsample(grid, size)[..., None]
    overlay = picture * (0.25 + 0.75 * heat) + np.array([255.0, 40.0, 0.0]) * 0.35 * heat
    pixels = np.clip(overlay, 0, 255).astype(np.uint8)
    figures.append({'word': str(word), 'image': markup.image_data_uri(pixels)})
  return figures


def select_sections(examples: Sequence[Mapping], n: int = 8, seed: int = 0) -> dict[str, list[int]]:
  """{'best', 'worst', 'random'}: indices of the n examples with the highest and the lowest per-image
  CIDEr (ties by index), and n drawn at random with `seed` (in index order)."""
  return _extremes([float(e['scores']['CIDEr']) for e in examples], n, seed, ('best', 'worst', 'random'))


def select_comparison_sections(differences: Sequence[float], n: int = 8,
                               seed: int = 0) -> dict[str, list[int]]:
  """{'gains', 'losses', 'random'}: what `render_comparison` shows, as indices into the images both
  evaluations share (in the first one's order) given each one's CIDEr(B) - CIDEr(A)."""
  return _extremes(differences, n, seed, ('gains', 'losses', 'random'))


def _extremes(values: Sequence[float], n: int, seed: int, names: Sequence[str]) -> dict[str, list[int]]:
  order = sorted(range(len(values)), key=lambda i: (-values[i], i))
  lowest = sorted(range(len(values)), key=lambda i: (values[i], i))
  drawn = np.random.default_rng(seed).choice(len(values), size=min(n, len(values)), replace=False)
  return dict(zip(names, (order[:n], lowest[:n], sorted(int(i) for i in drawn))))


def write_report(path: str, payload: Mapping) -> None:
  """render_report(payload), written atomically to `path` (UTF-8)."""
  fileio.write_text(path, render_report(payload))


def write_comparison(path: str, payload_a: Mapping, payload_b: Mapping, labels=('A', 'B')) -> None:
  """render_comparison(payload_a, payload_b, labels), written atomically to `path` (UTF-8)."""
  fileio.write_text(path, render_comparison(payload_a, payload_b, labels))


# ----------------------------------------------------------------------------- one evaluation

def render_report(payload: Mapping) -> str:
  """The whole report page for one evaluation payload (schema in the module docstring)."""
  examples = list(payload.get('examples') or [])
  sections = payload.get('sections') or select_sections(examples)
  collapse = payload.get('collapse')
  warning = (collapse or {}).get('warning')
  content = payload.get('content')
  links = [('metrics', 'Metrics'), ('provenance', 'Provenance'), ('collapse', 'Collapse'),
           ('charts', 'Charts'), *([('content', 'Content')] if content else []),
           *[(s, s.capitalize()) for s in SECTIONS], ('all', 'All captions')]
  body = [
      _header(payload.get('title') or 'Evaluation report',
              {k: v for k, v in (payload.get('provenance') or {}).items() if k in HEADER_KEYS}),
      _warning_box(warning) if warning else '',
      _nav(links),
      _metrics_section(payload.get('metrics') or {}, payload.get('paper_bleu')),
      _section('provenance', 'Provenance', markup.key_value_table(payload.get('provenance') or {})),
      _collapse_section(collapse),
      _charts_section(collapse, examples),
      _section('content', 'Content score', _content_tables(content) +
               f'<p class="note">{markup.text(CONTENT_NOTE)}</p>') if content else '',
      *[_examples_section(name, examples, sections.get(name, [])) for name in SECTIONS],
      _all_captions(examples),
  ]
  return markup.page(payload.get('title') or 'Evaluation report', body)


def _header(title: str, chips: Mapping) -> str:
  chips = [f'<span class="chip"><b>{markup.text(k)}</b>{markup.text(markup.plain(v))}</span>'
           for k, v in chips.items()]
  return f'<header><h1>{markup.text(title)}</h1><div class="chips">{"".join(chips)}</div></header>'


def _warning_box(warning: str) -> str:
  return f'<div class="warning" role="alert"><strong>\u26a0 Warning</strong>{markup.text(warning)}</div>'


def _nav(links: Sequence[tuple[str, str]]) -> str:
  return '<nav>' + ''.join(f'<a href="#{k}">{markup.text(label)}</a>' for k, label in links) + '</nav>'


def _section(section_id: str, title: str, inner: str) -> str:
  return f'<section id="{section_id}"><h2>{markup.text(title)}</h2>{inner}</section>'


def _metrics_section(metrics: Mapping[str, float], paper: Mapping[str, float] | None) -> str:
  coco = _metric_table(metrics, COCO_METRICS, 'coco-caption (pycocoevalcap)')
  panels = [f'<div class="panel">{coco}<p class="note">{markup.text(COCO_NOTE)}</p></div>']
  if paper:
    table = _metric_table(paper, PAPER_METRICS, 'Paper-style BLEU (NLTK)')
    panels.append(f'<div class="panel">{table}<p class="note">{markup.text(PAPER_NOTE)}</p></div>')
  return _section('metrics', 'Metrics', f'<div class="row">{"".join(panels)}</div>')


def _metric_table(values: Mapping[str, float], order: Sequence[str], title: str) -> str:
  names = [k for k in order if k in values] + sorted(k for k in values if k not in order)
  rows = [(k, markup.num(values[k]), markup.num(100 * float(values[k]), 1)) for k in names]
  return f'<h3>{markup.text(title)}</h3>' + markup.table(('metric', 'score', '\u00d7100'),
                                                         rows or [('(none)', '', '')], numeric=(1, 2))


def _collapse_section(collapse: Mapping | None) -> str:
  if not collapse:
    return _section('collapse', 'Collapse detectors', '<p class="note">Not computed.</p>')
  c = collapse
  means = c.get('mean_length') or {}
  stats = {
      'images': c['images'],
      'distinct captions': f"{c['distinct_captions']} ({c['distinct_ratio']:.1%} of the images)",
      'most common caption covers': f"{c['top_caption_share']:.1%} of the images",
      f"{c['thresholds']['top_few']} most common repeated captions cover":
          f"{c['top_few_share']:.1%} of the images",
      'captions copied verbatim from training': f"{c['in_train_fraction']:.1%}",
      'novel captions (not in training)': f"{c['novel_fraction']:.1%}",
      'words used / vocabulary': f"{c['words_used']} / {c['vocab_size']} ({c['vocab_coverage']:.1%})",
      'mean length, generated / references (words)':
          f"{markup.plain(means.get('generated'), 3)} / {markup.plain(means.get('references'), 3)}",
  }
  limits = c['thresholds']
  rule = (f"The warning fires when the {limits['top_few']} most common repeated captions are written for "
          f"at least {limits['top_few_share']:.0%} of the images or fewer than "
          f"{limits['distinct_ratio']:.0%} of the captions are distinct (with at least "
          f"{limits['min_images']} images).")
  repeated = [(r['caption'], r['count'], f"{r['share']:.1%}") for r in c.get('most_repeated') or []]
  repeated_table = (markup.table(('caption', 'images', 'share'), repeated, numeric=(1, 2)) if repeated
                    else '<p class="note">No caption is written for more than one image.</p>')
  inner = (f'{_warning_box(c["warning"]) if c.get("warning") else ""}'
           f'<div class="row"><div class="panel">{markup.key_value_table(stats)}'
           f'<p class="note">{markup.text(rule)}</p>'
           f'</div><div class="panel"><h3>Most repeated captions</h3>{repeated_table}</div></div>')
  return _section('collapse', 'Collapse detectors', inner)


def _charts_section(collapse: Mapping | None, examples: Sequence[Mapping]) -> str:
  charts = []
  histogram = (collapse or {}).get('length_histogram')
  if histogram:
    charts.append(_length_chart(histogram))
  if examples:
    charts.append(_cider_chart([float(e['scores']['CIDEr']) for e in examples]))
  inner = ''.join(f'<div class="panel">{c}</div>' for c in charts) or '<p class="note">No data.</p>'
  return _section('charts', 'Charts', f'<div class="row">{inner}</div>')


def _length_chart(histogram: Mapping) -> str:
  lengths = list(histogram['lengths'])
  generated, references = list(histogram['generated']), list(histogram['references'])
  used = [i for i, (g, r) in enumerate(zip(generated, references)) if g or r] or [0]
  keep = range(used[0], used[-1] + 1)  # no empty bins before the shortest caption
  series = [('generated', generated, _COLOURS['generated'])]
  if sum(references):
    series.append(('references', references, _COLOURS['references']))
  series = [(f'{name} ({sum(v)})', [v[i] / max(sum(v), 1) for i in keep], colour)
            for name, v, colour in series]
  svg = markup.bar_chart([str(lengths[i]) for i in keep], series, x_label='caption length (words)',
                         y_label='share of captions', y_format=lambda v: f'{v:.0%}')
  return (f'<h3>Caption length: generated vs references</h3>{svg}<p class="note">Share of captions of '
          'each length, in words. A collapsed model piles onto one or two lengths.</p>')


def _cider_chart(ciders: Sequence[float]) -> str:
  top = max(1.0, math.ceil(max(ciders) * 2) / 2)
  counts, edges = np.histogram(ciders, bins=20, range=(0.0, top))
  mean = float(np.mean(ciders))
  svg = markup.bar_chart([f'{e:.2f}' for e in edges[:-1]],
                         [('images', counts.tolist(), _COLOURS['generated'])],
                         x_label='per-image CIDEr-D (bin start)', y_label='images',
                         marker=(mean / top * len(counts), f'mean {mean:.3f}'))
  return (f'<h3>Per-image CIDEr-D</h3>{svg}<p class="note">The mean of the per-image CIDEr-D is the '
          'corpus CIDEr in the metrics table. A tall bar at 0 means many images get a caption that '
          'shares nothing distinctive with their references.</p>')


def _examples_section(name: str, examples: Sequence[Mapping], indices: Sequence[int]) -> str:
  blurbs = {'best': 'The images with the highest per-image CIDEr-D.',
            'worst': 'The images with the lowest per-image CIDEr-D.',
            'random': 'Images drawn at random: what a typical caption looks like.'}
  cards = ''.join(_card(examples[i], i) for i in indices)
  return _section(name, name.capitalize(),
                  f'<p class="note">{blurbs[name]}</p><div class="cards">{cards}</div>')


def _card(example: Mapping, index: int) -> str:
  scores = example.get('scores') or {}
  return (f'<div class="card" data-index="{index}"><div class="card-top">{_thumb(example)}<div>'
          f'<div class="meta">#{index} \u00b7 {markup.text(example["image_id"])}</div>'
          f'<p class="caption">{markup.text(example["caption"])}</p>{_badges(scores)}</div></div>'
          f'{_references(example.get("references") or [])}{_attention(example.get("attention"))}</div>')


def _thumb(example: Mapping) -> str:
  src = example.get('image')
  if not src:
    return '<div class="thumb missing">no image</div>'
  return f'<img class="thumb" src="{markup.image_src(src)}" alt="image {markup.text(example["image_id"])}">'


def _badges(scores: Mapping[str, float]) -> str:
  names = {'CIDEr': 'CIDEr-D', 'Bleu_4': 'BLEU-4'}
  return '<div>' + ''.join(f'<span class="badge">{names.get(k, k)} {markup.num(scores[k], 3)}</span>'
                           for k in ('CIDEr', 'Bleu_4') if k in scores) + '</div>'


def _references(references: Sequence[str]) -> str:
  items = ''.join(f'<li>{markup.text(r)}</li>' for r in references)
  return f'<div class="refs-title">References</div><ol class="refs">{items}</ol>'


def _attention(maps: Sequence[Mapping] | None) -> str:
  if not maps:
    return ''
  figures = ''.join(f'<figure><img src="{markup.image_src(m["image"])}" '
                    f'alt="attention for {markup.text(m["word"])}">'
                    f'<figcaption>{markup.text(m["word"])}</figcaption></figure>' for m in maps)
  return (f'<div class="refs-title">Attention, one map per generated word</div>'
          f'<div class="attention">{figures}</div>')


def _all_captions(examples: Sequence[Mapping]) -> str:
  rows = [(i, e['image_id'], markup.num(e['scores']['CIDEr'], 3), markup.num(e['scores']['Bleu_4'], 3),
           e['caption']) for i, e in enumerate(examples)]
  table = markup.table(('#', 'image id', 'CIDEr-D', 'BLEU-4', 'generated caption'), rows, numeric=(0, 2, 3))
  summary = f'All {len(examples)} images, in evaluation order'
  return _section('all', 'All captions', f'<details><summary>{summary}</summary>{table}</details>')


# ----------------------------------------------------------------------------- two evaluations

def render_comparison(payload_a: Mapping, payload_b: Mapping, labels=('A', 'B'), *, n: int = 8,
                      seed: int = 0) -> str:
  """A page comparing two evaluation payloads of the same images (matched by 'image_id').

  Metrics and provenance side by side, a histogram of CIDEr(B) - CIDEr(A) per image, and example cards
  (sections 'gains', 'losses', 'random': where B beats A most, loses most, and a random draw) with the
  image, both captions and scores, and the references.
  """
  label_a, label_b = (str(x) for x in labels)
  by_id_b = {str(e['image_id']): e for e in payload_b.get('examples') or []}
  pairs = [(a, by_id_b[str(a['image_id'])]) for a in payload_a.get('examples') or []
           if str(a['image_id']) in by_id_b]
  diffs = [float(b['scores']['CIDEr']) - float(a['scores']['CIDEr']) for a, b in pairs]
  picks = select_comparison_sections(diffs, n, seed)
  titles = {'gains': f'{label_b} beats {label_a} most', 'losses': f'{label_b} loses to {label_a} most',
            'random': 'Random images'}
  both = ((label_a, payload_a), (label_b, payload_b))
  warnings = [_warning_box(f'{label}: {p["collapse"]["warning"]}')
              for label, p in both if (p.get('collapse') or {}).get('warning')]
  body = [
      _header(f'Comparison: {label_a} vs {label_b}', {label: _run_name(p) for label, p in both}),
      ''.join(warnings),
      _nav([('metrics', 'Metrics'), ('provenance', 'Provenance'), ('differences', 'Differences'),
            *[(k, titles[k]) for k in titles]]),
      _compare_metrics(payload_a, payload_b, label_a, label_b),
      _section('provenance', 'Provenance', _compare_provenance(payload_a, payload_b, label_a, label_b)),
      _differences(diffs, len(payload_a.get('examples') or []), len(by_id_b), label_a, label_b),
      *[_section(k, titles[k], '<div class="cards">' +
                 ''.join(_pair_card(*pairs[i], i, label_a, label_b) for i in picks[k]) + '</div>')
        for k in titles],
  ]
  return markup.page(f'Comparison: {label_a} vs {label_b}', body)


def _compare_metrics(payload_a: Mapping, payload_b: Mapping, label_a: str, label_b: str) -> str:
  panels = []
  for key, order, title, note in (('metrics', COCO_METRICS, 'coco-caption (pycocoevalcap)', COCO_NOTE),
                                  ('paper_bleu', PAPER_METRICS, 'Paper-style BLEU (NLTK)', PAPER_NOTE)):
    a, b = payload_a.get(key) or {}, payload_b.get(key) or {}
    names = [k for k in order if k in a or k in b] + sorted((set(a) | set(b)) - set(order))
    rows = [(k, markup.num(a.get(k)), markup.num(b.get(k)),
             markup.signed(b[k] - a[k]) if k in a and k in b else '') for k in names]
    if rows:
      table = markup.table(('metric', label_a, label_b, f'{label_b} \u2212 {label_a}'), rows,
                           numeric=(1, 2, 3))
      panels.append(f'<div class="panel"><h3>{markup.text(title)}</h3>{table}'
                    f'<p class="note">{markup.text(note)}</p></div>')
  return _section('metrics', 'Metrics', f'<div class="row">{"".join(panels)}</div>')


def _run_name(payload: Mapping) -> str:
  """'<workdir> @ step <n>' from the provenance, else the payload's title."""
  provenance = payload.get('provenance') or {}
  if 'workdir' not in provenance:
    return payload.get('title') or ''
  step = provenance.get('checkpoint_step')
  return f"{provenance['workdir']}{f' @ step {step}' if step is not None else ''}"


def _compare_provenance(payload_a: Mapping, payload_b: Mapping, label_a: str, label_b: str) -> str:
  a, b = payload_a.get('provenance') or {}, payload_b.get('provenance') or {}
  keys = list(a) + [k for k in b if k not in a]
  rows = [(markup.Html(f'<span class="differs">{markup.text(k)}</span>') if a.get(k) != b.get(k) else k,
           markup.plain(a.get(k)), markup.plain(b.get(k))) for k in keys]
  return (markup.table(('key', label_a, label_b), rows) +
          '<p class="note">Keys in bold differ between the two evaluations.</p>')


def _differences(diffs: Sequence[float], n_a: int, n_b: int, label_a: str, label_b: str) -> str:
  if not diffs:
    return _section('differences', 'Per-image differences', '<p class="note">No image is in both.</p>')
  # An odd number of bins, so that the middle one holds the images where the two models are (nearly) even.
  top = max(0.5, math.ceil(max(abs(d) for d in diffs) * 2) / 2)
  counts, edges = np.histogram(diffs, bins=21, range=(-top, top))
  centres = (edges[:-1] + edges[1:]) / 2
  half = (edges[1] - edges[0]) / 2
  colours = [_COLOURS['neutral'] if i == 10 else _COLOURS['b'] if c > 0 else _COLOURS['a']
             for i, c in enumerate(centres)]
  svg = markup.bar_chart([f'{c:+.2f}' for c in centres], [('images', counts.tolist(), colours)],
                         x_label=f'CIDEr-D({label_b}) \u2212 CIDEr-D({label_a}) per image (bin centre)',
                         y_label='images', legend=[(f'{label_a} better', _COLOURS['a']),
                                             (f'within \u00b1{half:.2f}', _COLOURS['neutral']),
                                             (f'{label_b} better', _COLOURS['b'])])
  wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
  text = (f'{label_b} scores higher on {wins} images, lower on {losses}, the same on '
          f'{len(diffs) - wins - losses}; the mean difference, {np.mean(diffs):+.4f}, is the difference of '
          f'the corpus CIDEr-D. {len(diffs)} images are in both evaluations ({n_a} in {label_a}, {n_b} in '
          f'{label_b}).')
  return _section('differences', 'Per-image differences',
                  f'<div class="panel">{svg}<p class="note">{markup.text(text)}</p></div>')


def _pair_card(a: Mapping, b: Mapping, index: int, label_a: str, label_b: str) -> str:
  diff = float(b['scores']['CIDEr']) - float(a['scores']['CIDEr'])
  lines = ''.join(f'<div class="model"><span class="tag tag-{k}">{markup.text(label)}</span>'
                  f'<p class="caption">{markup.text(e["caption"])}</p>{_badges(e.get("scores") or {})}</div>'
                  for k, label, e in (('a', label_a, a), ('b', label_b, b)))
  image = a if a.get('image') else b
  return (f'<div class="card" data-index="{index}"><div class="card-top">{_thumb(image)}<div>'
          f'<div class="meta">#{index} \u00b7 {markup.text(a["image_id"])} \u00b7 '
          f'\u0394 CIDEr-D {markup.signed(diff, 3)}</div>{lines}</div></div>'
          f'{_references(a.get("references") or [])}</div>')


# ----------------------------------------------------------------------------- tables and numbers

def _content_tables(content: Mapping) -> str:
  """Scalars as key/value rows; {row: {column: value}} entries as one table with a column per key."""
  scalars = {k: (', '.join(map(markup.plain, v)) if isinstance(v, (list, tuple)) else v)
             for k, v in content.items() if not isinstance(v, Mapping)}
  nested = {k: v for k, v in content.items() if isinstance(v, Mapping)}
  parts = [markup.key_value_table(scalars)] if scalars else []
  if nested:
    columns = list(dict.fromkeys(c for row in nested.values() for c in row))
    rows = [(k, *[markup.plain(v.get(c)) for c in columns]) for k, v in nested.items()]
    parts.append(markup.table(('', *columns), rows, numeric=range(1, len(columns) + 1)))
  return ''.join(parts)
