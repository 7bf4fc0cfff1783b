"""HTML building blocks for the evaluation reports (`capjax.evaluation.report`): escaping, tables,
numbers, inline SVG bar charts, images as data URIs, and the page shell with its stylesheet
(`static/report.css`, shipped in the package and read with importlib.resources).

Why f-strings and a trusted-markup type, not a template library (Jinja2 with autoescape is the
ecosystem's usual choice):
- The report is computed, not designed: most of it is tables and SVG charts whose geometry is
  arithmetic in Python. In a template the same arithmetic would move into Python helpers called from
  template expressions, and the page would be split between two languages for no reader's benefit.
- Escaping is one rule here, the same one Jinja's autoescape applies: every value is escaped by
  `text()` (`html.escape`, quotes included) unless it is `Html`, markup built by these functions.
  `Html` plays the part of Jinja's `Markup`. The report tests feed captions with script tags and
  quotes through both pages and check that nothing is left unescaped.
- No new dependency for a page of ~400 lines of Python; the serve page, which is hand-written markup
  and script with no computed parts, is a static file instead (`capjax/serve/static/`).
"""

from __future__ import annotations

import base64
import functools
import html
import importlib.resources
import io
import math
import re
from typing import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image


class Html(str):
  """Markup built here (trusted); any other str put into the page is escaped."""


def text(value) -> Html:
  return value if isinstance(value, Html) else Html(html.escape(str(value)))

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

def image_src(src: str) -> str:
  """A data URI or a relative path; anything a browser would fetch from elsewhere is refused."""
  if not src.startswith('data:image/') and re.match(r'^([a-zA-Z][a-zA-Z0-9+.-]*:|/|\\)', src):
    raise ValueError(f'report images must be data URIs or relative paths, got {src[:60]!r}')
  return text(src)

def table(headers: Sequence[str], rows: Iterable[Sequence], numeric: Sequence[int] = ()) -> str:
  def cell(tag, i, value):
    return f'<{tag} class="num">{text(value)}</{tag}>' if i in numeric else f'<{tag}>{text(value)}</{tag}>'
  head = ''.join(cell('th', i, h) for i, h in enumerate(headers))
  body = ''.join('<tr>' + ''.join(cell('td', i, v) for i, v in enumerate(row)) + '</tr>' for row in rows)
  return f'<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def key_value_table(values: Mapping) -> str:
  if not values:
    return '<p class="note">(empty)</p>'
  return table(('key', 'value'), [(k, plain(v)) for k, v in values.items()])

def num(value, digits: int = 4) -> str:
  return '\u2014' if value is None else f'{float(value):.{digits}f}'


def signed(value: float, digits: int = 4) -> str:
  return f'{float(value):+.{digits}f}'


def plain(value, digits: int | None = None) -> str:
  """A provenance value as a person reads it: JSON spellings for None and bools; floats exact (repr),
  or to `digits` significant figures."""
  if value is None:
    return 'null'
  if isinstance(value, bool):
    return 'true' if value else 'false'
  if isinstance(value, float):
    return repr(value) if digits is None else f'{value:.{digits}g}'
  return str(value)

def bar_chart(labels: Sequence[str], series: Sequence[tuple], *, x_label: str, y_label: str,
              y_format=lambda v: f'{v:g}', marker: tuple[float, str] | None = None,
              legend: Sequence[tuple[str, str]] | None = None, width: int = 540, height: int = 260) -> str:
  """Grouped bars, one group per label, as an inline SVG.

  series: (name, values, colour or one colour per bar). marker: (position in bins from the left edge,
  text), a dashed vertical line. legend: (text, colour) pairs above the plot; by default the series'
  names when there are several.
  """
  left, right, top, bottom = 52, 12, 34, 46
  plot_w, plot_h = width - left - right, height - top - bottom
  y_max = nice_ceiling(max([max(v) for _, v, _ in series if len(v)] + [0]))
  group = plot_w / max(len(labels), 1)
  bar = group * 0.8 / len(series)
  parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
           f'role="img" aria-label="{text(y_label)} by {text(x_label)}">']
  for frac in (0.0, 0.5, 1.0):
    y = top + plot_h * (1 - frac)
    parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                 f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
                 f'{text(y_format(y_max * frac))}</text>')
  for s, (name, values, colour) in enumerate(series):
    colours = colour if isinstance(colour, (list, tuple)) else [colour] * len(values)
    for i, value in enumerate(values):
      h = plot_h * value / y_max
      x = left + i * group + group * 0.1 + s * bar
      parts.append(f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                   f'fill="{colours[i]}"><title>{text(name)}, {text(labels[i])}: '
                   f'{text(y_format(value))}</title></rect>')
  step = max(1, math.ceil(len(labels) / 11))
  parts += [f'<text x="{left + (i + 0.5) * group:.1f}" y="{top + plot_h + 15}" text-anchor="middle">'
            f'{text(label)}</text>' for i, label in enumerate(labels) if i % step == 0]
  middle, base = top + plot_h / 2, top + plot_h
  parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 8}" text-anchor="middle" class="axis">'
               f'{text(x_label)}</text><text x="14" y="{middle:.1f}" text-anchor="middle" class="axis" '
               f'transform="rotate(-90 14 {middle:.1f})">{text(y_label)}</text>'
               f'<line x1="{left}" x2="{width - right}" y1="{base}" y2="{base}" class="axisline"/>')
  if marker:
    x = left + marker[0] * group
    parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top - 6}" y2="{top + plot_h}" class="marker"/>'
                 f'<text x="{x + 4:.1f}" y="{top - 8}" class="axis">{text(marker[1])}</text>')
  if legend is None and len(series) > 1:
    legend = [(name, colour) for name, _, colour in series]
  x = left
  for entry, colour in legend or []:
    parts.append(f'<rect x="{x}" y="6" width="10" height="10" fill="{colour}"/>'
                 f'<text x="{x + 14}" y="15">{text(entry)}</text>')
    x += 24 + 6.5 * len(entry)
  return ''.join(parts) + '</svg>'


def nice_ceiling(value: float) -> float:
  """The smallest of 1, 2, 2.5, 5 times a power of ten that is >= value: a round top for an axis."""
  if value <= 0:
    return 1.0
  power = 10.0 ** math.floor(math.log10(value))
  return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= value * (1 - 1e-9))

def page(title: str, body: Sequence[str]) -> str:
  return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
          '<meta name="viewport" content="width=device-width, initial-scale=1">'
          f'<title>{text(title)}</title><style>\n{_css()}</style></head>'
          f'<body><main>{"".join(body)}</main></body></html>\n')



@functools.cache
def _css() -> str:
  return importlib.resources.files('capjax.evaluation').joinpath('static', 'report.css').read_text('utf-8')
