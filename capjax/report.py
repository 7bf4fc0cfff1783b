"""The evaluation report: one self-contained HTML file a person can open, trust and read.

Pure functions from a payload (a JSON-ready dict) to an HTML string, plus `write_report`, which writes it
atomically. The page has inline CSS and hand-written inline SVG charts, no JavaScript, and nothing that
a browser would fetch from the network: images are data URIs (`image_data_uri`) or paths relative to the
report. Every caption, reference, id and provenance value is escaped with `html.escape`, since captions
are model output and references are user data.

Payload (what `render_report` and `write_report` take; `evaluation.py` builds it):

  {'title': str,                         # e.g. 'capjax evaluation: test split, checkpoint 20000'
   'provenance': {str: str | int | float | bool | None},
                                         # every key is listed, in order; those in HEADER_KEYS
                                         # ('model', 'workdir', 'checkpoint_step', ...), when present,
                                         # also head the page
   'metrics': {str: float},              # capjax.metrics.compute_caption_metrics: Bleu_1..Bleu_4,
                                         # METEOR, ROUGE_L, CIDEr (any subset)
   'paper_bleu': {str: float} | None,    # caption_analysis.paper_bleu: BLEU-1..BLEU-4
   'collapse': dict | None,              # caption_analysis.collapse_report (its length histogram is charted)
   'content': dict | None,               # a content score: {name: number or str} and/or
                                         # {row name: {column: number or str}}, shown as tables
   'examples': [                         # every evaluated image, in evaluation order
       {'image_id': str,
        'image': str | None,             # image_data_uri(...) of a ~128 px thumbnail, or a relative path;
                                         # needed for the examples in 'sections', may be None elsewhere
        'caption': str,                  # the generated caption
        'references': [str],
        'scores': {'CIDEr': float, 'Bleu_4': float},  # caption_analysis.per_image_scores(...).per_image[id]
        'attention': [{'word': str, 'image': str}]},  # optional: one map per generated word, as 'image'
                                                      # (attention_figures makes them)
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

import base64
import html
import io
import math
import re
from typing import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from capjax import attention_figures as attention_lib
from capjax import fileio

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
                'stores (capjax/content_score.py): objects right = the caption names exactly the true '
                '(colour, shape) pairs, nothing missing or extra; colours / shapes right = the same for '
                'colours or shapes alone; positions right = every position it claims is true, positions '
                'wrong = at least one is false (captions that claim none are neither). BLEU and CIDEr '
                'reward captions that sound like the references, even with the wrong shape or side.')
_COLOURS = {'generated': '#0969da', 'references': '#bf8700', 'a': '#8250df', 'b': '#1a7f37',
            'neutral': '#57606a'}


class _Html(str):
  """Markup built here (trusted); any other str put into the page is escaped."""


def _text(value) -> _Html:
  return value if isinstance(value, _Html) else _Html(html.escape(str(value)))


# ----------------------------------------------------------------------------- helpers for the caller

def image_data_uri(pixels_uint8_hwc, fmt: str = 'JPEG', quality: int = 85, *,
                   max_side: int | None = None) -> str:
  """A data URI (data:image/jpeg;base64,...) of an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 image.

  fmt: 'JPEG' (small; alpha is dropped) or 'PNG' (lossless). max_side: shrink the image first so that
  its longer side is at most this many pixels (aspect kept), e.g. 128 for a report thumbnail.
  """
  array = np.asarray(pixels_uint8_hwc)
  if array.dtype != np.uint8:
    raise TypeError(f'image_data_uri needs uint8 pixels, got {array.dtype}')
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
    raise ValueError(f'image_data_uri needs an (H, W) or (H, W, 1|3|4) image, got shape {array.shape}')
  fmt = {'JPG': 'JPEG'}.get(fmt.upper(), fmt.upper())
  if fmt not in ('JPEG', 'PNG'):
    raise ValueError(f"fmt must be 'JPEG' or 'PNG', got {fmt!r}")
  image = Image.fromarray(array)
  if max_side:
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
  if fmt == 'JPEG' and image.mode not in ('RGB', 'L'):
    image = image.convert('RGB')
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **({'quality': quality} if fmt == 'JPEG' else {}))
  return f'data:image/{fmt.lower()};base64,' + base64.b64encode(buffer.getvalue()).decode('ascii')


def attention_figures(pixels_uint8_hwc, words: Sequence[str], attention, *,
                      size: int = 56) -> list[dict]:
  """The report's per-word attention maps: [{'word', 'image'}] for an example's 'attention' key.

  pixels_uint8_hwc: the image (H, W, 3). words: the generated words. attention: (len(words), gh, gw)
  weights over the encoder's grid (or more rows than words, e.g. one for <END>: they are not shown).
  Each map is spread over a `size` px thumbnail as caption mode's figures spread it
  (`capjax.attention_figures.upsample`: smooth, scaled to its own maximum, so a flat map looks flat,
  not blank) and drawn as the picture dimmed away from the attended cells, tinted red where the weight
  is high.
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
    figures.append({'word': str(word), 'image': image_data_uri(np.clip(overlay, 0, 255).astype(np.uint8))})
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
      _section('provenance', 'Provenance', _key_value_table(payload.get('provenance') or {})),
      _collapse_section(collapse),
      _charts_section(collapse, examples),
      _section('content', 'Content score', _content_tables(content) +
               f'<p class="note">{_text(CONTENT_NOTE)}</p>') if content else '',
      *[_examples_section(name, examples, sections.get(name, [])) for name in SECTIONS],
      _all_captions(examples),
  ]
  return _page(payload.get('title') or 'Evaluation report', body)


