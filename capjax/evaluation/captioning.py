"""Captioning a split with a model in memory: how the captions are decoded (`DecodeSettings`), the
captions themselves, and the quick scores training computes on the validation split each epoch."""

from collections.abc import Sequence
import dataclasses

from capjax import inference
from capjax.evaluation import metrics as metrics_lib


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  """How the captions of an evaluation are decoded; `slug()` goes into its file names, so that a beam
  search never overwrites the greedy evaluation of the same checkpoint."""
  beam_size: int = 1
  length_penalty: float = 0.0
  no_repeat_ngram: int = 0
  max_len: int = 0  # decoded tokens after <START>, <END> included

  def slug(self) -> str:
    """'greedy', 'beam3', 'beam3_lp0.6_nr3', ..."""
    parts = ['greedy' if self.beam_size <= 1 else f'beam{self.beam_size}']
    if self.length_penalty and self.beam_size > 1:  # greedy decoding has no use for a length penalty
      parts.append(f'lp{self.length_penalty:g}')
    if self.no_repeat_ngram:
      parts.append(f'nr{self.no_repeat_ngram}')
    return '_'.join(parts)

  def describe(self) -> str:
    text = 'greedy' if self.beam_size <= 1 else (f'beam search, {self.beam_size} beams, length penalty '
                                                 f'{self.length_penalty:g}')
    text += f', no repeated {self.no_repeat_ngram}-grams' if self.no_repeat_ngram else ', no n-gram blocking'
    return text + (f', at most {self.max_len} tokens' if self.max_len else '')


def eval_stem(split: str, step: int, decode: DecodeSettings) -> str:
  """The name an evaluation's files share: 'eval_test_248_greedy', 'eval_test_248_beam3_lp0.6_nr3'."""
  return f'eval_{split}_{step}_{decode.slug()}'


def caption_split(model, variables, vocab, source, mesh, *, image_size: int, batch_size: int,
                  decode: DecodeSettings, with_attention: bool = False,
                  max_images: int | None = None) -> list[inference.CaptionedImage]:
  """The captions of a split's images (the first `max_images`, if given), decoded as `decode` says; with
  `with_attention`, an attention model's captions carry their maps (a seed model's never do)."""
  caption_fn = inference.make_caption_fn(model, mesh, max_len=decode.max_len, beam_size=decode.beam_size,
                                         length_penalty=decode.length_penalty,
                                         no_repeat_ngram=decode.no_repeat_ngram,
                                         return_attention=with_attention and model.has_attention)
  return inference.caption_source(caption_fn, variables, source, vocab, mesh, image_size=image_size,
                                  batch_size=batch_size, max_images=max_images)


def validation_metrics(model, variables, vocab, source, mesh, config, *,
                       metrics: Sequence[str] = ('bleu', 'cider'), max_images: int | None = None) -> dict:
  """Training's per-epoch scores: greedy captions of (a prefix of) a split, scored corpus-level."""
  captioned = caption_split(model, variables, vocab, source, mesh, image_size=config.data.image_size,
                            batch_size=config.train.eval_batch_size,
                            decode=DecodeSettings(max_len=config.data.max_caption_len - 1),
                            max_images=max_images)
  return metrics_lib.compute_caption_metrics({str(c.index): c.caption for c in captioned},
                                             {str(c.index): c.references for c in captioned},
                                             metrics=metrics)
