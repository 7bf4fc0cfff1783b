r"""SCST reward cost: capjax.evaluation.cider.CiderD scoring B images x K sampled captions plus the greedy
baseline.

A synthetic Flickr8k-sized corpus (--num_images x --refs references, vocabulary --vocab with Zipf-like
word frequencies, 8-18 words) gives the document frequencies. Each timed call scores decoder-like token
rows (words, <END>, <PAD>...; cut with end_id/pad_id) that copy a crop of one of their image's
references with some words replaced, so that scores are those of a half-trained model, not all zero.
Rows, each timed over --reps calls on --reps different batches (median reported):

  samples / greedy (prepared split)   against the whole corpus prepared once (`CiderD.prepare`), by
                                      dataset image index: the per-step cost when the split is cached
  samples / greedy (refs per call)    against the batch's reference lists, prepared inside the call
  step (prepare batch once)           one SCST step with the batch's references prepared once and
                                      shared by the B*K samples and the B greedy captions

  python -m benchmarks.cider_reward                  # B=64, K=5, ~30 s on the 2-core CPU
  python -m benchmarks.cider_reward --batch=256 --samples=5
"""

import os
import sys
import time

if __package__ in (None, ''):  # run as `python benchmarks/cider_reward.py`
  sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from absl import app
from absl import flags
import numpy as np

from benchmarks import harness
from capjax.evaluation import cider
from capjax import vocab as vocab_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  # Only when this file runs as the program: absl flags are process-global and the benchmarks import
  # one another (benchmarks/harness.py, "Flags").
  flags.DEFINE_integer('num_images', 6000, 'Corpus images (Flickr8k train: 6,000).')
  flags.DEFINE_integer('refs', 5, 'References per image.')
  flags.DEFINE_integer('vocab', 5000, 'Words in the vocabulary.')
  flags.DEFINE_float('zipf', 1.0, 'Word frequency ~ 1 / rank**zipf.')
  flags.DEFINE_integer('batch', 64, 'Images per SCST step (B).')
  flags.DEFINE_integer('samples', 5, 'Sampled captions per image (K).')
  flags.DEFINE_integer('max_len', 20, 'Decoded tokens per row, <END> included.')
  flags.DEFINE_integer('reps', 50, 'Timed calls per row, each on a different batch.')
  flags.DEFINE_string('output', None, 'JSON path; default benchmarks/results/cider_reward.json.')


FIRST_WORD = 4  # ids below are capjax's specials: PAD, START, END, UNK


def zipf_words(rng: np.random.Generator, count: int) -> np.ndarray:
  probs = 1.0 / np.arange(1, FLAGS.vocab + 1) ** FLAGS.zipf
  return FIRST_WORD + rng.choice(FLAGS.vocab, count, p=probs / probs.sum())


def synthetic_corpus(rng: np.random.Generator) -> list[list[list[int]]]:
  lengths = rng.integers(8, 19, FLAGS.num_images * FLAGS.refs)
  captions = np.split(zipf_words(rng, int(lengths.sum())), np.cumsum(lengths)[:-1])
  captions = [c.tolist() for c in captions]
  return [captions[i:i + FLAGS.refs] for i in range(0, len(captions), FLAGS.refs)]


def decoder_rows(rng: np.random.Generator, corpus, image_ids: np.ndarray) -> np.ndarray:
  """One row per image id: a crop of one of its references, ~30% of words replaced, then <END>, <PAD>."""
  rows = np.full((len(image_ids), FLAGS.max_len), vocab_lib.PAD_ID, np.int32)
  for row, image in zip(rows, image_ids):
    ref = corpus[image][rng.integers(len(corpus[image]))]
    start = int(rng.integers(0, 3))
    words = np.array(ref[start:start + int(rng.integers(5, FLAGS.max_len))])
    replace = rng.random(len(words)) < 0.3
    words[replace] = zipf_words(rng, int(replace.sum()))
    row[:len(words)] = words
    row[len(words)] = vocab_lib.END_ID
  return rows


