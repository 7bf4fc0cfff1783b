"""The demo's content score: does a caption name the objects that are really in the picture?

BLEU and CIDEr reward captions that sound like the references; on the demo data they stay high when the
caption names the wrong shape ("a red triangle" for a red square). The shapes dataset stores each
image's ground truth (every object's colour, shape, size, position and box, see `capjax/data/shapes.py`),
so a caption can be checked directly:

- A caption is read as a list of mentions: each shape word, with the colour word nearest before it (within
  three words, not past another shape) or, for "the circle ... is red", the first colour after it; and
  the first position word after it before the next shape ("a red circle on the left ...").
- objects right: the mentioned (colour, shape) pairs are exactly the true ones, as multisets (nothing
  missing, nothing extra, nothing wrong). colours right / shapes right: the same for colours and for
  shapes alone.
- positions right: at least one position is claimed and every claimed position is the true position of
  the object the mention refers to; positions wrong: some claimed position is false. A mention refers
  to the object with its colour and shape, else to the only object of its colour, else to the only
  object of its shape (so a wrong shape word does not count as a wrong position too); a claim about no
  identifiable object is not checked. Captions that claim no checkable position are neither.
- pointing (attention models): for each generated colour or shape word, whether the peak cell of the
  word's attention map overlaps the box of the object the word belongs to; reported with the rate a
  peak in a random cell would get.
"""

from collections import Counter
from collections.abc import Sequence
import dataclasses

import numpy as np

from capjax import vocab as vocab_lib
from capjax.data import shapes

COLOURS = tuple(shapes.COLOURS)
SHAPE_WORDS = shapes.SHAPES
POSITION_WORDS = tuple(shapes.POSITIONS)
_COLOUR_WINDOW = 3
# The words a demo caption's content hangs on, by kind: the validation loss is reported per class
# (train.py) to show which of them a model has not learnt yet.
WORD_CLASSES = {'colour': COLOURS, 'shape': SHAPE_WORDS, 'size': tuple(shapes.SIZES),
                'position': POSITION_WORDS}


@dataclasses.dataclass(frozen=True)
class Mention:
  shape: str
  colour: str | None
  position: str | None
  shape_index: int  # word positions in the caption (for pointing)
  colour_index: int | None


def parse_caption(caption: str) -> list[Mention]:
  """The objects a caption names, in order (see the module docstring for the reading rules)."""
  words = vocab_lib.tokenize(caption)
  shape_at = [i for i, w in enumerate(words) if w in SHAPE_WORDS]
  mentions = []
  for k, i in enumerate(shape_at):
    previous_shape = shape_at[k - 1] if k else -1
    next_shape = shape_at[k + 1] if k + 1 < len(shape_at) else len(words)
    colour_index = next((j for j in range(i - 1, max(i - 1 - _COLOUR_WINDOW, previous_shape), -1)
                         if words[j] in COLOURS), None)
    if colour_index is None:
      colour_index = next((j for j in range(i + 1, next_shape) if words[j] in COLOURS), None)
    position = next((words[j] for j in range(i + 1, next_shape) if words[j] in POSITION_WORDS), None)
    mentions.append(Mention(words[i], words[colour_index] if colour_index is not None else None, position,
                            i, colour_index))
  return mentions


def score_caption(caption: str, objects: Sequence[dict]) -> dict[str, bool]:
  """Per-image verdicts: objects/colours/shapes right, positions right/wrong (module docstring)."""
  mentions = parse_caption(caption)
  truth_pairs = Counter((o['colour'], o['shape']) for o in objects)
  checked = [(m, referents(m, objects)) for m in mentions if m.position is not None]
  position_ok = [m.position in {o['position'] for o in found} for m, found in checked if found]
  return {
      'objects_right': Counter((m.colour, m.shape) for m in mentions) == truth_pairs,
      'colours_right': Counter(m.colour for m in mentions) == Counter(o['colour'] for o in objects),
      'shapes_right': Counter(m.shape for m in mentions) == Counter(o['shape'] for o in objects),
      'positions_right': bool(position_ok) and all(position_ok),
      'positions_wrong': not all(position_ok),
  }


def referents(mention: Mention, objects: Sequence[dict]) -> list[dict]:
  """The objects a mention means (the same object may be drawn twice); [] when it cannot be told."""
  for matches in ([o for o in objects if (o['colour'], o['shape']) == (mention.colour, mention.shape)],
                  [o for o in objects if o['colour'] == mention.colour],
                  [o for o in objects if o['shape'] == mention.shape]):
    if matches and (len(matches) == 1 or all(matches[0]['colour'] == o['colour'] and
                                             matches[0]['shape'] == o['shape'] for o in matches)):
      return matches
  return []


