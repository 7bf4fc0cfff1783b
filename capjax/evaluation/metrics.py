"""coco-caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D) through pycocoevalcap.

The numbers are those of pycocoevalcap's own scorers, computed the standard coco-caption way: corpus
level, all references of an image, captions tokenised by the Stanford PTBTokenizer (Java) with
pycocoevalcap's punctuation removal. ``Cider`` in pycocoevalcap is CIDEr-D (clipped counts, Gaussian
length penalty, x10). CIDEr's IDF comes from the references of the evaluated images, so CIDEr only
compares between runs over the same image set.

SPICE is not supported: pycocoevalcap's SPICE downloads Stanford CoreNLP at run time, which is not
available here.

Without Java (``tokenizer='auto'`` and no ``java`` on PATH) captions are tokenised by
``python_ptb_tokenize``, a pure-Python imitation of the PTBTokenizer output on ordinary captions,
and METEOR (a Java program) is skipped, with a warning in the log. Known differences from the Java
tokeniser are listed in ``python_ptb_tokenize``.

The Java tokeniser runs exactly as pycocoevalcap's ``PTBTokenizer`` does (same jar, flags and
punctuation filter), except that it reads the captions from stdin in a temporary directory: pycocoevalcap
writes them to a file next to its jar, inside the installed package, which fails on a read-only install
and leaves reference captions in site-packages when a run is killed. A Java that does not work (a broken
install) falls back to the Python tokeniser in 'auto' mode, with a warning.

With ``on_error='warn'`` (what evaluation and training use), a metric whose scorer fails is left out with
a warning naming it and the cause, instead of failing the whole evaluation.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import subprocess
import tempfile
from typing import Iterable, Mapping, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

logger = logging.getLogger(__name__)

# Metric name accepted in ``metrics`` -> result keys, in coco-caption's order and spelling.
METRIC_KEYS = {
    'bleu': ('Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4'),
    'meteor': ('METEOR',),
    'rouge': ('ROUGE_L',),
    'cider': ('CIDEr',),
}
DEFAULT_METRICS = tuple(METRIC_KEYS)
TOKENIZERS = ('auto', 'ptb', 'python')
_PTB_JAR = os.path.join(os.path.dirname(os.path.abspath(ptbtokenizer.__file__)),
                        ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
_PTB_COMMAND = ('java', '-cp', _PTB_JAR, 'edu.stanford.nlp.process.PTBTokenizer', '-preserveLines',
                '-lowerCase')


# ----------------------------------------------------------------------------- public API

def compute_caption_metrics(candidates: Mapping[str, str], references: Mapping[str, Sequence[str]], *,
                            metrics: Iterable[str] = DEFAULT_METRICS, tokenizer: str = 'auto',
                            on_error: str = 'raise') -> dict[str, float]:
  """Corpus-level coco-caption scores of one candidate caption per image against its references.

  candidates: image id -> generated caption (raw text). references: image id -> reference captions
  (raw text); it must cover every candidate id, extra ids are ignored. metrics: any of 'bleu',
  'meteor', 'rouge', 'cider'. tokenizer: 'ptb' (Java PTBTokenizer, as coco-caption), 'python'
  (``python_ptb_tokenize``) or 'auto' (PTB when ``java`` is on PATH, else python).

  Returns a dict with keys among Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr. METEOR is left out, with
  a warning, when Java is missing. on_error: 'raise', or 'warn' to leave out (with a warning) any
  metric whose scorer fails.
  """
  tokenized = tokenize_for_scoring(references, {'candidates': candidates}, tokenizer)
  return score_tokenized(tokenized, 'candidates', metrics=metrics, on_error=on_error).corpus


@dataclasses.dataclass(frozen=True)
class Tokenized:
  """References and any number of candidate sets, tokenised by one tokenizer run.

  references: image id -> tokenised references; candidates: set name -> (image id -> [tokenised
  caption]), both in pycocoevalcap's layout (space-joined tokens, ids in the candidates' order);
  tokenizer: the one actually used, 'ptb' (Java) or 'python'; asked: the one asked for."""
  references: dict
  candidates: dict[str, dict]
  tokenizer: str
  asked: str


@dataclasses.dataclass(frozen=True)
class Scores:
  """`score_tokenized`'s result: corpus scores, and per image (for the scorers that give them: CIDEr,
  Bleu_1..Bleu_4) image id -> {metric: score}, in the candidates' order."""
  corpus: dict[str, float]
  per_image: dict