def time_calls(fn, inputs: list) -> tuple[float, float]:
  """Median wall and CPU seconds of fn(*x) over the inputs, after one untimed call. On a machine shared
  with another job the CPU time is the steadier of the two."""
  fn(*inputs[0])
  wall, cpu = [], []
  for x in inputs:
    start, start_cpu = time.perf_counter(), time.process_time()
    fn(*x)
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  return float(np.median(wall)), float(np.median(cpu))


def main(argv):
  harness.start(argv)
  rng = np.random.default_rng(0)
  corpus = synthetic_corpus(rng)
  start = time.perf_counter()
  scorer = cider.CiderD(corpus)
  build_s = time.perf_counter() - start
  start = time.perf_counter()
  split = scorer.prepare(corpus)
  prepare_s = time.perf_counter() - start
  split_mb = split.nbytes / 2 ** 20
  print(f'corpus {len(corpus)} images x {FLAGS.refs} refs: CiderD built in {build_s:.2f} s, '
        f'split prepared in {prepare_s:.2f} s ({split_mb:.0f} MiB)')

  b, k = FLAGS.batch, FLAGS.samples
  batches = []
  for _ in range(FLAGS.reps):
    ids = rng.choice(len(corpus), b, replace=False)
    batches.append((ids, decoder_rows(rng, corpus, np.repeat(ids, k)), decoder_rows(rng, corpus, ids)))
  cut = dict(end_id=vocab_lib.END_ID, pad_id=vocab_lib.PAD_ID)
  by_sample = np.repeat(np.arange(b), k)

  def step(ids, samples, greedy):
    prepared = scorer.prepare([corpus[i] for i in ids])
    return scorer.score(samples, prepared, by_sample, **cut), scorer.score(greedy, prepared, **cut)

  cases = [
      ('samples (prepared split)', b * k,
       lambda ids, s, g: scorer.score(s, split, np.repeat(ids, k), **cut)),
      ('greedy (prepared split)', b, lambda ids, s, g: scorer.score(g, split, ids, **cut)),
      ('samples (refs per call)', b * k,
       lambda ids, s, g: scorer.score(s, [corpus[i] for i in ids], by_sample, **cut)),
      ('greedy (refs per call)', b, lambda ids, s, g: scorer.score(g, [corpus[i] for i in ids], **cut)),
      ('step (prepare batch once)', b * k + b, step),
  ]
  before = harness.idle_check()
  print(f'before the run: {harness.describe_load(before)}')
  monitor = harness.LoadMonitor()
  rows = []
  for name, captions, fn in cases:
    seconds, cpu_seconds = time_calls(fn, batches)
    rows.append({'call': name, 'captions': captions, 'ms_per_call': 1e3 * seconds,
                 'cpu_ms_per_call': 1e3 * cpu_seconds, 'captions_per_s': captions / seconds})
  load = monitor.report()
  mean_reward = float(np.mean([scorer.score(s, split, np.repeat(ids, k), **cut) for ids, s, _ in batches]))

  print()
  harness.print_table(rows, ['call', 'captions', 'ms_per_call', 'cpu_ms_per_call', 'captions_per_s'])
  print(f'\nmean sample reward {mean_reward:.3f}; {harness.machine_info()}\n{harness.describe_load(load)}')
  harness.write_json(FLAGS.output or harness.default_output(__file__), {
      'benchmark': 'cider_reward', 'argv': sys.argv, 'machine': harness.machine_info(),
      'load_before': before, 'load_during': load, 'num_images': len(corpus), 'refs': FLAGS.refs,
      'vocab': FLAGS.vocab, 'zipf': FLAGS.zipf, 'batch': b, 'samples': k, 'max_len': FLAGS.max_len,
      'reps': FLAGS.reps, 'build_s': build_s, 'prepare_split_s': prepare_s, 'split_mib': split_mb,
      'mean_sample_reward': mean_reward, 'numpy': np.__version__, 'rows': rows})


if __name__ == '__main__':
  define_flags()
  app.run(main)
