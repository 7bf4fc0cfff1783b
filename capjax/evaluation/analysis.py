"""Everything an evaluation says about a set of captions, computed once: the coco-caption metrics and
per-image CIDEr-D/BLEU-4 (one tokenizer run and one pass of each scorer for the model's captions and the
trivial baseline together), paper-style BLEU, the collapse detectors, the demo's content score, and the
examples the report shows. `Evaluation` is the typed result; `Evaluation.record()` is its JSON and
`report_page()` the HTML report's payload."""

from collections import Counter
from collections.abc import Sequence
import dataclasses

import numpy as np

from capjax import inference
from capjax import vocab as vocab_lib
from capjax.data import records as records_lib
from capjax.evaluation import caption_analysis
from capjax.evaluation import content_score
from capjax.evaluation import markup
from capjax.evaluation import metrics as metrics_lib
from capjax.evaluation import provenance as provenance_lib
from capjax.evaluation import report as report_lib

FORMAT = 'capjax-evaluation/1'
DEFAULT_METRICS = ('bleu', 'meteor', 'rouge', 'cider')
BASELINE_METRICS = ('bleu', 'cider')
EXAMPLES_PER_SECTION = 8  # best, worst and random images shown in the HTML report
SECTION_SEED = 0  # draws the report's random examples, so two runs show the same images
THUMBNAIL_SIDE = 128
_TOKENIZERS = {'ptb': 'PTB (Stanford PTBTokenizer via Java, as coco-caption)',
               'python': 'python imitation of PTB (Java missing or failing; scores may differ slightly)'}


@dataclasses.dataclass(frozen=True)
class ImageScores:
  """One evaluated image: its caption and references, CIDEr-D (the mean over images is the corpus CIDEr)
  and BLEU-4 of the image alone."""
  image_id: str
  caption: str
  references: list[str]
  cider: float
  bleu_4: float

  def as_dict(self) -> dict:
    return {'image_id': self.image_id, 'caption': self.caption, 'references': list(self.references),
            'CIDEr': self.cider, 'Bleu_4': self.bleu_4}


@dataclasses.dataclass(frozen=True)
class Baseline:
  """The trivial captioner: the most frequent training caption for every image, and its scores."""
  caption: str
  metrics: dict[str, float]


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """One evaluation of captioned images. `stem` names its files (`captioning.eval_stem`); `sections` are
  the indices of the best, worst and random images the report shows."""
  provenance: provenance_lib.Provenance
  captioned: list[inference.CaptionedImage]
  metrics: dict[str, float]
  per_image: list[ImageScores]
  paper_bleu: dict[str, float]
  collapse: caption_analysis.CollapseReport
  content: content_score.ContentScore | None
  sections: dict[str, list[int]]
  stem: str
  baseline: Baseline | None = None

  @property
  def title(self) -> str:
    return f'capjax evaluation: {self.provenance.split} split, checkpoint {self.provenance.checkpoint_step}'

  def files(self) -> dict[str, str]:
    """The names its JSON, HTML report and PNG caption grid are written under."""
    return {ext: f'{self.stem}.{ext}' for ext in ('json', 'html', 'png')}

  def record(self) -> dict:
    """The JSON: the keys older capjax wrote ('workdir', 'split', 'checkpoint_step', 'beam_size',
    'length_penalty', 'metrics', 'captions') plus 'format', 'title', 'no_repeat_ngram', 'provenance',
    'paper_bleu' and 'paper_bleu_variant', 'collapse', 'content' (or None), 'examples' ({'best'|'worst'|
    'random': [image_id]}, as the HTML shows them) and 'files'. Each entry of 'captions' is
    {'image_id', 'caption', 'references', 'CIDEr', 'Bleu_4'}."""
    p = self.provenance.as_dict()
    return {
        'format': FORMAT, 'title': self.title,
        **{k: p[k] for k in ('workdir', 'split', 'checkpoint_step', 'beam_size', 'length_penalty',
                             'no_repeat_ngram')},
        'provenance': p, 'metrics': self.metrics,
        'paper_bleu': self.paper_bleu, 'paper_bleu_variant': caption_analysis.PAPER_BLEU_VARIANT,
        'collapse': self.collapse.as_dict(), 'content': self.content.as_dict() if self.content else None,
        'examples': {name: [self.per_image[i].image_id for i in shown]
                     for name, shown in self.sections.items()},
        'captions': [s.as_dict() for s in self.per_image],
        'files': self.files(),
    }