@dataclasses.dataclass(frozen=True)
class Rates:
  """Over `images` images, the share whose caption gets each verdict (module docstring)."""
  images: int
  objects_right: float
  colours_right: float
  shapes_right: float
  positions_right: float
  positions_wrong: float


@dataclasses.dataclass(frozen=True)
class Pointing:
  """Attention models: of `words_checked` colour/shape words, the share whose peak attention cell overlaps
  their object (`rate`), and the share a peak in a uniformly random cell would get (`chance`); both None
  when no word could be checked. Of `two_object_captions` (captions of two-object images that name both
  objects), the share whose two shape words peak in different cells, each on its own object
  (`separated`): a decoder that moves its attention from object to object."""
  rate: float | None
  chance: float | None
  words_checked: int
  separated: float | None = None
  two_object_captions: int = 0


@dataclasses.dataclass(frozen=True)
class ContentScore(Rates):
  """`content_score`'s result: the rates over all images, by object count ('1 object', '2 objects'),
  what each true (size, shape) is called (`shape_confusion`), and pointing for attention models."""
  by_object_count: dict[str, Rates]
  shape_confusion: dict[str, dict[str, int]]
  pointing: Pointing | None = None

  def as_dict(self) -> dict:
    """The JSON form (the evaluation record's 'content'): the rates, 'by_object_count',
    'shape_confusion', and with pointing 'pointing', 'pointing_chance', 'pointing_words_checked'."""
    result = dataclasses.asdict(Rates(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Rates)}))
    result['by_object_count'] = {k: dataclasses.asdict(v) for k, v in self.by_object_count.items()}
    result['shape_confusion'] = self.shape_confusion
    if self.pointing is not None:
      result.update(pointing=self.pointing.rate, pointing_chance=self.pointing.chance,
                    pointing_words_checked=self.pointing.words_checked,
                    pointing_separated=self.pointing.separated,
                    pointing_two_object_captions=self.pointing.two_object_captions)
    return result


def content_score(captions: Sequence[str], objects_per_image: Sequence[Sequence[dict]]) -> ContentScore:
  """Rates over images of each verdict, overall and by the number of objects in the image."""
  if len(captions) != len(objects_per_image):
    raise ValueError(f'{len(captions)} captions for {len(objects_per_image)} images')
  verdicts = [score_caption(c, o) for c, o in zip(captions, objects_per_image)]
  by_count = {}
  for count in sorted({len(o) for o in objects_per_image}):
    chosen = [v for v, o in zip(verdicts, objects_per_image) if len(o) == count]
    by_count[f'{count} object{"s" if count > 1 else ""}'] = _rates(chosen)
  return ContentScore(**dataclasses.asdict(_rates(verdicts)), by_object_count=by_count,
                      shape_confusion=shape_confusion(captions, objects_per_image))


def pointing_score(words_per_caption: Sequence[Sequence[str]], attention: Sequence[np.ndarray],
                   objects_per_image: Sequence[Sequence[dict]]) -> Pointing:
  """`pointing` summed over captions; attention[i] is caption i's maps, (len(words), rows, cols)."""
  hits = checked = 0
  chance = 0.0
  separations = []
  for words, alphas, objects in zip(words_per_caption, attention, objects_per_image):
    alphas = np.asarray(alphas)
    flat = alphas.reshape(len(alphas), -1)
    h, c, p = pointing(words, flat, alphas.shape[1:], objects)
    hits, checked, chance = hits + h, checked + c, chance + p
    verdict = separated(words, flat, alphas.shape[1:], objects)
    if verdict is not None:
      separations.append(verdict)
  return Pointing(rate=hits / checked if checked else None, chance=chance / checked if checked else None,
                  words_checked=checked,
                  separated=float(np.mean(separations)) if separations else None,
                  two_object_captions=len(separations))


def named_pair(words: Sequence[str], steps: int,
               objects: Sequence[dict]) -> list[tuple[Mention, dict]] | None:
  """For a two-object image whose caption names both objects (two mentions whose shape word is among
  the first `steps` words, each meaning exactly one object, not the same): [(mention, its object)] in
  caption order. None when the image or the caption is not of that kind."""
  if len(objects) != 2:
    return None
  mentions = [m for m in parse_caption(' '.join(words)) if m.shape_index < steps]
  found = [referents(m, objects) for m in mentions]
  named = [(m, r[0]) for m, r in zip(mentions, found) if len(r) == 1]
  if len(named) != 2 or named[0][1] is named[1][1]:
    return None
  return named


