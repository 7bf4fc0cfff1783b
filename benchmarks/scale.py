r"""Every stage of capjax on a COCO-shaped dataset of a chosen size: wall time and peak RSS per stage.

Writes --num_images images in the Karpathy COCO layout (dataset_coco.json, train2014/ and val2014/ JPEGs of
about --jpeg_kb each; 5 captions per image, words drawn from a Zipf vocabulary of --vocab_words, 8 words
and up with a long tail as in COCO; the Karpathy split's 4% validation, 4% test), then runs each stage in
a child process of its own, so that a stage's peak RSS is its own (over the child's imports, shown apart):

  prepare             the --mode=prepare build (array_record shards, captions files)
  vocabulary          the training run's vocabulary (`workdir.load_or_build_vocab`)
  input_epoch         one epoch of the training input pipeline at --image_size
  checkpoint          a train state saved by the Checkpointer, then restored as eval and caption restore it
  validation_metrics  greedy captions of (up to --metrics_images of) the validation split, BLEU and CIDEr
                      (facts: captioning_s, and scoring_s: the tokenizer and the scorers)
  validation_scoring  the non-captioning work of a COCO validation pass whatever N: BLEU and CIDEr of
                      --scoring_images candidates against 5 references each, the texts taken from the
                      training captions file (one tokenizer start, as every evaluation)
  feature_extraction  the 'cached' mode's trunk features of the training split (`features.load_or_extract`)
  eval_report         --mode=eval of that checkpoint on the test split (JSON, HTML, PNG)
  caption             --mode=caption over the val2014/ image files
  scst_reward         SCST's CIDEr-D reward built from the training references, scored on B x K rows

The model is --config's with random weights (default configs/tiny.py: what is measured is what the data
costs each stage, not a ResNet50's compute; pass configs/default.py on an accelerator host). The data and
workdir stay under --root and are reused while the flags that made them are unchanged. Every child imports
all of capjax (imports at the top, as everywhere): 'growth_mib' is what the stage itself added over that.

  python -m benchmarks.scale --num_images=2000 --jpeg_kb=8       # about 3 min on the 2-core CPU
  python -m benchmarks.scale --num_images=123287 --jpeg_kb=160   # COCO's size: ~40 GB of disk, 1-2 h

The table's estimate_s scales each stage's seconds to --estimate_images by what its work grows with; stages
with a fixed start (the eval report's METEOR JVM, the checkpoint's compile) come out too high.
"""

import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time

if __package__ in (None, ''):  # run as `python benchmarks/scale.py`
  sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from absl import app
from absl import flags
import numpy as np
import optax
from PIL import Image

from benchmarks import encoder_modes
from benchmarks import harness
from capjax import checkpointing
from capjax import cli
from capjax import features
from capjax import inference
from capjax import input_pipeline
from capjax import mesh as mesh_lib
from capjax import scst
from capjax import state as state_lib
from capjax import train
from capjax import workdir as workdir_lib
from capjax.data import prepare
from capjax.data import records as records_lib
from capjax.evaluation import captioning
from capjax.evaluation import metrics as metrics_lib
from capjax.evaluation import modes
from capjax.models import captioner

FLAGS = flags.FLAGS

STAGES = ('prepare', 'vocabulary', 'input_epoch', 'checkpoint', 'validation_metrics', 'validation_scoring',
          'feature_extraction', 'eval_report', 'caption', 'scst_reward')
# What a stage's work grows with, for the estimate at another size: every image, the held-out splits (4% each
# of the images), the validation images up to --metrics_images, or nothing (the model's size).
GROWS_WITH = {'checkpoint': 'nothing', 'validation_metrics': 'metrics_images', 'eval_report': 'held_out',
              'caption': 'held_out', 'validation_scoring': 'nothing'}
COCO_IMAGES = 123_287  # the Karpathy split of COCO 2014: 113,287 train, 5,000 val, 5,000 test
HELD_OUT = 5_000 / COCO_IMAGES  # each of validation and test
# Flags that describe the data: a change makes the dataset (and what was built from it) anew.
DATA_FLAGS = ('num_images', 'jpeg_kb', 'vocab_words', 'zipf', 'seed')
SYLLABLES = [c + v for c in 'bdfgklmnprstvz' for v in 'aeiou']