def tokenize_for_scoring(references: Mapping[str, Sequence[str]],
                         candidate_sets: Mapping[str, Mapping[str, str]],
                         tokenizer: str = 'auto') -> Tokenized:
  """Tokenises every candidate set and the references they need in ONE tokenizer run (one Java start),
  as coco-caption does. Every set must caption the same image ids (those of the first set).

  In 'auto' mode a Java that fails falls back to the Python tokeniser with a warning, so the tokenizer
  used is the one to report, not the one asked for."""
  if not candidate_sets:
    raise ValueError('no candidate sets to tokenise')
  sets = list(candidate_sets.items())
  image_ids = check_image_ids(sets[0][1], references)
  for name, candidates in sets[1:]:
    if check_image_ids(candidates, references) != image_ids:
      raise ValueError(f'candidate set {name!r} captions other images than {sets[0][0]!r}')
  use_ptb = _resolve_tokenizer(tokenizer, shutil.which('java') is not None)
  together = {('ref', i): list(references[i]) for i in image_ids}
  for name, candidates in sets:
    together.update({(name, i): [candidates[i]] for i in image_ids})
  try:
    tokenized = tokenize_captions(together, use_ptb=use_ptb)
  except RuntimeError as e:
    if not (use_ptb and tokenizer == 'auto'):
      raise
    logger.warning('%s; tokenising with the pure-Python PTB imitation instead.', e)
    tokenized, use_ptb = tokenize_captions(together, use_ptb=False), False
  return Tokenized(references={i: tokenized[('ref', i)] for i in image_ids},
                   candidates={name: {i: tokenized[(name, i)] for i in image_ids} for name, _ in sets},
                   tokenizer='ptb' if use_ptb else 'python', asked=tokenizer)


def tokenized_pairs(candidates: Mapping[str, str], references: Mapping[str, Sequence[str]],
                    tokenizer: str = 'auto') -> tuple[dict, dict, str]:
  """(gts, res, tokenizer used): the references and candidates tokenised as coco-caption does, in
  pycocoevalcap's layout, ready for any pycocoevalcap scorer (see `tokenize_for_scoring`)."""
  tokenized = tokenize_for_scoring(references, {'candidates': candidates}, tokenizer)
  return tokenized.references, tokenized.candidates['candidates'], tokenized.tokenizer


def score_tokenized(tokenized: Tokenized, candidate_set: str, *, metrics: Iterable[str] = DEFAULT_METRICS,
                    on_error: str = 'raise') -> Scores:
  """Each requested scorer run once over one tokenised candidate set: corpus scores (as
  `compute_caption_metrics`) and, from the same scorer calls, per-image CIDEr-D and BLEU.
  METEOR runs when Java is on PATH, unless Java just failed to tokenise ('auto' fell back)."""
  if on_error not in ('raise', 'warn'):
    raise ValueError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
  requested = _check_metric_names(metrics)
  have_java = shutil.which('java') is not None and (tokenized.asked != 'auto' or tokenized.tokenizer == 'ptb')
  if 'meteor' in requested and not have_java:
    logger.warning('METEOR skipped: it needs a working Java and `java` is not on PATH or fails.')
    requested.remove('meteor')
  gts, res = tokenized.references, tokenized.candidates[candidate_set]
  corpus, per_image = {}, {i: {} for i in res}
  for name in requested:
    try:
      scores, image_scores = _SCORERS[name](gts, res)
    except Exception as e:  # pylint: disable=broad-except
      if on_error == 'raise':
        raise
      logger.warning('%s could not be computed and is left out: %s: %s', name, type(e).__name__, e)
      continue
    corpus.update(scores)
    for key, values in image_scores.items():  # the scorers list images in the order of gts' keys
      for image_id, value in zip(gts, values):
        per_image[image_id][key] = float(value)
  return Scores(corpus=corpus, per_image=per_image)


def format_metrics_table(metrics: Mapping[str, float]) -> str:
  """Two aligned columns, coco-caption's metric order first, e.g. for logs and reports."""
  known = [k for keys in METRIC_KEYS.values() for k in keys if k in metrics]
  names = known + sorted(k for k in metrics if k not in known)
  if not names:
    return '(no metrics)'
  width = max(len(n) for n in names)
  return '\n'.join(f'{n:<{width}}  {float(metrics[n]):.4f}' for n in names)


def tokenize_captions(captions: Mapping[str, Sequence[str]], *, use_ptb: bool) -> dict[str, list[str]]:
  """image id -> captions, tokenised and punctuation-stripped as coco-caption does (space-joined)."""
  if use_ptb:
    return _java_ptb_tokenize(captions)
  return {i: [python_ptb_tokenize(c) for c in caps] for i, caps in captions.items()}