def _header(title: str, chips: Mapping) -> str:
  chips = [f'<span class="chip"><b>{_text(k)}</b>{_text(_plain(v))}</span>' for k, v in chips.items()]
  return f'<header><h1>{_text(title)}</h1><div class="chips">{"".join(chips)}</div></header>'


def _warning_box(warning: str) -> str:
  return f'<div class="warning" role="alert"><strong>\u26a0 Warning</strong>{_text(warning)}</div>'


def _nav(links: Sequence[tuple[str, str]]) -> str:
  return '<nav>' + ''.join(f'<a href="#{k}">{_text(label)}</a>' for k, label in links) + '</nav>'


def _section(section_id: str, title: str, inner: str) -> str:
  return f'<section id="{section_id}"><h2>{_text(title)}</h2>{inner}</section>'


def _metrics_section(metrics: Mapping[str, float], paper: Mapping[str, float] | None) -> str:
  coco = _metric_table(metrics, COCO_METRICS, 'coco-caption (pycocoevalcap)')
  panels = [f'<div class="panel">{coco}<p class="note">{_text(COCO_NOTE)}</p></div>']
  if paper:
    table = _metric_table(paper, PAPER_METRICS, 'Paper-style BLEU (NLTK)')
    panels.append(f'<div class="panel">{table}<p class="note">{_text(PAPER_NOTE)}</p></div>')
  return _section('metrics', 'Metrics', f'<div class="row">{"".join(panels)}</div>')