def define_flags() -> None:
  # Only when this file runs as the program: absl flags are process-global and the benchmarks import
  # one another (benchmarks/harness.py, "Flags").
  flags.DEFINE_integer('num_images', 2000, f'Images in the dataset (COCO, Karpathy split: {COCO_IMAGES:,}).')
  flags.DEFINE_float('jpeg_kb', 8.0, 'Bytes of each JPEG, in KB (about 6 to 160; COCO averages ~160).')
  flags.DEFINE_integer('vocab_words', 10_000, 'Distinct caption words (COCO: ~10k seen 5 times or more).')
  flags.DEFINE_float('zipf', 1.0, 'Word frequency ~ 1 / rank**zipf.')
  flags.DEFINE_integer('seed', 0, 'Seed of the generated dataset.')
  flags.DEFINE_string('config', 'configs/tiny.py', 'Config file of the model and the training settings.')
  flags.DEFINE_integer('image_size', 64, 'Image size of the pipeline and the model.')
  flags.DEFINE_integer('metrics_images', 1000, 'Validation images the metrics pass decodes (0: all).')
  flags.DEFINE_integer('scoring_images', 5000, 'Candidates the validation_scoring stage scores (COCO val).')
  flags.DEFINE_integer('scst_batch', 64, 'Images per SCST reward call (B).')
  flags.DEFINE_integer('scst_samples', 5, 'Sampled captions per image (K).')
  flags.DEFINE_list('stages', list(STAGES), f'Stages to run, in this order: {",".join(STAGES)}.')
  flags.DEFINE_string('root', '/tmp/capjax_scale', 'Folder of the dataset, prepared data and workdir.')
  flags.DEFINE_string('stage', '', 'Internal: run this one stage in this process.')
  flags.DEFINE_integer('estimate_images', COCO_IMAGES, 'Dataset size the printed time estimate is for.')
  flags.DEFINE_string('output', None, 'JSON path; default benchmarks/results/scale.json.')


# ----------------------------------------------------------------------------------------------
# The dataset


def _word_list(count: int) -> list[str]:
  """`count` distinct pronounceable words ('ba', 'be', ..., 'baba', ...): real-looking tokens."""
  words = []
  for i in range(count):
    digits, n = [], i + 1
    while n:
      n, d = divmod(n - 1, len(SYLLABLES))
      digits.append(SYLLABLES[d])
    words.append(''.join(reversed(digits)))
  return words


def _captions(rng: np.random.Generator, num_captions: int) -> list[str]:
  """Captions of 8 words and up (geometric tail: ~10 on average, a few past 20), Zipf-distributed words."""
  lengths = 7 + rng.geometric(0.3, num_captions)
  probs = 1.0 / np.arange(1, FLAGS.vocab_words + 1) ** FLAGS.zipf
  ids = rng.choice(FLAGS.vocab_words, int(lengths.sum()), p=probs / probs.sum())
  words = np.array(_word_list(FLAGS.vocab_words), dtype=object)[ids]
  ends = np.cumsum(lengths)
  return [' '.join(words[end - n:end]) + ' .' for n, end in zip(lengths, ends)]


def _jpeg_of_size(rng: np.random.Generator, target: int, width: int = 640, height: int = 480) -> bytes:
  """A COCO-sized (640x480) JPEG of about `target` bytes: a gradient with as much noise as that takes at
  quality 90, or, below the bare gradient's ~12 KB, the gradient at a lower quality (down to ~6 KB)."""
  base = np.linspace(40, 200, width)[None, :, None] + np.linspace(0, 40, height)[:, None, None]
  noise = rng.standard_normal((height, width, 3))

  def encode(sigma: float, quality: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.clip(base + sigma * noise, 0, 255).astype(np.uint8)).save(out, format='JPEG',
                                                                                   quality=quality)
    return out.getvalue()

  if len(encode(0.0, 90)) > target:
    return _bisect(lambda q: encode(0.0, round(q)), target, 5, 90)
  return _bisect(lambda sigma: encode(sigma, 90), target, 0.0, 128.0)


def _bisect(make, target: int, low: float, high: float) -> bytes:
  """make(x) for the x in [low, high] whose output is closest to `target` bytes (its size grows with x)."""
  best = make(low)
  for _ in range(12):
    middle = (low + high) / 2
    candidate = make(middle)
    if abs(len(candidate) - target) < abs(len(best) - target):
      best = candidate
    low, high = (middle, high) if len(candidate) < target else (low, middle)
  return best