def analyse(captioned: Sequence[inference.CaptionedImage], *, source, train_captions: Sequence[str],
            vocab: vocab_lib.Vocabulary, provenance: provenance_lib.Provenance, stem: str,
            metrics: Sequence[str] = DEFAULT_METRICS, baseline: bool = False) -> Evaluation:
  """Scores captioned images of `source` every way the report shows (`source` is read only for the
  content score's ground truth). With `baseline`, also scores the most common of `train_captions` as
  every image's caption (BASELINE_METRICS), in the same tokenizer run."""
  keys = [str(c.index) for c in captioned]  # image ids need not be unique; positions in the split are
  candidates = {k: c.caption for k, c in zip(keys, captioned)}
  references = {k: c.references for k, c in zip(keys, captioned)}
  sets = {'model': candidates}
  if baseline:
    baseline_caption = Counter(train_captions).most_common(1)[0][0].lower()
    sets['baseline'] = {k: baseline_caption for k in keys}
  tokenized = metrics_lib.tokenize_for_scoring(references, sets)
  # Per-image CIDEr-D and BLEU-4 come from the corpus scorers' own calls, so those two always run.
  scored = list(dict.fromkeys([*metrics, 'bleu', 'cider']))
  scores = metrics_lib.score_tokenized(tokenized, 'model', metrics=scored, on_error='warn')
  if any({'CIDEr', 'Bleu_4'} - set(s) for s in scores.per_image.values()):
    raise RuntimeError('per-image CIDEr-D and BLEU-4 could not be computed (see the warnings above)')
  asked = {key for name in metrics for key in metrics_lib.METRIC_KEYS[name.lower()]}
  per_image = [ImageScores(c.image_id, c.caption, list(c.references), scores.per_image[k]['CIDEr'],
                           scores.per_image[k]['Bleu_4']) for k, c in zip(keys, captioned)]
  return Evaluation(
      provenance=dataclasses.replace(provenance, tokenizer=_TOKENIZERS[tokenized.tokenizer]),
      captioned=list(captioned),
      metrics={k: v for k, v in scores.corpus.items() if k in asked},
      per_image=per_image,
      paper_bleu=caption_analysis.paper_bleu(candidates, references),
      collapse=caption_analysis.collapse_report(candidates, train_captions,
                                                len(vocab) - len(vocab_lib.SPECIALS), references),
      content=content_for_split(captioned, source),
      sections=report_lib.select_sections([{'scores': {'CIDEr': s.cider}} for s in per_image],
                                          n=EXAMPLES_PER_SECTION, seed=SECTION_SEED),
      stem=stem,
      baseline=Baseline(baseline_caption, metrics_lib.score_tokenized(
          tokenized, 'baseline', metrics=BASELINE_METRICS).corpus) if baseline else None)


def content_for_split(captioned: Sequence[inference.CaptionedImage],
                      source) -> content_score.ContentScore | None:
  """The demo's content score (capjax/evaluation/content_score.py) when the dataset stores ground
  truth, else None; with attention maps in the captions, its pointing too."""
  if not captioned or records_lib.record_objects(source[captioned[0].index]) is None:
    return None  # real datasets have no ground truth: do not read every record to find that out
  objects = [records_lib.record_objects(source[c.index]) for c in captioned]
  if any(o is None for o in objects):
    return None
  scores = content_score.content_score([c.caption for c in captioned], objects)
  attended = [(c.attended, o) for c, o in zip(captioned, objects) if c.attended is not None]
  if not attended:
    return scores
  pointing = content_score.pointing_score([a.words for a, _ in attended], [a.attention for a, _ in attended],
                                          [o for _, o in attended])
  return dataclasses.replace(scores, pointing=pointing)