def _metric_table(values: Mapping[str, float], order: Sequence[str], title: str) -> str:
  names = [k for k in order if k in values] + sorted(k for k in values if k not in order)
  rows = [(k, _num(values[k]), _num(100 * float(values[k]), 1)) for k in names]
  return f'<h3>{_text(title)}</h3>' + _table(('metric', 'score', '\u00d7100'), rows or [('(none)', '', '')],
                                              numeric=(1, 2))


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
          f"{_plain(means.get('generated'), 3)} / {_plain(means.get('references'), 3)}",
  }
  limits = c['thresholds']
  rule = (f"The warning fires when the {limits['top_few']} most common repeated captions are written for "
          f"at least {limits['top_few_share']:.0%} of the images or fewer than "
          f"{limits['distinct_ratio']:.0%} of the captions are distinct (with at least "
          f"{limits['min_images']} images).")
  repeated = [(r['caption'], r['count'], f"{r['share']:.1%}") for r in c.get('most_repeated') or []]
  repeated_table = (_table(('caption', 'images', 'share'), repeated, numeric=(1, 2)) if repeated
                    else '<p class="note">No caption is written for more than one image.</p>')
  inner = (f'{_warning_box(c["warning"]) if c.get("warning") else ""}'
           f'<div class="row"><div class="panel">{_key_value_table(stats)}<p class="note">{_text(rule)}</p>'
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
  svg = _bar_chart([str(lengths[i]) for i in keep], series, x_label='caption length (words)',
                   y_label='share of captions', y_format=lambda v: f'{v:.0%}')
  return (f'<h3>Caption length: generated vs references</h3>{svg}<p class="note">Share of captions of '
          'each length, in words. A collapsed model piles onto one or two lengths.</p>')


def _cider_chart(ciders: Sequence[float]) -> str:
  top = max(1.0, math.ceil(max(ciders) * 2) / 2)
  counts, edges = np.histogram(ciders, bins=20, range=(0.0, top))
  mean = float(np.mean(ciders))
  svg = _bar_chart([f'{e:.2f}' for e in edges[:-1]], [('images', counts.tolist(), _COLOURS['generated'])],
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
          f'<div class="meta">#{index} \u00b7 {_text(example["image_id"])}</div>'
          f'<p class="caption">{_text(example["caption"])}</p>{_badges(scores)}</div></div>'
          f'{_references(example.get("references") or [])}{_attention(example.get("attention"))}</div>')


def _thumb(example: Mapping) -> str:
  src = example.get('image')
  if not src:
    return '<div class="thumb missing">no image</div>'
  return f'<img class="thumb" src="{_image_src(src)}" alt="image {_text(example["image_id"])}">'


def _image_src(src: str) -> str:
  """A data URI or a relative path; anything a browser would fetch from elsewhere is refused."""
  if not src.startswith('data:image/') and re.match(r'^([a-zA-Z][a-zA-Z0-9+.-]*:|/|\\)', src):
    raise ValueError(f'report images must be data URIs or relative paths, got {src[:60]!r}')
  return _text(src)


def _badges(scores: Mapping[str, float]) -> str:
  names = {'CIDEr': 'CIDEr-D', 'Bleu_4': 'BLEU-4'}
  return '<div>' + ''.join(f'<span class="badge">{names.get(k, k)} {_num(scores[k], 3)}</span>'
                           for k in ('CIDEr', 'Bleu_4') if k in scores) + '</div>'


def _references(references: Sequence[str]) -> str:
  items = ''.join(f'<li>{_text(r)}</li>' for r in references)
  return f'<div class="refs-title">References</div><ol class="refs">{items}</ol>'


def _attention(maps: Sequence[Mapping] | None) -> str:
  if not maps:
    return ''
  figures = ''.join(f'<figure><img src="{_image_src(m["image"])}" alt="attention for {_text(m["word"])}">'
                    f'<figcaption>{_text(m["word"])}</figcaption></figure>' for m in maps)
  return (f'<div class="refs-title">Attention, one map per generated word</div>'
          f'<div class="attention">{figures}</div>')


def _all_captions(examples: Sequence[Mapping]) -> str:
  rows = [(i, e['image_id'], _num(e['scores']['CIDEr'], 3), _num(e['scores']['Bleu_4'], 3), e['caption'])
          for i, e in enumerate(examples)]
  table = _table(('#', 'image id', 'CIDEr-D', 'BLEU-4', 'generated caption'), rows, numeric=(0, 2, 3))
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
  return _page(f'Comparison: {label_a} vs {label_b}', body)


def _compare_metrics(payload_a: Mapping, payload_b: Mapping, label_a: str, label_b: str) -> str:
  panels = []
  for key, order, title, note in (('metrics', COCO_METRICS, 'coco-caption (pycocoevalcap)', COCO_NOTE),
                                  ('paper_bleu', PAPER_METRICS, 'Paper-style BLEU (NLTK)', PAPER_NOTE)):
    a, b = payload_a.get(key) or {}, payload_b.get(key) or {}
    names = [k for k in order if k in a or k in b] + sorted((set(a) | set(b)) - set(order))
    rows = [(k, _num(a.get(k)), _num(b.get(k)), _signed(b[k] - a[k]) if k in a and k in b else '')
            for k in names]
    if rows:
      table = _table(('metric', label_a, label_b, f'{label_b} \u2212 {label_a}'), rows, numeric=(1, 2, 3))
      panels.append(f'<div class="panel"><h3>{_text(title)}</h3>{table}'
                    f'<p class="note">{_text(note)}</p></div>')
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
  rows = [(_Html(f'<span class="differs">{_text(k)}</span>') if a.get(k) != b.get(k) else k,
           _plain(a.get(k)), _plain(b.get(k))) for k in keys]
  return (_table(('key', label_a, label_b), rows) +
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
  svg = _bar_chart([f'{c:+.2f}' for c in centres], [('images', counts.tolist(), colours)],
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
                  f'<div class="panel">{svg}<p class="note">{_text(text)}</p></div>')


def _pair_card(a: Mapping, b: Mapping, index: int, label_a: str, label_b: str) -> str:
  diff = float(b['scores']['CIDEr']) - float(a['scores']['CIDEr'])
  lines = ''.join(f'<div class="model"><span class="tag tag-{k}">{_text(label)}</span>'
                  f'<p class="caption">{_text(e["caption"])}</p>{_badges(e.get("scores") or {})}</div>'
                  for k, label, e in (('a', label_a, a), ('b', label_b, b)))
  image = a if a.get('image') else b
  return (f'<div class="card" data-index="{index}"><div class="card-top">{_thumb(image)}<div>'
          f'<div class="meta">#{index} \u00b7 {_text(a["image_id"])} \u00b7 '
          f'\u0394 CIDEr-D {_signed(diff, 3)}</div>{lines}</div></div>'
          f'{_references(a.get("references") or [])}</div>')


# ----------------------------------------------------------------------------- tables and numbers

def _table(headers: Sequence[str], rows: Iterable[Sequence], numeric: Sequence[int] = ()) -> str:
  def cell(tag, i, value):
    return f'<{tag} class="num">{_text(value)}</{tag}>' if i in numeric else f'<{tag}>{_text(value)}</{tag}>'
  head = ''.join(cell('th', i, h) for i, h in enumerate(headers))
  body = ''.join('<tr>' + ''.join(cell('td', i, v) for i, v in enumerate(row)) + '</tr>' for row in rows)
  return f'<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _key_value_table(values: Mapping) -> str:
  if not values:
    return '<p class="note">(empty)</p>'
  return _table(('key', 'value'), [(k, _plain(v)) for k, v in values.items()])


def _content_tables(content: Mapping) -> str:
  """Scalars as key/value rows; {row: {column: value}} entries as one table with a column per key."""
  scalars = {k: (', '.join(map(_plain, v)) if isinstance(v, (list, tuple)) else v)
             for k, v in content.items() if not isinstance(v, Mapping)}
  nested = {k: v for k, v in content.items() if isinstance(v, Mapping)}
  parts = [_key_value_table(scalars)] if scalars else []
  if nested:
    columns = list(dict.fromkeys(c for row in nested.values() for c in row))
    rows = [(k, *[_plain(v.get(c)) for c in columns]) for k, v in nested.items()]
    parts.append(_table(('', *columns), rows, numeric=range(1, len(columns) + 1)))
  return ''.join(parts)


def _num(value, digits: int = 4) -> str:
  return '\u2014' if value is None else f'{float(value):.{digits}f}'


def _signed(value: float, digits: int = 4) -> str:
  return f'{float(value):+.{digits}f}'


def _plain(value, digits: int | None = None) -> str:
  """A provenance value as a person reads it: JSON spellings for None and bools; floats exact (repr),
  or to `digits` significant figures."""
  if value is None:
    return 'null'
  if isinstance(value, bool):
    return 'true' if value else 'false'
  if isinstance(value, float):
    return repr(value) if digits is None else f'{value:.{digits}g}'
  return str(value)


# ----------------------------------------------------------------------------- SVG charts

def _bar_chart(labels: Sequence[str], series: Sequence[tuple], *, x_label: str, y_label: str,
               y_format=lambda v: f'{v:g}', marker: tuple[float, str] | None = None,
               legend: Sequence[tuple[str, str]] | None = None, width: int = 540, height: int = 260) -> str:
  """Grouped bars, one group per label, as an inline SVG.

  series: (name, values, colour or one colour per bar). marker: (position in bins from the left edge,
  text), a dashed vertical line. legend: (text, colour) pairs above the plot; by default the series'
  names when there are several.
  """
  left, right, top, bottom = 52, 12, 34, 46
  plot_w, plot_h = width - left - right, height - top - bottom
  y_max = _nice_ceiling(max([max(v) for _, v, _ in series if len(v)] + [0]))
  group = plot_w / max(len(labels), 1)
  bar = group * 0.8 / len(series)
  parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
           f'role="img" aria-label="{_text(y_label)} by {_text(x_label)}">']
  for frac in (0.0, 0.5, 1.0):
    y = top + plot_h * (1 - frac)
    parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                 f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
                 f'{_text(y_format(y_max * frac))}</text>')
  for s, (name, values, colour) in enumerate(series):
    colours = colour if isinstance(colour, (list, tuple)) else [colour] * len(values)
    for i, value in enumerate(values):
      h = plot_h * value / y_max
      x = left + i * group + group * 0.1 + s * bar
      parts.append(f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                   f'fill="{colours[i]}"><title>{_text(name)}, {_text(labels[i])}: '
                   f'{_text(y_format(value))}</title></rect>')
  step = max(1, math.ceil(len(labels) / 11))
  parts += [f'<text x="{left + (i + 0.5) * group:.1f}" y="{top + plot_h + 15}" text-anchor="middle">'
            f'{_text(label)}</text>' for i, label in enumerate(labels) if i % step == 0]
  middle, base = top + plot_h / 2, top + plot_h
  parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 8}" text-anchor="middle" class="axis">'
               f'{_text(x_label)}</text><text x="14" y="{middle:.1f}" text-anchor="middle" class="axis" '
               f'transform="rotate(-90 14 {middle:.1f})">{_text(y_label)}</text>'
               f'<line x1="{left}" x2="{width - right}" y1="{base}" y2="{base}" class="axisline"/>')
  if marker:
    x = left + marker[0] * group
    parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top - 6}" y2="{top + plot_h}" class="marker"/>'
                 f'<text x="{x + 4:.1f}" y="{top - 8}" class="axis">{_text(marker[1])}</text>')
  if legend is None and len(series) > 1:
    legend = [(name, colour) for name, _, colour in series]
  x = left
  for text, colour in legend or []:
    parts.append(f'<rect x="{x}" y="6" width="10" height="10" fill="{colour}"/>'
                 f'<text x="{x + 14}" y="15">{_text(text)}</text>')
    x += 24 + 6.5 * len(text)
  return ''.join(parts) + '</svg>'