def write_dataset(root: str) -> dict:
  """The Karpathy COCO layout under root/manual; returns facts about it."""
  rng = np.random.default_rng(FLAGS.seed)
  pool = [_jpeg_of_size(rng, int(FLAGS.jpeg_kb * 1000)) for _ in range(16)]
  captions = _captions(rng, 5 * FLAGS.num_images)
  held_out = max(1, round(HELD_OUT * FLAGS.num_images))
  for folder in ('train2014', 'val2014'):
    os.makedirs(os.path.join(root, folder), exist_ok=True)
  entries = []
  for i in range(FLAGS.num_images):
    split = 'val' if i < held_out else 'test' if i < 2 * held_out else 'train'
    folder = 'train2014' if split == 'train' else 'val2014'
    name = f'COCO_{folder}_{i:012d}.jpg'
    with open(os.path.join(root, folder, name), 'wb') as f:
      f.write(pool[i % len(pool)])
    entries.append({'filepath': folder, 'filename': name, 'split': split, 'cocoid': i,
                    'sentences': [{'raw': c} for c in captions[5 * i:5 * i + 5]]})
  with open(os.path.join(root, 'dataset_coco.json'), 'w') as f:
    json.dump({'images': entries, 'dataset': 'coco'}, f)
  return {'jpeg_bytes_mean': float(np.mean([len(p) for p in pool])), 'held_out_each': held_out,
          'caption_words_mean': float(np.mean([len(c.split()) - 1 for c in captions]))}


def _data_spec() -> dict:
  return {name: getattr(FLAGS, name) for name in DATA_FLAGS}


def ensure_dataset(root: str) -> dict:
  """The dataset for these flags, written unless it is there already (then prepared data from an older
  one, and the workdir, are removed with it)."""
  spec_path = os.path.join(root, 'manual', 'spec.json')
  if os.path.exists(spec_path):
    with open(spec_path) as f:
      saved = json.load(f)
    if saved['spec'] == _data_spec():
      return saved['facts']
  for folder in ('manual', 'data', 'workdir'):
    shutil.rmtree(os.path.join(root, folder), ignore_errors=True)
  start = time.perf_counter()
  facts = write_dataset(os.path.join(root, 'manual'))
  facts['write_s'] = round(time.perf_counter() - start, 1)
  with open(spec_path, 'w') as f:
    json.dump({'spec': _data_spec(), 'facts': facts}, f)
  return facts


# ----------------------------------------------------------------------------------------------
# The stages (each runs in a child process: `--stage=<name>`)


class _Run:
  """What every stage needs, made on demand: the config, the splits, the workdir's model."""

  def __init__(self, root: str):
    self.root = root
    self.workdir = os.path.join(root, 'workdir')
    self.config = encoder_modes.load_config(FLAGS.config)
    data = self.config.data
    data.name, data.layout = 'coco', 'auto'
    data.data_dir, data.manual_dir = os.path.join(root, 'data'), os.path.join(root, 'manual')
    data.image_size, data.max_caption_len, data.min_word_count, data.seq_per_img = FLAGS.image_size, 20, 5, 5
    self.mesh = mesh_lib.make_mesh()

  def splits(self):
    return prepare.open_dataset(self.config.data, build_demo=False)

  def restored(self):
    """(config, vocab, model, variables) of the workdir's checkpoint, restored as --mode=eval does."""
    config, vocab, model, variables, _ = inference.restore_variables(self.workdir, 'latest', self.mesh)
    return config, vocab, model, variables


def stage_prepare(run: _Run) -> dict:
  shutil.rmtree(run.config.data.data_dir, ignore_errors=True)  # prepared data is reused, never rebuilt
  return {'images': prepare.prepare_from_config(run.config.data)['images']}


def stage_vocabulary(run: _Run) -> dict:
  os.makedirs(run.workdir, exist_ok=True)
  if os.path.exists(workdir_lib.vocab_path(run.workdir)):
    os.remove(workdir_lib.vocab_path(run.workdir))
  vocab = workdir_lib.load_or_build_vocab(run.workdir, run.config.data, run.splits()['train'])
  workdir_lib.save_vocab(run.workdir, vocab)
  workdir_lib.save_config(run.workdir, workdir_lib.with_absolute_paths(run.config))
  return {'vocabulary': len(vocab)}


def stage_input_epoch(run: _Run) -> dict:
  train = run.splits()['train']
  cfg = input_pipeline.PipelineConfig.from_config(run.config)
  batch = run.config.train.batch_size
  iterator = input_pipeline.make_train_iterator(train, workdir_lib.load_vocab(run.workdir), cfg,
                                                host_batch_size=batch)
  steps = input_pipeline.num_train_examples(len(train), cfg) // batch
  start = time.perf_counter()
  for _ in range(steps):
    next(iterator)
  return {'batches': steps, 'examples_per_s': round(steps * batch / (time.perf_counter() - start), 1)}