# ----------------------------------------------------------------------------------------------
# The HTML report's payload
# ----------------------------------------------------------------------------------------------

def report_page(evaluation: Evaluation, source, *, also_show: Sequence[int] = (),
                thumbnails: bool = True) -> dict:
  """`capjax.evaluation.report`'s payload for an evaluation of images of `source`: thumbnails (and
  attention maps) for the images its sections show, and thumbnails for `also_show` (indices of
  evaluated images, e.g. those a comparison shows); no image at all without `thumbnails`."""
  examples = [{'image_id': s.image_id, 'image': None, 'caption': s.caption, 'references': list(s.references),
               'scores': {'CIDEr': s.cider, 'Bleu_4': s.bleu_4}} for s in evaluation.per_image]
  shown = {i for indices in evaluation.sections.values() for i in indices} if thumbnails else set()
  for i in sorted(shown):
    examples[i].update(_illustrations(evaluation.captioned[i], source))
  for i in also_show:
    examples[i]['image'] = examples[i]['image'] or thumbnail_uri(evaluation.captioned[i], source)[1]
  return {
      'title': evaluation.title, 'provenance': evaluation.provenance.as_dict(), 'metrics': evaluation.metrics,
      'paper_bleu': evaluation.paper_bleu, 'collapse': evaluation.collapse.as_dict(),
      'content': content_table(evaluation.content) if evaluation.content else None,
      'examples': examples, 'sections': evaluation.sections,
  }


def _illustrations(captioned: inference.CaptionedImage, source) -> dict:
  """A shown example's thumbnail and, when the decoder attends, its per-word attention maps."""
  pixels, uri = thumbnail_uri(captioned, source)
  shown = {'image': uri}
  attended = captioned.attended
  if attended is not None and attended.words:
    shown['attention'] = report_lib.attention_map_images(pixels, attended.words, attended.attention)
  return shown


def thumbnail_uri(captioned: inference.CaptionedImage, source) -> tuple[np.ndarray, str]:
  """(an evaluated image's pixels, a data URI of it at most THUMBNAIL_SIDE px on its longer side)."""
  image = records_lib.record_image(source[captioned.index], THUMBNAIL_SIDE)
  pixels = np.asarray(image.convert('RGB'), np.uint8)
  return pixels, markup.image_data_uri(pixels, max_side=THUMBNAIL_SIDE)


def content_table(content: content_score.ContentScore) -> dict:
  """The content score as the report shows it: one row for all images and one per object count, rates
  as percentages, and the attention pointing rate (when there is one) above them."""
  def row(rates: content_score.Rates) -> dict:
    values = dataclasses.asdict(rates)
    return {'images': values.pop('images'), **{k.replace('_', ' '): f'{v:.1%}' for k, v in values.items()}}
  table = {}
  if content.pointing is not None:
    p = content.pointing
    table['attention pointing (colour and shape words whose peak attention cell overlaps their object)'] = (
        'no word to check' if p.rate is None else
        f'{p.rate:.1%} of {p.words_checked} words (a random cell: {p.chance:.1%})')
    table["two-object scenes: the two objects' shape words peak in different cells, each on its object"] = (
        'no caption names both objects' if p.separated is None else
        f'{p.separated:.1%} of {p.two_object_captions} captions')
  overall = content_score.Rates(**{f.name: getattr(content, f.name)
                                   for f in dataclasses.fields(content_score.Rates)})
  table['all images'] = row(overall)
  table.update({count: row(rates) for count, rates in content.by_object_count.items()})
  # What the caption calls each true (size, shape): a model that names shape by the amount of colour
  # it sees calls big objects squares and small ones triangles.
  for truth, named in content.shape_confusion.items():
    total = sum(named.values())
    table[f'a {truth} is called'] = ', '.join(
        f'{shape} {count / total:.0%}' for shape, count in sorted(named.items(), key=lambda kv: -kv[1]))
  return table