def _nice_ceiling(value: float) -> float:
  """The smallest of 1, 2, 2.5, 5 times a power of ten that is >= value: a round top for an axis."""
  if value <= 0:
    return 1.0
  power = 10.0 ** math.floor(math.log10(value))
  return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= value * (1 - 1e-9))


# ----------------------------------------------------------------------------- the page

_CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --soft: #f6f8fa; --link: #0969da;
        --warn: #cf222e; --warn-bg: #ffebe9; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
       font: 14px/1.45 'Segoe UI', 'Liberation Sans', 'DejaVu Sans', Helvetica, Arial, sans-serif; }
main { max-width: 1200px; margin: 0 auto; padding: 18px 28px 60px; }
h1 { font-size: 22px; margin: 0 0 8px; }
h2 { font-size: 18px; margin: 30px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 14px; margin: 0 0 6px; }
.chips { display: flex; flex-wrap: wrap; gap: 6px 8px; }
.chip { background: var(--soft); border: 1px solid var(--line); border-radius: 6px; padding: 2px 8px;
        font-size: 13px; overflow-wrap: anywhere; }
.chip b { color: var(--muted); font-weight: 600; margin-right: 6px; }
nav { position: sticky; top: 0; z-index: 1; background: #fff; margin-top: 12px; padding: 7px 0;
      border-top: 1px solid var(--line); border-bottom: 1px solid var(--line); }
