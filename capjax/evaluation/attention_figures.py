"""Word-by-word attention figures: for each generated word, where in the image the decoder looked.

The attention decoder's weights live on a coarse grid (the trunk's 7x7 at 224 px, or
config.model.attention_grid). `upsample` spreads them smoothly over the image (bicubic, as the Show,
Attend and Tell figures do) and `save_attention_figure` draws the familiar strip: the image, then one
panel per word with its map over the image.
"""

import math

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

PANELS_PER_ROW = 6


def upsample(weights: np.ndarray, size: int) -> np.ndarray:
  """(g, g) weights -> (size, size) float32 map in [0, 1] (scaled by its maximum, for display)."""
  grid = np.asarray(weights, np.float32)
  smooth = np.asarray(Image.fromarray(grid, mode='F').resize((size, size), Image.Resampling.BICUBIC))
  smooth = np.clip(smooth, 0.0, None)
  return smooth / max(float(smooth.max()), 1e-12)


def peak_cell(weights: np.ndarray) -> tuple[int, int]:
  """(row, column) of the grid cell with the largest weight."""
  row, column = np.unravel_index(int(np.argmax(weights)), np.shape(weights))
  return int(row), int(column)


def save_attention_figure(image: np.ndarray, words: list[str], attention: np.ndarray, path: str, *,
                          title: str | None = None, panel_inches: float = 1.7) -> None:
  """One PNG: the image, then each word over its upsampled attention map. image uint8 (S, S, 3);
  attention (len(words), g, g)."""
  if len(words) != len(attention):
    raise ValueError(f'{len(words)} words but {len(attention)} attention maps')
  panels = 1 + len(words)
  columns = min(PANELS_PER_ROW, panels)
  rows = math.ceil(panels / columns)
  fig = Figure(figsize=(panel_inches * columns, panel_inches * rows + (0.3 if title else 0)))
  axes = fig.subplots(rows, columns, squeeze=False)
  for ax in axes.flat:
    ax.axis('off')
  size = image.shape[0]
  axes.flat[0].imshow(image)
  axes.flat[0].set_title('image', fontsize=9)
  for ax, word, weights in zip(axes.flat[1:], words, attention):
    ax.imshow(image)
    ax.imshow(upsample(weights, size), cmap='gray', alpha=0.6, vmin=0.0, vmax=1.0)
    ax.set_title(word, fontsize=10)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
