"""Where a trained attention model looks, word by word, on the demo's held-out scenes: what limits it.

  python -m benchmarks.investigations.attention_maps --workdir=workdirs/demo_attention [--split=test]

Captions every image of the split (greedy, the checkpoint chosen by --checkpoint) with its attention maps
and reports, for one-object and two-object scenes apart:
  - attention entropy (nats; uniform over the grid = ln(cells)) and the peak cell's weight, per decoding
    step and over all words;
  - pointing by word class (the peak cell of a colour/shape word overlaps its object, `content_score`)
    against a random cell;
  - on two-object scenes whose caption names both objects: the share whose two shape words peak in
    different cells each on its own object (`separated`), and the share whose second shape word peaks
    on the *first* object (attention that stayed where it was).
Writes the numbers to --output (JSON).
"""

import json
import os
import sys

if __package__ in (None, ''):  # run as `python benchmarks/investigations/attention_maps.py`
  sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app
from absl import flags
import numpy as np

from capjax import inference
from capjax import workdir as workdir_lib
from capjax.data import prepare
from capjax.data import records as records_lib
from capjax.evaluation import content_score

FLAGS = flags.FLAGS
STEPS_SHOWN = 12


def define_flags() -> None:
  flags.DEFINE_string('workdir', 'workdirs/demo_attention', 'Workdir of a trained attention model.')
  flags.DEFINE_string('split', 'test', 'Split of the model\'s demo data.')
  flags.DEFINE_string('checkpoint', 'latest', "Checkpoint: 'latest', 'best' or a step.")
  flags.DEFINE_string('output', None, 'JSON path; default benchmarks/results/attention_maps.json.')


def stuck_on_first(words, alphas: np.ndarray, objects) -> bool | None:
  """For a two-object caption naming both objects (`content_score.named_pair`): whether the second
  mention's shape word peaks on a cell of the first mention's object and not on its own. None when the
  caption is not of that kind."""
  named = content_score.named_pair(words, len(alphas), objects)
  if named is None:
    return None
  rows = cols = alphas.shape[1]
  (_, first), (second_mention, second) = named
  peak = int(np.argmax(alphas[second_mention.shape_index].reshape(-1)))
  cells = content_score.cells_overlapping
  return bool(cells(first['box'], rows, cols)[peak] and not cells(second['box'], rows, cols)[peak])


def summarise(attended, objects_per_image, indices) -> dict:
  """The numbers above for one group of images (`indices`: their positions in the split)."""
  entropy_by_step = [[] for _ in range(STEPS_SHOWN)]
  entropies, peaks, stuck, apart = [], [], [], []
  for index, caption, objects in zip(indices, attended, objects_per_image):
    if content_score.separated(caption.words, caption.attention.reshape(len(caption.words), -1),
                               caption.attention.shape[1:], objects):
      apart.append(index)
    flat = caption.attention.reshape(len(caption.words), -1)
    entropy = -np.sum(flat * np.log(flat + 1e-12), axis=1)
    entropies.extend(entropy)
    peaks.extend(flat.max(axis=1))
    for step, value in enumerate(entropy[:STEPS_SHOWN]):
      entropy_by_step[step].append(value)
    verdict = stuck_on_first(caption.words, caption.attention, objects)
    if verdict is not None:
      stuck.append(verdict)
  by_class = {}
  for word_class in ('colour', 'shape'):
    hits = checked = 0
    chance = 0.0
    for caption, objects in zip(attended, objects_per_image):
      h, c, p = content_score.pointing(caption.words, caption.attention.reshape(len(caption.words), -1),
                                       caption.attention.shape[1:], objects, word_classes=(word_class,))
      hits, checked, chance = hits + h, checked + c, chance + p
    by_class[word_class] = {'pointing': hits / checked if checked else None,
                            'random_cell': chance / checked if checked else None, 'words': checked}
  pointing = content_score.pointing_score([c.words for c in attended], [c.attention for c in attended],
                                          objects_per_image)
  cells = attended[0].attention[0].size if attended else 0
  return {'images': len(attended), 'cells': cells, 'uniform_entropy': float(np.log(cells)) if cells else None,
          'entropy': float(np.mean(entropies)) if entropies else None,
          'peak_weight': float(np.mean(peaks)) if peaks else None,
          'entropy_by_step': [round(float(np.mean(v)), 3) if v else None for v in entropy_by_step],
          'pointing_by_class': by_class, 'separated': pointing.separated,
          'second_shape_on_first_object': float(np.mean(stuck)) if stuck else None,
          'two_object_captions': len(stuck), 'images_apart': apart}


def main(argv):
  del argv
  config = workdir_lib.load_config(FLAGS.workdir)
  source = prepare.open_dataset(config.data, build_demo=False)[FLAGS.split]
  records = [source[i] for i in range(len(source))]
  objects = [records_lib.record_objects(r) for r in records]
  if any(o is None for o in objects):
    raise app.UsageError(f'{FLAGS.workdir}: its data has no ground-truth objects (the demo data has)')
  captioner = inference.ImageCaptioner.from_workdir(FLAGS.workdir, checkpoint=FLAGS.checkpoint, beam_size=1)
  attended = captioner.caption_with_attention([records_lib.as_bytes(r['image']) for r in records])
  result = {'workdir': FLAGS.workdir, 'split': FLAGS.split, 'checkpoint': FLAGS.checkpoint}
  for count in sorted({len(o) for o in objects}):
    chosen = [i for i, o in enumerate(objects) if len(o) == count]
    name = f'{count} object{"s" if count > 1 else ""}'
    result[name] = summarise([attended[i] for i in chosen], [objects[i] for i in chosen], chosen)
    r = result[name]
    print(f"{name}: {r['images']} images, {r['cells']} cells (uniform entropy {r['uniform_entropy']:.2f})  "
          f"entropy {r['entropy']:.2f} nats, peak weight {r['peak_weight']:.2f}")
    print(f"  entropy by step: {r['entropy_by_step']}")
    for word_class, p in r['pointing_by_class'].items():
      if p['words']:
        print(f"  pointing, {word_class} words: {p['pointing']:.1%} of {p['words']} "
              f"(random cell {p['random_cell']:.1%})")
    if r['two_object_captions']:
      print(f"  captions naming both objects: {r['two_object_captions']}; shape words apart, each on its "
            f"object: {r['separated']:.1%}; second shape word on the first object: "
            f"{r['second_shape_on_first_object']:.1%} (images apart: {r['images_apart']})")
  output = FLAGS.output or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                        'results', 'attention_maps.json')
  with open(output, 'w') as f:
    json.dump(result, f, indent=1)
  print(f'wrote {output}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