def _java_ptb_tokenize(captions: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
  """pycocoevalcap's PTBTokenizer.tokenize, reading stdin in a temporary directory (module docstring)."""
  ids = [i for i, caps in captions.items() for _ in caps]
  sentences = '\n'.join(c.replace('\n', ' ') for caps in captions.values() for c in caps)
  with tempfile.TemporaryDirectory() as workdir:
    try:
      done = subprocess.run(_PTB_COMMAND, input=sentences.encode(), cwd=workdir,
                            capture_output=True, check=False)
    except OSError as e:
      raise RuntimeError(f'the Java PTB tokenizer could not start: {e}') from e
  if done.returncode:
    message = done.stderr.decode(errors='replace').strip().splitlines()
    raise RuntimeError(f'the Java PTB tokenizer failed (exit {done.returncode}): '
                       f'{message[0] if message else "no message"}')
  lines = done.stdout.decode().split('\n')
  if len(lines) < len(ids):
    raise RuntimeError(f'the Java PTB tokenizer returned {len(lines)} lines for {len(ids)} captions')
  tokenized = {}
  for image_id, line in zip(ids, lines):
    words = [w for w in line.rstrip().split(' ') if w not in PUNCTUATIONS]
    tokenized.setdefault(image_id, []).append(' '.join(words))
  return tokenized


# ----------------------------------------------------------------------------- argument checks

def _check_metric_names(metrics: Iterable[str]) -> list[str]:
  requested = [m.lower() for m in ([metrics] if isinstance(metrics, str) else metrics)]
  if 'spice' in requested:
    raise ValueError('SPICE is not supported: pycocoevalcap downloads Stanford CoreNLP for it at run time.')
  unknown = sorted(set(requested) - set(METRIC_KEYS))
  if unknown:
    raise ValueError(f'unknown metrics {unknown}; choose from {list(METRIC_KEYS)}')
  return list(dict.fromkeys(requested))  # de-duplicated, order kept


def check_image_ids(candidates: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> list[str]:
  """The candidates' image ids, in order, once every one has references and one caption string."""
  missing = [i for i in candidates if not references.get(i)]
  if missing:
    raise ValueError(f'{len(missing)} candidate image ids have no references, e.g. {missing[:3]}')
  if not candidates:
    raise ValueError('no candidates to score')
  not_strings = [i for i, c in candidates.items() if not isinstance(c, str)]
  if not_strings:
    raise TypeError(f'candidates must map image id -> one caption string; not for {not_strings[:3]}')
  return list(candidates)


def _resolve_tokenizer(tokenizer: str, have_java: bool) -> bool:
  """True for the Java PTBTokenizer, False for the python imitation."""
  if tokenizer not in TOKENIZERS:
    raise ValueError(f'tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}')
  if tokenizer == 'ptb' and not have_java:
    raise RuntimeError("tokenizer='ptb' needs Java, and `java` is not on PATH")
  if tokenizer == 'auto' and not have_java:
    logger.warning('Java not found: tokenising captions with the pure-Python PTB imitation '
                   '(capjax.evaluation.metrics.python_ptb_tokenize); scores may differ slightly from '
                   'coco-caption.')
  return tokenizer == 'ptb' or (tokenizer == 'auto' and have_java)


# ----------------------------------------------------------------------------- scorers

# Each scorer: (gts, res) -> (corpus scores, {metric: per-image scores in gts' order}).

def _bleu(gts, res) -> tuple[dict[str, float], dict[str, list]]:
  scores, per_image = Bleu(4).compute_score(gts, res, verbose=0)
  return ({k: float(s) for k, s in zip(METRIC_KEYS['bleu'], scores)},
          dict(zip(METRIC_KEYS['bleu'], per_image)))


def _meteor(gts, res) -> tuple[dict[str, float], dict[str, list]]:
  scorer = Meteor()  # starts a JVM (~9 s): only when METEOR is asked for
  try:
    score, _ = scorer.compute_score(gts, res)
  finally:
    _stop_meteor(scorer)
  return {'METEOR': float(score)}, {}


def _stop_meteor(scorer) -> None:
  # Meteor only stops its JVM in __del__; do it now rather than whenever garbage collection runs.
  # Its __del__ later repeats this harmlessly (closed pipe, already reaped process).
  process = scorer.meteor_p
  process.stdin.close()
  process.kill()
  process.wait()
  process.stdout.close()
  process.stderr.close()


def _rouge(gts, res) -> tuple[dict[str, float], dict[str, list]]:
  score, _ = Rouge().compute_score(gts, res)
  return {'ROUGE_L': float(score)}, {}


def _cider(gts, res) -> tuple[dict[str, float], dict[str, list]]:
  score, per_image = Cider().compute_score(gts, res)
  return {'CIDEr': float(score)}, {'CIDEr': per_image}


_SCORERS = {'bleu': _bleu, 'meteor': _meteor, 'rouge': _rouge, 'cider': _cider}


# ----------------------------------------------------------------------------- pure-Python PTB imitation

# Unicode punctuation, rewritten before tokenising as PTB does (it normalises these to ASCII forms).
_CHAR_REWRITES = {'\u201c': '"', '\u201d': '"', '\u2018': "'", '\u2019': "'", '\u2026': '...',
                  '\u2013': '--', '\u2014': '--'}
# Single-character tokens PTB escapes. With -lowerCase the bracket escapes come out lower-case
# ('-lrb-'), which pycocoevalcap's PUNCTUATIONS (upper-case) does not match, so coco-caption keeps
# them as words; so do we. PTB turns '"' into `` or '', both dropped.
_TOKEN_REWRITES = {'(': '-lrb-', ')': '-rrb-', '{': '-lcb-', '}': '-rcb-', '[': '-lsb-', ']': '-rsb-',
                   '"': "''"}
# Title-like abbreviations that keep their period (PTB has a much longer list).
_ABBREVIATIONS = {'mr', 'mrs', 'ms', 'dr', 'st', 'jr', 'sr', 'vs', 'etc', 'prof', 'mt', 'ft', 'inc', 'co',
                  'ltd'}
_CLITIC_RE = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_SPLIT_WORDS = {'cannot': ('can', 'not'), 'gonna': ('gon', 'na'), 'wanna': ('wan', 'na'),
                'gotta': ('got', 'ta')}
_WORD = r"[^\W_]+"  # letters and digits, any script
_TOKEN_RE = re.compile(rf"""
      (?:[^\W\d_]\.){{2,}}                      # initialisms keep their periods: u.s. p.m. t.v. e.g.
    | \d+:\d+(?=[ap]\.?m\b)                     # 10:30am -> 10:30 am (but PTB keeps 5am)
    | \.{{2,}}                                  # ellipsis
    | -{{2,}}                                   # dash
    | [?!]+                                     # PTB keeps runs like '?!' as one (kept) token
    | \d+(?:,\d+)+(?:\.\d+)?                   # 1,000 and 1,000.50
    | '(?:s|re|ve|ll|d|m)\b                     # clitics already split off, as in "a man 's hat"
    | {_WORD}(?:[-'.:/&]{_WORD})*               # words; inner - ' . : / & as in t-shirt o'clock 5:30 1/2
    | \S                                        # any other character on its own
""", re.VERBOSE)


def python_ptb_tokenize(caption: str) -> str:
  """Tokenise one caption like PTBTokenizer(-preserveLines -lowerCase) + pycocoevalcap's filter.

  Lower-cases; splits off punctuation and the clitics n't 's 're 've 'll 'd 'm ("don't" -> "do n't",
  "man's" -> "man 's"); keeps inner hyphens, apostrophes, periods, colons and slashes (t-shirt,
  o'clock, u.s., 5:30, 1/2); rewrites brackets to -lrb- etc. and quotes/dashes/ellipses to their PTB
  forms; then drops pycocoevalcap's PUNCTUATIONS. Identical to the Java tokeniser on ordinary
  captions. Known differences: PTB's long abbreviation list (we keep only initialisms and a few
  titles such as mr. / st. / etc.); rare contractions ("y'all" -> PTB "y' all", "'tis" -> "'t is",
  "rock 'n' roll"); unit splitting beyond "10:30am"; tokens that start with a symbol ("@home",
  "dog,2" -> PTB ",2").
  """
  text = caption.replace('\n', ' ').lower()
  text = ''.join(_CHAR_REWRITES.get(ch, ch) for ch in text)
  tokens = []
  for token in _merge_abbreviations(_TOKEN_RE.findall(text)):
    tokens.extend(_split_clitics(token))
  tokens = [_normalise_token(t) for t in tokens]
  return ' '.join(t for t in tokens if t not in PUNCTUATIONS)


def _normalise_token(token: str) -> str:
  if re.fullmatch(r'\.{2,}', token):
    return '...'
  if re.fullmatch(r'-{2,}', token):
    return '--'
  return _TOKEN_REWRITES.get(token, token)


def _merge_abbreviations(tokens: list[str]) -> list[str]:
  merged = []
  for token in tokens:
    if token == '.' and merged and merged[-1] in _ABBREVIATIONS:
      merged[-1] += '.'
    else:
      merged.append(token)
  return merged


def _split_clitics(token: str) -> tuple[str, ...]:
  if token in _SPLIT_WORDS:
    return _SPLIT_WORDS[token]
  match = _CLITIC_RE.match(token)
  return match.groups() if match else (token,)
