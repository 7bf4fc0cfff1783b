"""Writes tiny caption datasets in each supported on-disk layout, with the
quirks found in the real downloads, and says what a reader should make of them.

Each `make_*` function returns a `Fixture` whose fields state the expected
outcome, so tests compare against facts written next to the data.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import pathlib

import numpy as np
from PIL import Image

IMAGE_SIZE = (24, 20)
NON_ASCII_CAPTION = 'Un café près de la tour — naïve señor 狗在草地上跑'
QUOTED_CAPTION = 'A dog, named "Rex", jumps'


@dataclasses.dataclass
class Fixture:
  root: pathlib.Path
  # image_id -> split, for every image that should come out of read_records.
  splits: dict[str, str]
  # image_id -> captions, for a few images worth checking exactly.
  captions: dict[str, tuple[str, ...]]
  # reason -> names skipped for it by read_records(verify_images=False).
  skipped: dict[str, set[str]]
  # Images that decode badly: skipped as 'bad_image' once images are decoded.
  bad_images: set[str]
  # Images stored converted (not baseline RGB JPEG).
  converted: set[str]

  def split_sizes(self, *, without_bad: bool = False) -> dict[str, int]:
    sizes = {'train': 0, 'validation': 0, 'test': 0}
    for image_id, split in self.splits.items():
      if not (without_bad and image_id in self.bad_images):
        sizes[split] += 1
    return sizes


# ----------------------------------------------------------------- images ---


def _pixels(seed: int) -> np.ndarray:
  # Noise, so that JPEG scan data is long enough for truncation to bite.
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, size=(IMAGE_SIZE[1], IMAGE_SIZE[0], 3), dtype=np.uint8)


def rgb_image(seed: int) -> Image.Image:
  return Image.fromarray(_pixels(seed), 'RGB')


def jpeg_bytes(img: Image.Image, **save_kwargs) -> bytes:
  out = io.BytesIO()
  img.save(out, format='JPEG', quality=90, **save_kwargs)
  return out.getvalue()


def png_bytes(img: Image.Image) -> bytes:
  out = io.BytesIO()
  img.save(out, format='PNG')
  return out.getvalue()


def image_file_bytes(kind: str, seed: int) -> bytes:
  """Bytes of a '.jpg' file of the given kind."""
  img = rgb_image(seed)
  if kind == 'rgb':
    return jpeg_bytes(img)
  if kind == 'gray':
    return jpeg_bytes(img.convert('L'))
  if kind == 'cmyk':
    return jpeg_bytes(img.convert('CMYK'))
  if kind == 'progressive':
    return jpeg_bytes(img, progressive=True)
  if kind == 'png':
    return png_bytes(img)
  if kind == 'palette_alpha':
    palette = img.convert('P', palette=Image.Palette.ADAPTIVE, colors=8)
    palette.info['transparency'] = 0
    return png_bytes(palette)
  if kind == 'rgba':  # alpha varies over the picture
    alpha = Image.fromarray((_pixels(seed + 1)[..., 0] // 2 * 2).astype(np.uint8), 'L')
    return png_bytes(Image.merge('RGBA', (*img.split(), alpha)))
  if kind == 'la':
    alpha = Image.fromarray(_pixels(seed + 1)[..., 0], 'L')
    return png_bytes(Image.merge('LA', (img.convert('L'), alpha)))
  if kind == 'gray16':  # 16-bit grayscale PNG; PIL's convert('RGB') would clip it to white
    return png_bytes(Image.fromarray(_pixels(seed)[..., 0].astype(np.uint16) * 257))
  if kind == 'truncated':
    data = jpeg_bytes(img)
    return data[:len(data) * 2 // 3]
  if kind == 'garbage':
    return b'this is not an image at all'
  raise ValueError(kind)


# Kinds whose pixels are not stored RGB (converted by capjax.images.load_image when read).
CONVERTED_KINDS = ('gray', 'cmyk', 'palette_alpha', 'rgba', 'la', 'gray16')
STORED_RGB_KINDS = ('rgb', 'progressive', 'png')
BAD_KINDS = ('truncated', 'garbage')


def write_images(folder: pathlib.Path, kinds: dict[str, str]) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  for seed, (name, kind) in enumerate(sorted(kinds.items())):
    (folder / name).write_bytes(image_file_bytes(kind, seed))


def _image_names(count: int, prefix: str = '') -> list[str]:
  return [f'{prefix}{1000 + i}_{i:04x}beef.jpg' for i in range(count)]


def _kinds(names: list[str]) -> dict[str, str]:
  """The first names get one quirk each; the rest are plain RGB JPEGs."""
  quirks = ('gray', 'cmyk', 'png', 'truncated', 'palette_alpha')
  return {name: quirks[i] if i < len(quirks) else 'rgb'
          for i, name in enumerate(names)}


def _captions_for(name: str, count: int = 5) -> tuple[str, ...]:
  stem = name.split('_')[0]
  return tuple(f'Picture {stem} shows thing number {k} .' for k in range(count))


def _write_text(path: pathlib.Path, lines: list[str], *, crlf: bool,
                bom: bool = False) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  text = ('\r\n' if crlf else '\n').join(lines) + '\n'
  path.write_bytes((b'\xef\xbb\xbf' if bom else b'') + text.encode('utf-8'))


def _fixture_facts(kinds: dict[str, str]) -> tuple[set[str], set[str]]:
  bad = {n for n, k in kinds.items() if k in BAD_KINDS}
  converted = {n for n, k in kinds.items() if k in CONVERTED_KINDS}
  return bad, converted


# ------------------------------------------------------- flickr8k original ---


def make_flickr8k_original(root: pathlib.Path, *, text_dir: str = 'Flickr8k_text',
                           with_images: bool = True) -> Fixture:
  """14 images + quirks; text files in `text_dir` ('' = directly in root).

  * names[5] is listed as '<name>.1' in the token file (the real quirk);
  * 'ghost.jpg' has captions but no file; 'nocaps.jpg' is a listed file with
    no captions; names[13] has captions but is in no split list;
  * token file: UTF-8 BOM, CRLF, blank lines, a line without a tab, a
    non-ASCII caption; names[3] is a truncated JPEG.
  """
  root.mkdir(parents=True, exist_ok=True)
  names = _image_names(14)
  kinds = _kinds(names)
  if with_images:
    write_images(root / 'Flicker8k_Dataset', dict(kinds, **{'nocaps.jpg': 'rgb'}))
  captions = {name: _captions_for(name) for name in names}
  captions[names[6]] = (NON_ASCII_CAPTION,) + captions[names[6]][1:]
  listed_as = {name: name for name in names}
  listed_as[names[5]] = names[5] + '.1'
  token_lines = ['']
  for name in names:
    token_lines += [f'{listed_as[name]}#{k}\t{c}' for k, c in enumerate(captions[name])]
    token_lines.append('')
  token_lines.insert(7, 'this line has no tab at all')
  token_lines += ['ghost.jpg#0\tA ghost .', 'ghost.jpg#1\tAnother ghost .']
  text = root / text_dir if text_dir else root
  _write_text(text / 'Flickr8k.token.txt', token_lines, crlf=True, bom=True)
  split_of = {name: 'train' for name in names[:9]}
  split_of.update({names[9]: 'validation', names[10]: 'validation',
                   names[11]: 'test', names[12]: 'test'})
  _write_split_lists(text, split_of, extra={'test': ['nocaps.jpg', 'ghost.jpg']})
  bad, converted = _fixture_facts(kinds)
  return Fixture(
      root=root,
      splits=split_of,
      captions={names[6]: captions[names[6]], names[5]: captions[names[5]],
                names[0]: captions[names[0]]},
      skipped={'missing_file': {'ghost.jpg'},
               'malformed_line': {'Flickr8k.token.txt:8'},
               'no_split': {names[13]},
               'no_captions': {'nocaps.jpg'}},
      bad_images=bad,
      converted=converted,
  )


def _write_split_lists(folder: pathlib.Path, split_of: dict[str, str],
                       extra: dict[str, list[str]] | None = None) -> None:
  files = {'train': 'Flickr_8k.trainImages.txt',
           'validation': 'Flickr_8k.devImages.txt',
           'test': 'Flickr_8k.testImages.txt'}
  for split, filename in files.items():
    listed = [n for n, s in sorted(split_of.items()) if s == split]
    listed += (extra or {}).get(split, [])
    _write_text(folder / filename, listed, crlf=True)


# -------------------------------------------------------------- kaggle csv ---


def make_kaggle_csv(root: pathlib.Path, *,
                    split_lists_in: str | None = None) -> Fixture:
  """16 images in Images/ and captions.txt; optionally the official split
  lists somewhere below root (then the 'splits' expectation follows them).

  captions.txt: BOM, CRLF, header, quoted captions with commas and quotes,
  an unquoted comma (re-joined), a one-cell row (malformed), a blank row,
  a missing image, a '.1' name.
  """
  root.mkdir(parents=True, exist_ok=True)
  names = _image_names(16)
  kinds = _kinds(names)
  write_images(root / 'Images', kinds)
  captions = {name: _captions_for(name, 3) for name in names}
  captions[names[7]] = (QUOTED_CAPTION, NON_ASCII_CAPTION, 'A cat, unquoted, naps')
  out = io.StringIO()
  writer = csv.writer(out, lineterminator='\r\n')
  writer.writerow(['image', 'caption'])
  for name in names:
    listed = name + '.1' if name == names[9] else name
    for caption in captions[name]:
      if caption == 'A cat, unquoted, naps':
        out.write(f'{listed},{caption}\r\n')
      else:
        writer.writerow([listed, caption])
    out.write('\r\n')
  writer.writerow(['only_one_cell.jpg'])
  writer.writerow(['ghost.jpg', 'A ghost .'])
  (root / 'captions.txt').write_bytes(b'\xef\xbb\xbf' + out.getvalue().encode('utf-8'))
  bad, converted = _fixture_facts(kinds)
  skipped = {'missing_file': {'ghost.jpg'}, 'malformed_line': {'captions.txt:66'}}
  if split_lists_in is not None:
    split_of = {n: 'train' for n in names[:10]}
    split_of.update({n: 'validation' for n in names[10:13]})
    split_of.update({n: 'test' for n in names[13:15]})
    _write_split_lists(root / split_lists_in, split_of)
    skipped['no_split'] = {names[15]}
  else:
    split_of = _expected_seeded_split(names)
  return Fixture(root=root, splits=split_of,
                 captions={names[7]: captions[names[7]], names[9]: captions[names[9]]},
                 skipped=skipped, bad_images=bad, converted=converted)


def _expected_seeded_split(names: list[str]) -> dict[str, str]:
  # 16 images: 2 validation + 2 test + 12 train, which ones decided by the seed.
  from capjax.data import layouts  # pylint: disable=import-outside-toplevel
  return layouts.seeded_split(names)


# ----------------------------------------------------------- karpathy json ---


def make_karpathy_flickr8k(root: pathlib.Path,
                           image_dir: str = 'Flicker8k_Dataset') -> Fixture:
  """12 images; splits train/restval/val/test; one sentence has only tokens,
  one has neither; one image file is missing; one entry has an unknown split."""
  root.mkdir(parents=True, exist_ok=True)
  names = _image_names(12)
  kinds = _kinds(names)
  write_images(root / image_dir, kinds)
  karpathy_splits = ['train'] * 5 + ['restval'] * 2 + ['val'] * 2 + ['test'] * 3
  entries = []
  for i, (name, split) in enumerate(zip(names, karpathy_splits)):
    sentences = [{'raw': c, 'tokens': c.lower().split()} for c in _captions_for(name)]
    entries.append({'filename': name, 'split': split, 'imgid': i,
                    'sentences': sentences})
  entries[4]['sentences'][1] = {'raw': '', 'tokens': ['only', 'tokens', 'here']}
  entries[4]['sentences'][2] = {'tokens': []}
  entries[6]['sentences'][0]['raw'] = NON_ASCII_CAPTION
  entries.append({'filename': 'ghost.jpg', 'split': 'train',
                  'sentences': [{'raw': 'A ghost .'}]})
  entries.append({'filename': 'odd.jpg', 'split': 'holdout',
                  'sentences': [{'raw': 'An odd one .'}]})
  _write_json(root / 'dataset_flickr8k.json', {'images': entries, 'dataset': 'flickr8k'})
  split_map = {'train': 'train', 'restval': 'train', 'val': 'validation', 'test': 'test'}
  bad, converted = _fixture_facts(kinds)
  return Fixture(
      root=root,
      splits={n: split_map[s] for n, s in zip(names, karpathy_splits)},
      captions={
          names[4]: (_captions_for(names[4])[0], 'only tokens here',
                     *_captions_for(names[4])[3:]),
          names[6]: (NON_ASCII_CAPTION, *_captions_for(names[6])[1:]),
      },
      skipped={'missing_file': {'ghost.jpg'},
               'malformed_line': {f'dataset_flickr8k.json images[4] {names[4]} sentences[2]',
                                  'dataset_flickr8k.json images[13] odd.jpg'}},
      bad_images=bad, converted=converted)


def make_karpathy_coco(root: pathlib.Path) -> Fixture:
  """COCO-style entries with 'filepath' folders: train2014/ directly in root,
  val2014/ inside images/."""
  root.mkdir(parents=True, exist_ok=True)
  layout = {'train2014': 6, 'val2014': 6}
  entries, splits, kinds_all = [], {}, {}
  for folder, count in layout.items():
    names = [f'COCO_{folder}_{i:012d}.jpg' for i in range(1, count + 1)]
    kinds = {name: ('gray' if i == 0 else 'rgb') for i, name in enumerate(names)}
    parent = root / 'images' if folder == 'val2014' else root
    write_images(parent / folder, kinds)
    for i, name in enumerate(names):
      split = ('train' if folder == 'train2014' else
               ['val', 'val', 'test', 'test', 'restval', 'restval'][i])
      entries.append({'filepath': folder, 'filename': name, 'split': split,
                      'cocoid': i, 'sentences': [{'raw': f' A photo {folder} {i} . '},
                                                 {'raw': 'Second caption .'}]})
      image_id = f'{folder}/{name}'
      splits[image_id] = {'val': 'validation', 'restval': 'train'}.get(split, split)
      kinds_all[image_id] = kinds[name]
  _write_json(root / 'dataset_coco.json', {'images': entries, 'dataset': 'coco'})
  bad, converted = _fixture_facts(kinds_all)
  first = 'val2014/COCO_val2014_000000000001.jpg'
  return Fixture(root=root, splits=splits,
                 captions={first: ('A photo val2014 0 .', 'Second caption .')},
                 skipped={}, bad_images=bad, converted=converted)


def _write_json(path: pathlib.Path, data: dict) -> None:
  path.write_text(json.dumps(data, ensure_ascii=False), encoding='utf-8')
