"""The loss-curve figure: cross-entropy runs plot train vs validation loss; SCST runs, whose train loss is
a policy-gradient surrogate, plot validation cross-entropy and the reward instead; demo runs add their
validation loss by word class."""

from capjax import progress


def _lines(ax) -> list[str]:
  return [line.get_label() for line in ax.get_lines()]


def test_cross_entropy_run_plots_train_and_validation_loss():
  history = [{'epoch': e, 'step': 10 * e, 'train_loss': 2.0 / e, 'val_loss': 2.1 / e} for e in (1, 2, 3)]
  (ax,) = progress.loss_curves_figure(history).axes
  assert _lines(ax) == ['train', 'validation']
  assert ax.get_ylabel() == 'cross-entropy per token'


def test_scst_run_does_not_plot_its_surrogate_loss_as_cross_entropy(tmp_path):
  history = [{'epoch': e, 'step': 10 * e, 'train_loss': -4.0 + e, 'val_loss': 0.5,
              'train_reward': 2.4 + e / 10, **({'CIDEr': 3.0} if e % 2 == 0 else {})} for e in (1, 2, 3, 4)]
  loss_ax, reward_ax = progress.loss_curves_figure(history).axes
  assert _lines(loss_ax) == ['validation']
  assert [min(line.get_ydata()) for line in loss_ax.get_lines()] == [0.5]  # never the negative surrogate
  assert len(_lines(reward_ax)) == 2 and 'reward' in _lines(reward_ax)[0]
  path = tmp_path / 'loss_curves.png'
  progress.plot_loss_curves(history, str(path))
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_demo_run_plots_its_validation_loss_by_word_class():
  history = [{'epoch': e, 'step': 10 * e, 'train_loss': 2.0 / e, 'val_loss': 2.1 / e,
              'val_loss_by_word': {'colour': 1.0 / e, 'shape': 1.1, 'other': 0.5 / e}} for e in (1, 2, 3)]
  loss_ax, words_ax = progress.loss_curves_figure(history).axes
  assert _lines(loss_ax) == ['train', 'validation']
  assert _lines(words_ax) == ['colour words', 'shape words', 'other words']
  assert list(words_ax.get_lines()[1].get_ydata()) == [1.1, 1.1, 1.1]


def test_the_epoch_line_says_what_its_end_cost_outside_the_train_step(capsys):
  record = {'epoch': 2, 'step': 20, 'train_loss': 1.5, 'val_loss': 1.25, 'CIDEr': 0.5}
  progress.log_epoch(record, None, overhead={'val loss': 1.04, 'checkpoint': 0.5, 'caption metrics': 7.0})
  assert capsys.readouterr().out.strip() == (
      'epoch 2 (step 20): train loss 1.5000  val loss 1.2500  CIDEr 0.5000  |  epoch end 8.5 s '
      '(val loss 1.0, checkpoint 0.5, caption metrics 7.0)')
  progress.log_epoch(record, None)  # a made-up epoch (metrics after a kill): no timing
  assert '|' not in capsys.readouterr().out


def test_the_eta_counts_the_epoch_ends_still_to_come():
  line = progress.Progress(total_steps=100, start_step=0, global_batch_size=8, steps_per_epoch=10)
  assert line.eta_seconds(10, rate=10.0) == 9.0  # no epoch end seen yet: steps only
  line.restart_clock(10, epoch_end_seconds=5.0)
  line.restart_clock(20, epoch_end_seconds=7.0)
  # 80 steps at 10/s, and 8 epoch ends (epochs 3..10) at their mean of 6 s.
  assert line.eta_seconds(20, rate=10.0) == 8.0 + 8 * 6.0
  assert line.eta_seconds(25, rate=10.0) == 7.5 + 8 * 6.0  # mid-epoch 3: its end is still to come
  assert progress.Progress(100, 0, 8).eta_seconds(20, rate=10.0) == 8.0
