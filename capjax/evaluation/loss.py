"""A split's teacher-forced loss, overall and word by word (training's per-epoch validation loss and the
end-of-run test loss)."""

from collections.abc import Mapping, Sequence
import dataclasses

import jax
import numpy as np

from capjax import input_pipeline
from capjax import mesh as mesh_lib
from capjax import vocab as vocab_lib


@dataclasses.dataclass(frozen=True)
class SplitLoss:
  """A split's teacher-forced loss: the mean over every real target token, and its sums per target word
  (vectors indexed by token id) for reading the loss word by word."""
  mean: float
  word_loss_sum: np.ndarray
  word_count: np.ndarray

  def by_word_class(self, vocab: vocab_lib.Vocabulary,
                    word_classes: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Mean loss over the targets that are words of each class, and over all 'other' targets (<END>
    included); classes none of whose words occur as targets are left out."""
    index = {w: i for i, w in enumerate(vocab.words)}
    in_class = np.zeros(len(self.word_count), bool)
    losses = {}
    for name, words in word_classes.items():
      ids = [index[w] for w in words if w in index]
      in_class[ids] = True
      count = self.word_count[ids].sum()
      if count:
        losses[name] = float(self.word_loss_sum[ids].sum() / count)
    other_count = self.word_count[~in_class].sum()
    if other_count:
      losses['other'] = float(self.word_loss_sum[~in_class].sum() / other_count)
    return losses


def split_loss(eval_fn, state, source, vocab, pipeline: input_pipeline.PipelineConfig, *,
               batch_size: int, mesh) -> SplitLoss:
  """Next-token loss over every (image, caption) pair of `source` (images or cached features, as
  `pipeline.from_features` says); `eval_fn` is `state.compile_eval_step(...)`."""
  batches = input_pipeline.eval_pair_batches(
      source, vocab, pipeline,
      host_batch_size=mesh_lib.per_host_batch_size(batch_size, mesh, 'eval_batch_size'),
      process_index=jax.process_index(), process_count=jax.process_count())
  totals = [eval_fn(state, batch)
            for batch, _ in mesh_lib.prefetch_to_mesh(((b, None) for b in batches), mesh)]
  totals = jax.device_get(totals)
  loss_sum = sum(float(t['loss_sum']) for t in totals)
  tokens = sum(float(t['tokens']) for t in totals)
  empty = [np.zeros(len(vocab))]  # a split with no pairs: no words either
  word_loss_sum = np.sum([np.asarray(t['word_loss_sum'], np.float64) for t in totals] or empty, axis=0)
  word_count = np.sum([np.asarray(t['word_count'], np.float64) for t in totals] or empty, axis=0)
  return SplitLoss(mean=loss_sum / max(tokens, 1.0), word_loss_sum=word_loss_sum, word_count=word_count)