nav a { color: var(--link); text-decoration: none; margin-right: 16px; }
section { scroll-margin-top: 44px; }
.row { display: flex; flex-wrap: wrap; gap: 18px 32px; align-items: flex-start; }
.panel { flex: 1 1 380px; min-width: 0; }
.panel > table { width: 100%; max-width: 520px; }
table + table { margin-top: 14px; }
.note + .cards { margin-top: 10px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top;
         overflow-wrap: anywhere; }
th:first-child, td:first-child { overflow-wrap: normal; }  /* keys such as checkpoint_step stay whole */
th { background: var(--soft); font-weight: 600; }
.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.note { color: var(--muted); font-size: 12.5px; max-width: 68ch; margin: 6px 0 0; }
.warning { border: 1px solid #ffc1c0; border-left: 6px solid var(--warn); background: var(--warn-bg);
           border-radius: 6px; padding: 10px 14px; margin: 12px 0; font-size: 14px; }
.warning strong { display: block; color: var(--warn); font-size: 16px; margin-bottom: 3px; }
.differs { font-weight: 700; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 14px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; }
.card-top { display: flex; gap: 12px; align-items: flex-start; }
.thumb { width: 128px; height: auto; flex: none; border-radius: 4px; background: var(--soft); }
.thumb.missing { height: 96px; display: flex; align-items: center; justify-content: center;
                 color: var(--muted); font-size: 12px; }
