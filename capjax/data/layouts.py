"""Readers for the caption-dataset layouts users download and unpack by hand.

Three layouts are understood (see `read_records`):

* ``flickr8k_original``: the Flickr8k zips as first distributed: ``Flicker8k_Dataset/*.jpg`` (sic) plus
  ``Flickr8k_text/Flickr8k.token.txt`` and the ``Flickr_8k.{train,dev,test}Images.txt`` split lists (the text
  files may also sit directly in the manual dir). ``dev`` becomes ``validation``. Images that are in none of
  the three split lists are skipped and reported (reason ``no_split``), as every published Flickr8k result
  uses only the 8000 listed images.
* ``kaggle_csv``: ``Images/*.jpg`` plus ``captions.txt`` (CSV, header ``image,caption``), the form Flickr8k
  and Flickr30k are re-published in on Kaggle. It carries no split, so one is made deterministically: image
  names are sorted; if the official Flickr8k split lists are found anywhere under the manual dir (and the
  dataset is not known to be something else) they decide the split; otherwise the sorted names are shuffled
  with ``random.Random(KAGGLE_SPLIT_SEED)`` and cut 75% / 12.5% / 12.5% (the 6000/1000/1000 Flickr8k
  proportions) into train / validation / test, with validation and test taken first from the shuffled list.
* ``karpathy_json``: Karpathy's ``dataset_{flickr8k,flickr30k,coco}.json`` plus the images. ``val`` becomes
  ``validation`` and ``restval`` becomes ``train`` (the usual "Karpathy split" practice: restval images are
  training data). ``raw`` captions are used, falling back to joined ``tokens``.

Problems found in real downloads never crash the reader and are never dropped silently: each is either
repaired (and noted in `ReadReport.notes`) or skipped with a reason in `ReadReport.skipped`.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import os
import pathlib
import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence

SPLITS = ('train', 'validation', 'test')

KARPATHY_JSON = 'karpathy_json'
FLICKR8K_ORIGINAL = 'flickr8k_original'
KAGGLE_CSV = 'kaggle_csv'
# Auto-detection prefers earlier entries when several layouts are present.
LAYOUTS = (KARPATHY_JSON, FLICKR8K_ORIGINAL, KAGGLE_CSV)

DATASETS = ('flickr8k', 'flickr30k', 'coco')

# Reasons an item is skipped.
MISSING_FILE = 'missing_file'
BAD_IMAGE = 'bad_image'
MALFORMED_LINE = 'malformed_line'
NO_SPLIT = 'no_split'
NO_CAPTIONS = 'no_captions'
UNSAFE_PATH = 'unsafe_path'
OUTSIDE_MANUAL_DIR = 'outside_manual_dir'

KAGGLE_SPLIT_SEED = 8
_VALIDATION_FRACTION = 1 / 8
_TEST_FRACTION = 1 / 8

_TOKEN_FILE = 'Flickr8k.token.txt'
_TEXT_DIR = 'Flickr8k_text'
_SPLIT_FILES = {
    'train': 'Flickr_8k.trainImages.txt',
    'validation': 'Flickr_8k.devImages.txt',
    'test': 'Flickr_8k.testImages.txt',
}
_KAGGLE_CAPTIONS = 'captions.txt'
_KARPATHY_DIRS = ('.', 'caption_datasets')
_KARPATHY_SPLITS = {
    'train': 'train',
    'restval': 'train',
    'val': 'validation',
    'test': 'test',
}
# Folders searched for images, in order; '.' is the manual dir itself.
_FLICKR_IMAGE_DIRS = (
    'Flicker8k_Dataset',
    'Flickr8k_Dataset',
    'Flickr8k_Dataset/Flicker8k_Dataset',
    'Images',
    'flickr30k-images',
    'flickr30k_images',
    'images',
    '.',
)
# Kaggle's zips unpack to Images/; prefer it if another layout is unpacked too.
_KAGGLE_IMAGE_DIRS = ('Images', 'images') + tuple(
    d for d in _FLICKR_IMAGE_DIRS if d not in ('Images', 'images'))
# COCO entries carry their own folder ('val2014/...'); these are its parents.
_COCO_IMAGE_ROOTS = ('.', 'images')

# The real Flickr8k token file names '2258277193_586949ec62.jpg.1', whose file
# on disk is '2258277193_586949ec62.jpg': a copy counter glued to the name.
_COPY_SUFFIX = re.compile(r'(.+)\.\d+')
_CAPTION_INDEX = re.compile(r'#\d+$')


@dataclasses.dataclass(frozen=True)
class CaptionRecord:
  """One image and all of its captions."""

  image_id: str
  image_path: str
  captions: tuple[str, ...]
  split: str


@dataclasses.dataclass(frozen=True)
class SkippedItem:
  """Something left out of the dataset, and why."""

  reason: str
  name: str
  detail: str = ''


@dataclasses.dataclass
class ReadReport:
  """What was read, what was repaired, and what was skipped (with reasons)."""

  manual_dir: str = ''
  layout: str = ''
  images: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
  captions: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
  skipped: list[SkippedItem] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)

  def skip(self, reason: str, name: str, detail: str = '') -> None:
    self.skipped.append(SkippedItem(reason, name, detail))

  def skipped_for(self, reason: str) -> list[SkippedItem]:
    return [item for item in self.skipped if item.reason == reason]

  @property
  def missing_files(self) -> list[SkippedItem]:
    return self.skipped_for(MISSING_FILE)

  def count(self, record: CaptionRecord) -> None:
    self.images[record.split] += 1
    self.captions[record.split] += len(record.captions)

  def drop(self, record: CaptionRecord, reason: str, detail: str) -> None:
    """Un-counts a record that turned out unusable after it was counted."""
    self.images[record.split] -= 1
    self.captions[record.split] -= len(record.captions)
    self.skip(reason, record.image_id, detail)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, data: Mapping) -> ReadReport:
    return cls(
        manual_dir=data.get('manual_dir', ''),
        layout=data.get('layout', ''),
        images=dict(data.get('images', {})),
        captions=dict(data.get('captions', {})),
        skipped=[SkippedItem(**item) for item in data.get('skipped', [])],
        notes=list(data.get('notes', [])),
    )

  def summary(self, max_listed: int = 10) -> str:
    source = f' from {self.manual_dir}' if self.manual_dir else ''
    lines = [f'Layout {self.layout or "?"}{source}']
    for split in self.images:
      lines.append(f'  {split}: {self.images[split]} images, '
                   f'{self.captions.get(split, 0)} captions')
    lines.append(f'Skipped: {len(self.skipped)}')
    by_reason = collections.defaultdict(list)
    for item in self.skipped:
      by_reason[item.reason].append(item)
    for reason, items in by_reason.items():
      lines.append(f'  {reason}: {len(items)}')
      lines.extend(f'    {_describe(item)}' for item in items[:max_listed])
      if len(items) > max_listed:
        lines.append(f'    ... and {len(items) - max_listed} more')
    if self.notes:
      lines.append(f'Repaired or converted: {len(self.notes)}')
      lines.extend(f'  {note}' for note in self.notes[:max_listed])
      if len(self.notes) > max_listed:
        lines.append(f'  ... and {len(self.notes) - max_listed} more')
    return '\n'.join(lines)


def _describe(item: SkippedItem) -> str:
  return f'{item.name}: {item.detail}' if item.detail else item.name


# ---------------------------------------------------------------- layouts ---


def detect_layout(manual_dir: str | os.PathLike, dataset: str | None = None) -> str:
  """Names the layout of `manual_dir` (see module docstring).

  `dataset` ('flickr8k', 'flickr30k', 'coco') narrows which Karpathy JSON counts as a marker. Raises
  ValueError if no layout is recognised.
  """
  root = _existing_dir(manual_dir)
  if _karpathy_json_files(root, dataset):
    return KARPATHY_JSON
  if _find_token_file(root):
    return FLICKR8K_ORIGINAL
  if (root / _KAGGLE_CAPTIONS).is_file():
    return KAGGLE_CSV
  raise ValueError(_unrecognised_message(root, dataset))


def read_records(
    manual_dir: str | os.PathLike,
    layout: str = 'auto',
    *,
    dataset: str | None = None,
) -> tuple[list[CaptionRecord], ReadReport]:
  """Every usable (image, captions, split) of the dataset unpacked in `manual_dir`, sorted by (split,
  image_id), and a report of counts and skips.

  `layout` is 'auto' or one of LAYOUTS (an explicit layout skips detection). `dataset` ('flickr8k',
  'flickr30k' or 'coco'), when known, picks the Karpathy JSON when several are present and keeps the
  Flickr8k split lists from being applied to another dataset."""
  if dataset is not None and dataset not in DATASETS:
    raise ValueError(f'dataset must be one of {DATASETS} or None, got {dataset!r}')
  root = _existing_dir(manual_dir)
  if layout == 'auto':
    layout = detect_layout(root, dataset)
  readers = {
      KARPATHY_JSON: _read_karpathy,
      FLICKR8K_ORIGINAL: _read_flickr8k_original,
      KAGGLE_CSV: _read_kaggle_csv,
  }
  if layout not in readers:
    raise ValueError(f'layout must be "auto" or one of {LAYOUTS}, got {layout!r}')
  report = ReadReport(manual_dir=os.fspath(root), layout=layout)
  records = readers[layout](root, dataset, report)
  records.sort(key=lambda r: (SPLITS.index(r.split), r.image_id))
  for record in records:
    report.count(record)
  return records, report


def _existing_dir(manual_dir: str | os.PathLike) -> pathlib.Path:
  root = pathlib.Path(manual_dir).expanduser()
  if not root.is_dir():
    raise ValueError(f'manual dir {root} does not exist or is not a folder')
  return root


def _unrecognised_message(root: pathlib.Path, dataset: str | None) -> str:
  karpathy = ', '.join(_karpathy_names(dataset))
  entries = sorted(p.name + ('/' if p.is_dir() else '') for p in root.iterdir())
  shown = ', '.join(entries[:10]) or '(empty)'
  more = f' ... ({len(entries)} entries)' if len(entries) > 10 else ''
  return (f'Could not recognise the dataset layout in {root}.\n'
          f'Looked for:\n'
          f'  {KARPATHY_JSON}: {karpathy} (in the folder or caption_datasets/)\n'
          f'  {FLICKR8K_ORIGINAL}: {_TEXT_DIR}/{_TOKEN_FILE} or {_TOKEN_FILE}\n'
          f'  {KAGGLE_CSV}: {_KAGGLE_CAPTIONS}\n'
          f'The folder contains: {shown}{more}')


# Shared assembly -----------------------------------------------------------


class _FileIndex:
  """Answers "which of these folders holds this file?" with one listing per
  folder, which is much faster than a stat per image on big datasets."""

  def __init__(self, roots: Sequence[pathlib.Path], manual_dir: pathlib.Path):
    self.roots = roots
    self.manual_dir = manual_dir.resolve()
    self._listings: dict[pathlib.Path, frozenset[str]] = {}

  def find(self, rel_name: str) -> tuple[pathlib.Path, str] | None:
    """Returns (path, resolved rel_name), trying a stripped copy suffix last."""
    for candidate in _name_candidates(rel_name):
      for root in self.roots:
        path = root / candidate
        if path.name in self._listing(path.parent):
          return path, candidate
    return None

  def _listing(self, folder: pathlib.Path) -> frozenset[str]:
    if folder not in self._listings:
      try:
        names = frozenset(e.name for e in os.scandir(folder) if e.is_file())
      except OSError:
        names = frozenset()
      self._listings[folder] = names
    return self._listings[folder]

  def describe(self) -> str:
    """The folders searched that exist (all of them if none exists)."""
    existing = [r for r in self.roots if r.is_dir()] or self.roots
    return ', '.join(os.fspath(r) for r in existing)


def is_contained(name: str) -> bool:
  """Whether an image name from a captions file stays inside the folder it is looked up in: relative,
  without '..' components (on any platform's separator), so a crafted file cannot pull in other files."""
  parts = re.split(r'[\\/]', name)
  return bool(name) and not name.startswith(('/', '\\', '~')) and ':' not in parts[0] and '..' not in parts


def _name_candidates(name: str) -> list[str]:
  match = _COPY_SUFFIX.fullmatch(name)
  return [name, match.group(1)] if match else [name]


def _resolve_images(
    captions_by_name: Mapping[str, list[str]],
    index: _FileIndex,
    source: str,
    report: ReadReport,
) -> dict[str, tuple[pathlib.Path, list[str]]]:
  """Maps caption-file names to files on disk, merging renamed duplicates."""
  resolved: dict[str, tuple[pathlib.Path, list[str]]] = {}
  for name, captions in captions_by_name.items():
    if not is_contained(name):
      report.skip(UNSAFE_PATH, name, f'{len(captions)} caption(s) in {source} name a file outside the '
                  'dataset folder (absolute path or "..")')
      continue
    found = index.find(name)
    if found is None:
      report.skip(MISSING_FILE, name, f'{len(captions)} caption(s) in {source}, no such image in '
                  f'{index.describe()}')
      continue
    path, image_id = found
    if not path.resolve().is_relative_to(index.manual_dir):  # a symbolic link out of the dataset
      report.skip(OUTSIDE_MANUAL_DIR, name, f'{path} leads to {path.resolve()}, outside the dataset '
                  f'folder {index.manual_dir}')
      continue
    if image_id != name:
      report.notes.append(f'{name} (in {source}) read as {image_id}')
    resolved.setdefault(image_id, (path, []))[1].extend(captions)
  if captions_by_name and not resolved:
    raise ValueError(f'None of the {len(captions_by_name)} images named in {source} were '
                     f'found; looked in {", ".join(os.fspath(r) for r in index.roots)}')
  return resolved


def _make_records(
    resolved: Mapping[str, tuple[pathlib.Path, list[str]]],
    split_of: Mapping[str, str],
    report: ReadReport,
    split_source: str,
) -> list[CaptionRecord]:
  records = []
  for image_id, (path, captions) in resolved.items():
    split = split_of.get(image_id)
    if split is None:
      report.skip(NO_SPLIT, image_id, f'not listed in {split_source}')
      continue
    records.append(CaptionRecord(image_id, os.fspath(path), tuple(captions), split))
  return records


def _read_lines(path: pathlib.Path, report: ReadReport) -> Iterator[tuple[int, str]]:
  """Yields (line number, text) of non-blank lines, whatever the line ends."""
  text = path.read_bytes().decode('utf-8-sig', errors='replace')
  if '\ufffd' in text:
    report.notes.append(f'{path.name}: bytes that are not UTF-8 were replaced '
                        'by U+FFFD')
  # Not str.splitlines(): it would also split captions at U+2028, \x85, etc.
  for lineno, line in enumerate(text.split('\n'), start=1):
    line = line.rstrip('\r')
    if line.strip():
      yield lineno, line


# Flickr8k original ---------------------------------------------------------


def _find_token_file(root: pathlib.Path) -> pathlib.Path | None:
  for folder in (root / _TEXT_DIR, root):
    if (folder / _TOKEN_FILE).is_file():
      return folder / _TOKEN_FILE
  return None


def _image_index(root: pathlib.Path, folders: Iterable[str]) -> _FileIndex:
  return _FileIndex([root / f if f != '.' else root for f in folders], root)


def _read_flickr8k_original(root: pathlib.Path, dataset: str | None,
                            report: ReadReport) -> list[CaptionRecord]:
  del dataset  # The layout is Flickr8k's own.
  token_file = _find_token_file(root)
  if token_file is None:
    raise ValueError(f'{FLICKR8K_ORIGINAL}: no {_TOKEN_FILE} in {root} or '
                     f'{root / _TEXT_DIR}')
  captions_by_name = _parse_token_file(token_file, report)
  resolved = _resolve_images(captions_by_name, _image_index(root, _FLICKR_IMAGE_DIRS), token_file.name,
                             report)
  split_files = _find_split_files([token_file.parent])
  if split_files is None:
    raise ValueError(f'{FLICKR8K_ORIGINAL}: split lists '
                     f'{sorted(_SPLIT_FILES.values())} not found next to {token_file}')
  split_of = _read_split_files(split_files, resolved, report)
  return _make_records(resolved, split_of, report, 'the Flickr_8k.*Images.txt lists')


def _parse_token_file(path: pathlib.Path, report: ReadReport) -> dict[str, list[str]]:
  captions_by_name: dict[str, list[str]] = {}
  for lineno, line in _read_lines(path, report):
    name, tab, caption = line.partition('\t')
    name = _CAPTION_INDEX.sub('', name.strip())
    caption = caption.strip()
    where = f'{path.name}:{lineno}'
    if not tab:
      report.skip(MALFORMED_LINE, where, f'no tab between image and caption: {line[:80]!r}')
    elif not name or not caption:
      report.skip(MALFORMED_LINE, where, f'empty image name or caption: {line[:80]!r}')
    else:
      captions_by_name.setdefault(name, []).append(caption)
  return captions_by_name


def _find_split_files(folders: Iterable[pathlib.Path]) -> dict[str, pathlib.Path] | None:
  for folder in folders:
    paths = {split: folder / name for split, name in _SPLIT_FILES.items()}
    if all(p.is_file() for p in paths.values()):
      return paths
  return None


def _read_split_files(
    split_files: Mapping[str, pathlib.Path],
    resolved: Mapping[str, object],
    report: ReadReport,
) -> dict[str, str]:
  """Maps image ids to splits, reporting listed images that have no captions."""
  split_of: dict[str, str] = {}
  already_reported = {item.name for item in report.missing_files}
  for split, path in split_files.items():
    for _, line in _read_lines(path, report):
      listed = line.strip()
      image_id = next((c for c in _name_candidates(listed) if c in resolved), None)
      if image_id is None and listed in already_reported:
        continue
      if image_id is None:
        report.skip(NO_CAPTIONS, listed, f'listed in {path.name} but has no captions')
      elif image_id in split_of:
        report.notes.append(f'{listed} is listed for both {split_of[image_id]} '
                            f'and {split} ({path.name}); kept in {split_of[image_id]}')
      else:
        split_of[image_id] = split
  return split_of


# Kaggle CSV ----------------------------------------------------------------


def _read_kaggle_csv(root: pathlib.Path, dataset: str | None, report: ReadReport) -> list[CaptionRecord]:
  csv_path = root / _KAGGLE_CAPTIONS
  if not csv_path.is_file():
    raise ValueError(f'{KAGGLE_CSV}: no {_KAGGLE_CAPTIONS} in {root}')
  captions_by_name = _parse_captions_csv(csv_path, report)
  resolved = _resolve_images(captions_by_name, _image_index(root, _KAGGLE_IMAGE_DIRS), csv_path.name, report)
  split_files = None
  if dataset in (None, 'flickr8k'):
    split_files = _find_split_files(_folders_below(root))
  if split_files is not None:
    report.notes.append('split taken from the official Flickr8k lists in '
                        f'{split_files["train"].parent}')
    split_of = _read_split_files(split_files, resolved, report)
    return _make_records(resolved, split_of, report, 'the Flickr_8k.*Images.txt lists')
  report.notes.append(f'no official split lists found: seeded split '
                      f'(seed {KAGGLE_SPLIT_SEED}) of {len(resolved)} images')
  return _make_records(resolved, seeded_split(resolved), report, 'the seeded split')


def _parse_captions_csv(path: pathlib.Path, report: ReadReport) -> dict[str, list[str]]:
  text = path.read_bytes().decode('utf-8-sig', errors='replace')
  if '\ufffd' in text:
    report.notes.append(f'{path.name}: bytes that are not UTF-8 were replaced '
                        'by U+FFFD')
  captions_by_name: dict[str, list[str]] = {}
  rows = csv.reader(io.StringIO(text, newline=''))
  for row in rows:
    where = f'{path.name}:{rows.line_num}'
    if not any(cell.strip() for cell in row):
      continue
    if [cell.strip().lower() for cell in row] == ['image', 'caption']:
      continue
    if len(row) < 2:
      report.skip(MALFORMED_LINE, where, f'expected "image,caption": {row!r:.80}')
      continue
    name = row[0].strip()
    # An unquoted comma inside a caption splits it into extra cells.
    caption = ','.join(row[1:]).strip()
    if not name or not caption:
      report.skip(MALFORMED_LINE, where, f'empty image name or caption: {row!r:.80}')
      continue
    if len(row) > 2:
      report.notes.append(f'{where}: caption with unquoted commas re-joined')
    captions_by_name.setdefault(name, []).append(caption)
  return captions_by_name


def _folders_below(root: pathlib.Path) -> Iterator[pathlib.Path]:
  """Walks folders top-down, not descending into big image folders."""
  image_dirs = {name for name in _FLICKR_IMAGE_DIRS if name != '.'}
  for folder, subfolders, _ in os.walk(root):
    subfolders[:] = sorted(d for d in subfolders if d not in image_dirs)
    yield pathlib.Path(folder)


def seeded_split(image_ids: Iterable[str], seed: int = KAGGLE_SPLIT_SEED) -> dict[str, str]:
  """Splits ids 75/12.5/12.5 into train/validation/test, independent of order."""
  ids = sorted(image_ids)
  random.Random(seed).shuffle(ids)
  num_validation = round(len(ids) * _VALIDATION_FRACTION)
  num_test = round(len(ids) * _TEST_FRACTION)
  split_of = {}
  for position, image_id in enumerate(ids):
    if position < num_validation:
      split_of[image_id] = 'validation'
    elif position < num_validation + num_test:
      split_of[image_id] = 'test'
    else:
      split_of[image_id] = 'train'
  return split_of


# Karpathy JSON -------------------------------------------------------------


def _karpathy_names(dataset: str | None) -> list[str]:
  return [f'dataset_{d}.json' for d in ([dataset] if dataset else DATASETS)]


def _karpathy_json_files(root: pathlib.Path, dataset: str | None) -> list[pathlib.Path]:
  found = []
  for folder in _KARPATHY_DIRS:
    for name in _karpathy_names(dataset):
      path = root / folder / name
      if path.is_file():
        found.append(path)
  return found


def _read_karpathy(root: pathlib.Path, dataset: str | None, report: ReadReport) -> list[CaptionRecord]:
  json_path = _pick_karpathy_json(root, dataset)
  with json_path.open('rb') as f:
    data = json.loads(f.read().decode('utf-8-sig'))
  entries = data.get('images') if isinstance(data, dict) else None
  if not isinstance(entries, list):
    raise ValueError(f'{json_path}: expected {{"images": [...]}}')
  captions_by_name, split_by_name = _parse_karpathy_entries(entries, json_path.name, report)
  is_coco = any('/' in name for name in captions_by_name)
  folders = _COCO_IMAGE_ROOTS if is_coco else _FLICKR_IMAGE_DIRS
  resolved = _resolve_images(captions_by_name, _image_index(root, folders), json_path.name, report)
  split_of = {}
  for name, split in split_by_name.items():
    for candidate in _name_candidates(name):
      split_of.setdefault(candidate, split)
  return _make_records(resolved, split_of, report, json_path.name)


def _pick_karpathy_json(root: pathlib.Path, dataset: str | None) -> pathlib.Path:
  found = _karpathy_json_files(root, dataset)
  if not found:
    raise ValueError(f'{KARPATHY_JSON}: none of {_karpathy_names(dataset)} in {root}')
  if len({p.name for p in found}) > 1:
    raise ValueError(f'several Karpathy files in {root} '
                     f'({", ".join(p.name for p in found)}): pass dataset= to '
                     'say which to read')
  return found[0]


def _parse_karpathy_entries(
    entries: list,
    source: str,
    report: ReadReport,
) -> tuple[dict[str, list[str]], dict[str, str]]:
  captions_by_name: dict[str, list[str]] = {}
  split_by_name: dict[str, str] = {}
  for position, entry in enumerate(entries):
    where = f'{source} images[{position}]'
    filename = entry.get('filename') if isinstance(entry, dict) else None
    if not filename:
      report.skip(MALFORMED_LINE, where, 'entry without "filename"')
      continue
    filepath = entry.get('filepath') or ''
    name = f'{filepath}/{filename}' if filepath else filename
    split = _KARPATHY_SPLITS.get(entry.get('split'))
    if split is None:
      report.skip(MALFORMED_LINE, f'{where} {name}', f'unknown split {entry.get("split")!r}')
      continue
    captions = _karpathy_captions(entry.get('sentences') or [], f'{where} {name}', report)
    if not captions:
      report.skip(NO_CAPTIONS, name, f'no usable sentences in {source}')
      continue
    captions_by_name.setdefault(name, []).extend(captions)
    split_by_name.setdefault(name, split)
  return captions_by_name, split_by_name


def _karpathy_captions(sentences: list, where: str, report: ReadReport) -> list[str]:
  captions = []
  for k, sentence in enumerate(sentences):
    caption = ''
    if isinstance(sentence, dict):
      caption = (sentence.get('raw') or '').strip()
      if not caption and sentence.get('tokens'):
        caption = ' '.join(str(t) for t in sentence['tokens']).strip()
    if caption:
      captions.append(caption)
    else:
      report.skip(MALFORMED_LINE, f'{where} sentences[{k}]', 'sentence without "raw" or "tokens"')
  return captions


def records_by_split(records: Iterable[CaptionRecord]) -> dict[str, list[CaptionRecord]]:
  grouped: dict[str, list[CaptionRecord]] = {split: [] for split in SPLITS}
  for record in records:
    grouped[record.split].append(record)
  return grouped
