"""What a run tells its user: progress lines with ETA, epoch summaries, TensorBoard, loss curves."""

import math
import os
import time

from absl import logging
import jax
from matplotlib.figure import Figure
import numpy as np
from tensorboardX import SummaryWriter


def say(message: str) -> None:
  """One line for the person watching (process 0 only)."""
  if jax.process_index() == 0:
    print(message, flush=True)
  logging.debug(message)


def _format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  return f'{hours}h{rest // 60:02d}m' if hours else f'{rest // 60}m{rest % 60:02d}s'


class Progress:
  """Periodic progress line: loss, steps/s, images/s and ETA; throughput excludes the first
  (compiling) interval so the numbers describe the steady state. The ETA adds the epoch ends still to
  come at the mean cost of those so far (validation, checkpoint, metrics: on a fast accelerator they,
  not the steps, decide the wall clock)."""

  def __init__(self, total_steps: int, start_step: int, global_batch_size: int,
               steps_per_epoch: int | None = None):
    self.total_steps, self.batch, self.steps_per_epoch = total_steps, global_batch_size, steps_per_epoch
    self._last_step, self._last_time = start_step, time.perf_counter()
    self._steady_rate = None
    self._epoch_end_seconds, self._epoch_ends = 0.0, 0

  def restart_clock(self, step: int, epoch_end_seconds: float | None = None) -> None:
    """Excludes evaluation pauses (`epoch_end_seconds` long, counted for the ETA) from the training
    throughput."""
    self._last_step, self._last_time = step, time.perf_counter()
    if epoch_end_seconds is not None:
      self._epoch_end_seconds += epoch_end_seconds
      self._epoch_ends += 1

  def eta_seconds(self, step: int, rate: float) -> float:
    """Steps left at `rate`, plus the epoch ends left at their mean cost so far."""
    eta = (self.total_steps - step) / max(rate, 1e-9)
    if self.steps_per_epoch and self._epoch_ends:
      ends_left = -(-self.total_steps // self.steps_per_epoch) - step // self.steps_per_epoch
      eta += ends_left * self._epoch_end_seconds / self._epoch_ends
    return eta

  def update(self, step: int, fetched_metrics: list[dict], learning_rate, writer) -> None:
    now = time.perf_counter()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    first_interval = self._steady_rate is None
    self._steady_rate = rate
    self._last_step, self._last_time = step, now
    # Skipped (non-finite) steps are not among `fetched_metrics`; all of an interval may be.
    means = {k: float(np.mean([float(m[k]) for m in fetched_metrics])) if fetched_metrics else math.nan
             for k in (fetched_metrics[0] if fetched_metrics else {'loss': 0, 'grad_norm': 0})
             if k != 'tokens'}
    # What else a step reports (an attention penalty, SCST's reward and baseline ...) joins the line.
    extras = ''.join(f'  {k} {v:.4f}' for k, v in means.items() if k not in ('loss', 'grad_norm'))
    eta = self.eta_seconds(step, rate)
    note = ' (incl. compile)' if first_interval else ''
    say(f"step {step}/{self.total_steps}  loss {means['loss']:.4f}{extras}  |  {rate:.2f} steps/s  "
        f'{rate * self.batch:.1f} img/s{note}  |  ETA {_format_seconds(eta)}')
    if writer is not None:
      for key, value in means.items():
        writer.add_scalar(f'train/{key}', value, step)
      writer.add_scalar('train/learning_rate', float(learning_rate), step)
      writer.add_scalar('train/steps_per_second', rate, step)
      writer.add_scalar('train/images_per_second', rate * self.batch, step)


def log_epoch(record: dict, writer, overhead: dict[str, float] | None = None) -> None:
  """The epoch's line, and its numbers in TensorBoard (notes such as config changes are in history.json).
  `overhead`: the seconds each part of the epoch's end took, outside the train step (on the line and in
  TensorBoard, not in the record: history.json stays the same whatever the machine's speed)."""
  numbers = {k: v for k, v in record.items()
             if isinstance(v, (int, float)) and k not in ('epoch', 'step')}
  by_word_class = record.get('val_loss_by_word', {})
  extras = '  '.join(f'{k} {v:.4f}' for k, v in numbers.items() if k not in ('train_loss', 'val_loss'))
  by_class = ', '.join(f'{k} {v:.3f}' for k, v in by_word_class.items())
  outside = ''
  if overhead:
    parts = ', '.join(f'{part} {seconds:.1f}' for part, seconds in overhead.items())
    outside = f'  |  epoch end {sum(overhead.values()):.1f} s ({parts})'
  say(f"epoch {record['epoch']} (step {record['step']}): train loss {record['train_loss']:.4f}  "
      f"val loss {record['val_loss']:.4f}{f' ({by_class} words)' if by_class else ''}  {extras}".rstrip()
      + outside)
  if writer is not None:
    for part, seconds in (overhead or {}).items():
      writer.add_scalar(f"epoch/seconds_{part.replace(' ', '_')}", seconds, record['step'])
    for key, value in numbers.items():
      writer.add_scalar(f'epoch/{key}', value, record['step'])
    for word_class, value in by_word_class.items():
      writer.add_scalar(f'epoch/val_loss_{word_class}_words', value, record['step'])
    writer.flush()


def make_writer(workdir: str):
  if jax.process_index() != 0:
    return None
  return SummaryWriter(os.path.join(workdir, 'tensorboard'))


def close_writer(writer) -> None:
  if writer is not None:
    writer.close()


def plot_loss_curves(history: list[dict], path: str) -> None:
  """Writes `loss_curves_figure(history)` to `path`."""
  loss_curves_figure(history).savefig(path, dpi=120)


def loss_curves_figure(history: list[dict]) -> Figure:
  """Train vs validation loss per epoch, like the seed's figure. An SCST run's train loss is the policy
  gradient surrogate, not a cross-entropy: its figure shows the validation cross-entropy beside the mean
  sample reward (train) and the validation CIDEr instead. When the history has the validation loss by
  word class (the demo data: colour, shape, size, position words), a panel shows which words the model
  is still learning."""
  epochs = [h['epoch'] for h in history]
  scst = any('train_reward' in h for h in history)
  word_classes = list(dict.fromkeys(c for h in history for c in h.get('val_loss_by_word', {})))
  panels = 1 + scst + bool(word_classes)
  fig = Figure(figsize=(4 + 3.5 * panels if panels > 1 else 7, 4.5))
  axes = list(np.atleast_1d(fig.subplots(1, panels)))
  ax = axes.pop(0)
  if not scst:
    ax.plot(epochs, [h['train_loss'] for h in history], marker='o', label='train')
  ax.plot(epochs, [h['val_loss'] for h in history], marker='o', label='validation')
  ax.set_ylabel('cross-entropy per token')
  _finish_panel(ax, 'Validation cross-entropy (SCST)' if scst else 'Training vs validation loss')
  if scst:
    reward_ax = axes.pop(0)
    reward_ax.plot(epochs, [h.get('train_reward', float('nan')) for h in history], marker='o',
                   label='train: mean sample reward (CIDEr-D)')
    reward_ax.plot(epochs, [h.get('CIDEr', float('nan')) for h in history], marker='o',
                   label='validation CIDEr (greedy)')
    _finish_panel(reward_ax, 'SCST reward')
  if word_classes:
    words_ax = axes.pop(0)
    for word_class in word_classes:
      words_ax.plot(epochs, [h.get('val_loss_by_word', {}).get(word_class, float('nan')) for h in history],
                    marker='o', label=f'{word_class} words')
    words_ax.set_ylabel('cross-entropy per word')
    _finish_panel(words_ax, 'Validation loss by word class')
  fig.tight_layout()
  return fig


def _finish_panel(ax, title: str) -> None:
  ax.set_xlabel('epoch')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