.meta { color: var(--muted); font-size: 12px; overflow-wrap: anywhere; }
.caption { font-size: 15px; font-weight: 600; margin: 2px 0 6px; overflow-wrap: anywhere; }
.badge { display: inline-block; font-size: 12px; border: 1px solid var(--line); background: var(--soft);
         border-radius: 10px; padding: 0 8px; margin: 0 4px 2px 0; font-variant-numeric: tabular-nums; }
.model { margin-bottom: 6px; }
.tag { display: inline-block; color: #fff; font-size: 11px; font-weight: 700; border-radius: 4px;
       padding: 0 6px; }
.tag-a { background: #8250df; }
.tag-b { background: #1a7f37; }
.refs-title { color: var(--muted); font-size: 11px; text-transform: uppercase; letter-spacing: .04em;
              margin-top: 8px; }
.refs { margin: 2px 0 0; padding-left: 20px; font-size: 12.5px; }
.attention { display: flex; flex-wrap: wrap; gap: 4px; margin-top: 4px; }
.attention figure { margin: 0; width: 56px; text-align: center; }
.attention img { width: 56px; height: 56px; object-fit: cover; display: block; border-radius: 3px; }
.attention figcaption { font-size: 11px; overflow-wrap: anywhere; }
details summary { cursor: pointer; color: var(--link); margin-bottom: 8px; }
svg.chart { max-width: 100%; height: auto; }
svg text { font-size: 11px; fill: var(--muted); }
svg text.axis { font-size: 12px; fill: var(--fg); }
svg .grid { stroke: #eaeef2; }
svg .axisline { stroke: #8c959f; }
svg .marker { stroke: var(--warn); stroke-dasharray: 4 3; }
"""


def _page(title: str, body: Sequence[str]) -> str:
  return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
          '<meta name="viewport" content="width=device-width, initial-scale=1">'
          f'<title>{_text(title)}</title><style>{_CSS}</style></head>'
          f'<body><main>{"".join(body)}</main></body></html>\n')