def stage_checkpoint(run: _Run) -> dict:
  config = run.config
  begin = time.perf_counter()
  model = captioner.build_captioner(config.model, len(workdir_lib.load_vocab(run.workdir)))
  tx = state_lib.make_optimizer(config.train, optax.constant_schedule(1e-3), config.model.encoder_mode)
  state = state_lib.create_train_state(model, tx, 0, config.data.image_size, config.data.max_caption_len,
                                       run.mesh)
  initialised = time.perf_counter()
  directory = workdir_lib.checkpoint_dir(run.workdir)
  shutil.rmtree(directory, ignore_errors=True)
  start = time.perf_counter()
  checkpointer = checkpointing.Checkpointer(directory)
  checkpointer.save(0, state)
  checkpointer.close()
  saved = time.perf_counter()
  run.restored()
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(directory) for f in files)
  return {'init_s': round(initialised - begin, 2), 'save_s': round(saved - start, 2),
          'restore_s': round(time.perf_counter() - saved, 2),
          'checkpoint_mib': round(size / 2**20, 1)}


def stage_validation_metrics(run: _Run) -> dict:
  config, vocab, model, variables = run.restored()
  scoring = _timed(captioning.metrics_lib, 'compute_caption_metrics')
  start = time.perf_counter()
  metrics = captioning.validation_metrics(model, variables, vocab, run.splits()['validation'], run.mesh,
                                          config, max_images=FLAGS.metrics_images or None)
  total = time.perf_counter() - start
  return {**{k: round(float(v), 4) for k, v in metrics.items()},
          'captioning_s': round(total - scoring['seconds'], 2), 'scoring_s': round(scoring['seconds'], 2)}


def stage_validation_scoring(run: _Run) -> dict:
  references = records_lib.split_captions(run.splits()['train'])[:FLAGS.scoring_images + 1]
  count = len(references) - 1
  # Each image's candidate is another image's caption: realistic text, and scores that are not trivial.
  candidates = {str(i): references[i + 1][0] for i in range(count)}
  start = time.perf_counter()
  metrics = metrics_lib.compute_caption_metrics(candidates, {str(i): references[i] for i in range(count)},
                                                metrics=train.CAPTION_METRICS)
  return {'images': count, 'scoring_s': round(time.perf_counter() - start, 2),
          **{k: round(float(v), 4) for k, v in metrics.items()}}


def _timed(module, name: str) -> dict:
  """Wraps module.name to add up the seconds spent in it (this child process only); returns the tally."""
  tally, function = {'seconds': 0.0}, getattr(module, name)

  def timed(*args, **kwargs):
    start = time.perf_counter()
    try:
      return function(*args, **kwargs)
    finally:
      tally['seconds'] += time.perf_counter() - start

  setattr(module, name, timed)
  return tally


def stage_feature_extraction(run: _Run) -> dict:
  config, _, model, variables = run.restored()
  rows = features.load_or_extract(run.workdir, 'train', model, variables, run.splits()['train'], run.mesh,
                                  image_size=config.data.image_size,
                                  batch_size=config.train.eval_batch_size, reextract=True)
  return {'rows': rows.shape[0], 'file_mib': round(rows.nbytes / 2**20, 1)}


def stage_eval_report(run: _Run) -> dict:
  record = modes.evaluate_workdir(run.workdir, split='test', checkpoint='latest', beam_size=1)
  return {'CIDEr': round(float(record['metrics']['CIDEr']), 4)}


def stage_caption(run: _Run) -> dict:
  rows = cli.caption_images(run.workdir, os.path.join(run.root, 'manual', 'val2014'),
                            output=os.path.join(run.root, 'captions.tsv'), beam_size=1, checkpoint='latest')
  return {'images': len(rows)}


def stage_scst_reward(run: _Run) -> dict:
  vocab = workdir_lib.load_vocab(run.workdir)
  start = time.perf_counter()
  reward = scst.CaptionReward.from_source(run.splits()['train'], vocab)
  built = time.perf_counter()
  rng = np.random.default_rng(0)
  rows = FLAGS.scst_batch * FLAGS.scst_samples
  calls = [(harness.random_tokens(rng, rows, 20, len(vocab)), rng.integers(0, reward.num_images, rows))
           for _ in range(10)]
  scored = time.perf_counter()
  for samples, images in calls:
    reward(samples, images)
  return {'vocabulary': len(vocab), 'build_s': round(built - start, 2),
          'ms_per_call': round(1e3 * (time.perf_counter() - scored) / len(calls), 1), 'rows_per_call': rows}