def separated(words: Sequence[str], alphas: np.ndarray, grid: tuple[int, int],
              objects: Sequence[dict]) -> bool | None:
  """For a two-object image whose caption names both objects (`named_pair`): whether the two shape
  words' peak cells differ and each overlaps its own object's box. None when the caption is not of
  that kind."""
  named = named_pair(words, len(alphas), objects)
  if named is None:
    return None
  rows, cols = grid
  peaks = [int(np.argmax(alphas[m.shape_index])) for m, _ in named]
  on_own = all(cells_overlapping(o['box'], rows, cols)[peak] for (_, o), peak in zip(named, peaks))
  return peaks[0] != peaks[1] and bool(on_own)


def shape_confusion(captions: Sequence[str], objects_per_image: Sequence[Sequence[dict]]) -> dict:
  """{'<size> <true shape>': {named shape or 'none': count}} over the objects whose colour is unique in
  their image (so the mention that means them is known: the caption's mention of that colour). Shows
  what a model reads shape from: e.g. 'big' objects called squares and 'small' ones triangles is a model
  that names shape by how much colour it sees, not by its outline."""
  table: dict[str, Counter] = {}
  for caption, objects in zip(captions, objects_per_image):
    mentions = parse_caption(caption)
    colours = Counter(o['colour'] for o in objects)
    for o in objects:
      if colours[o['colour']] != 1:
        continue
      named = [m.shape for m in mentions if m.colour == o['colour']]
      table.setdefault(f"{o['size']} {o['shape']}", Counter())[named[0] if named else 'none'] += 1
  return {key: dict(sorted(counts.items())) for key, counts in sorted(table.items())}


def _rates(verdicts: list[dict]) -> Rates:
  rate = lambda key: float(np.mean([v[key] for v in verdicts])) if verdicts else float('nan')  # noqa: E731
  return Rates(len(verdicts), *(rate(f.name) for f in dataclasses.fields(Rates)[1:]))


def pointing(words: Sequence[str], alphas: np.ndarray, grid: tuple[int, int],
             objects: Sequence[dict], word_classes: Sequence[str] = ('shape', 'colour')
             ) -> tuple[int, int, float]:
  """(hits, checked, hits expected by chance) for one generated caption: for each colour/shape word of a
  mention whose object is in the image, does the peak cell of that word's attention map (alphas[t] over
  the grid, row-major, t = the word's position) overlap the object's box (fractions of the image,
  [x0, y0, x1, y1])? The cell is the map's unit of resolution: on a coarse grid (2x2 at 64 px) a cell's
  centre rarely lies inside a small object even when the model looks at the right quarter. By chance
  (a peak in a uniformly random cell) a word hits with probability (cells overlapping the box) / cells,
  summed here as the third number, so a rate can be read against what a blind model would score.
  `word_classes`: which words of a mention are checked ('shape', 'colour', or both)."""
  mentions = parse_caption(' '.join(words))
  boxes = {}  # (colour, shape) -> boxes: the same object may be drawn twice
  for o in objects:
    boxes.setdefault((o['colour'], o['shape']), []).append(o['box'])
  rows, cols = grid
  hits = checked = 0
  chance = 0.0
  for mention in mentions:
    candidates = boxes.get((mention.colour, mention.shape))
    if not candidates:
      continue
    overlapping = np.zeros(rows * cols, bool)
    for box in candidates:
      overlapping |= cells_overlapping(box, rows, cols)
    indices = {'shape': mention.shape_index, 'colour': mention.colour_index}
    for index in (indices[word_class] for word_class in word_classes):
      if index is None or index >= len(alphas):
        continue
      hits += bool(overlapping[int(np.argmax(alphas[index]))])
      checked += 1
      chance += float(overlapping.mean())
  return hits, checked, chance


def cells_overlapping(box: Sequence[float], rows: int, cols: int) -> np.ndarray:
  """(rows * cols,) bool, row-major: which grid cells share some area with `box` (touching is not enough)."""
  x0, y0, x1, y1 = box
  row_edges, col_edges = np.arange(rows + 1) / rows, np.arange(cols + 1) / cols
  in_rows = (row_edges[:-1] < y1) & (row_edges[1:] > y0)
  in_cols = (col_edges[:-1] < x1) & (col_edges[1:] > x0)
  return (in_rows[:, None] & in_cols[None, :]).reshape(-1)