def run_stage(name: str, root: str) -> None:
  """Runs one stage in this process and writes its seconds, peak RSS and facts to root/results/."""
  run = _Run(root)
  before_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  start = time.perf_counter()
  facts = globals()[f'stage_{name}'](run)
  peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  result = {'stage': name, 'seconds': round(time.perf_counter() - start, 1), 'peak_rss_mib': round(peak_mib),
            'rss_before_mib': round(before_mib), 'growth_mib': round(peak_mib - before_mib), 'facts': facts}
  os.makedirs(os.path.join(root, 'results'), exist_ok=True)
  with open(os.path.join(root, 'results', f'{name}.json'), 'w') as f:
    json.dump(result, f, default=str)


# ----------------------------------------------------------------------------------------------
# The parent: one child per stage


def _child_flags() -> list[str]:
  own = vars(harness.script_flags())
  return [f'--{k}={",".join(v) if isinstance(v, list) else v}' for k, v in own.items()
          if k not in ('stage', 'stages', 'output') and v is not None]


def run_child(stage: str, root: str) -> dict:
  log_path = os.path.join(root, 'logs', f'{stage}.log')
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  with open(log_path, 'w') as log:
    proc = subprocess.run([sys.executable, '-m', 'benchmarks.scale', f'--stage={stage}', *_child_flags()],
                          cwd=harness.REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
  if proc.returncode:
    with open(log_path) as f:
      tail = f.read()[-3000:]
    raise RuntimeError(f'stage {stage} failed (exit {proc.returncode}); {log_path} ends with:\n{tail}')
  with open(os.path.join(root, 'results', f'{stage}.json')) as f:
    return json.load(f)


def estimated_seconds(row: dict, num_images: int) -> float:
  """The row's seconds at `num_images` (same JPEG sizes and machine), scaled by what the stage grows with."""
  grows_with = GROWS_WITH.get(row['stage'], 'images')
  if grows_with == 'nothing':
    return row['seconds']
  if grows_with == 'metrics_images':
    measured = round(HELD_OUT * FLAGS.num_images)
    return row['seconds'] * _capped(round(HELD_OUT * num_images)) / max(_capped(measured), 1)
  return row['seconds'] * num_images / FLAGS.num_images


def _capped(images: int) -> int:
  return min(images, FLAGS.metrics_images) if FLAGS.metrics_images else images


def main(argv):
  harness.start(argv)
  root = os.path.abspath(FLAGS.root)
  if FLAGS.stage:
    run_stage(FLAGS.stage, root)
    return
  unknown = sorted(set(FLAGS.stages) - set(STAGES))
  if unknown:
    raise app.UsageError(f'--stages: unknown {unknown}; expected some of {list(STAGES)}')
  facts = ensure_dataset(root)
  print(f'{FLAGS.num_images:,} images of ~{facts["jpeg_bytes_mean"] / 1e3:.0f} KB under {root}/manual '
        f'(written in {facts["write_s"]} s), {facts["caption_words_mean"]:.1f} words a caption', flush=True)
  before = harness.idle_check()
  monitor = harness.LoadMonitor()
  rows = []
  for stage in [s for s in STAGES if s in FLAGS.stages]:
    result = run_child(stage, root)
    result['estimate_s'] = round(estimated_seconds(result, FLAGS.estimate_images))
    rows.append(result)
    print(f"{stage:19s} {result['seconds']:8.1f} s  peak RSS {result['peak_rss_mib']:6d} MiB "
          f"(+{result['growth_mib']} over the imports)  {result['facts']}", flush=True)
  load = harness.describe_load(monitor.report())
  print()
  harness.print_table(rows, ['stage', 'seconds', 'estimate_s', 'peak_rss_mib', 'growth_mib'])
  estimate = sum(r['estimate_s'] for r in rows)
  print(f"\n{sum(r['seconds'] for r in rows):.0f} s in all; estimate_s: at {FLAGS.estimate_images:,} images "
        f'about {estimate / 3600:.1f} h (same JPEG sizes and machine; the child processes\' start and the '
        f'dataset\'s writing not counted). {load}')
  harness.write_json(FLAGS.output or harness.default_output(__file__), {
      'benchmark': 'scale', 'argv': sys.argv, 'machine': harness.machine_info(), 'load_before': before,
      'load': load, 'dataset': dict(facts, **_data_spec()), 'rows': rows})


if __name__ == '__main__':
  define_flags()
  app.run(main)
