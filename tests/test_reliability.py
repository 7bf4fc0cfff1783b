"""Reliability under hostile use (issue 12): a run never loses good work, never mixes two runs, and never
reads outside its inputs. One test (or more) per numbered item; each fails on the code before the fix.

The training runs share one small trained workdir (2 epochs, checkpoints at steps 5 and 10), copied for
each test that changes it.
"""

import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from capjax import checkpointing
from capjax import cli
from capjax import errors
from capjax import inference
from capjax import mesh as mesh_lib
from capjax.evaluation import metrics as metrics_lib
from capjax import state as state_lib
from capjax import train
from capjax import workdir as workdir_lib
from capjax.data import layouts
from capjax.data import prepare
from capjax.data import shapes
from capjax.evaluation import captioning
from capjax.evaluation import modes as evaluation_modes
from capjax.models import captioner
from configs import tiny

import flickr_fixtures as ff

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _config(**train_overrides):
  config = tiny.get_config()
  config.data.data_dir = 'relative_data'  # made absolute by training (item 11)
  config.train.metrics_every_epochs = 0
  config.train.best_metric, config.train.best_mode = 'val_loss', 'min'
  for key, value in train_overrides.items():
    config.train[key] = value
  return config


def _splits():
  return {s: list(shapes.generate_records(s, n, 48)) for s, n in [('train', 16), ('validation', 8),
                                                                    ('test', 8)]}


@pytest.fixture(scope='module')
def base(tmp_path_factory):
  """A finished 2-epoch run: 5 steps per epoch, checkpoints at 5 and 10."""
  workdir = tmp_path_factory.mktemp('base') / 'run'
  cwd = os.getcwd()
  os.chdir(workdir.parent)
  try:
    result = train.train_and_evaluate(_config(), str(workdir), _splits())
  finally:
    os.chdir(cwd)
  return workdir, result


@pytest.fixture
def run_copy(base, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(base[0], workdir)
  return workdir


def _finite_checkpoints(workdir) -> dict[int, bool]:
  ckpt = checkpointing.Checkpointer(str(workdir / 'checkpoints'), read_only=True)
  mesh = mesh_lib.make_mesh()
  model = captioner.build_captioner(tiny.get_config().model, len(workdir_lib.load_vocab(str(workdir))))
  target = checkpointing.abstract_like(captioner.abstract_variables(model, 32, 12), mesh_lib.replicated(mesh))
  return {s: all(np.isfinite(x).all() for x in jax.tree.leaves(ckpt.restore_variables(s, target)))
          for s in ckpt.all_steps()}


# ---------------------------------------------------------------------------- 1. NaN / Inf


def test_divergence_stops_the_run_naming_the_step_and_keeps_the_good_checkpoints(run_copy, base):
  config = _config(learning_rate=1e30, num_epochs=3)
  with pytest.raises(errors.TrainingDiverged, match=r'training diverged at step 1[1-5]: .*checkpoint 10'):
    train.train_and_evaluate(config, str(run_copy), _splits(),
                             allow_config_change=['train.learning_rate', 'train.num_epochs'])
  assert _finite_checkpoints(run_copy) == {5: True, 10: True}
  history = json.loads((run_copy / 'history.json').read_text())
  assert [h['epoch'] for h in history] == [1, 2]
  assert checkpointing.Checkpointer(str(run_copy / 'checkpoints'), best_metric='val_loss',
                                    best_mode='min', read_only=True).best_step() == 10


def test_a_non_finite_state_is_never_saved_and_nan_never_ranks_best(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=1, keep_best=1, best_metric='val_loss',
                                    best_mode='min')
  ckpt.save(1, {'w': np.ones(3, np.float32)})
  ckpt.record_metrics(1, {'val_loss': 2.0})
  with pytest.raises(errors.TrainingDiverged, match='refusing to save checkpoint 2'):
    ckpt.save(2, {'w': np.array([1.0, np.nan, 0.0], np.float32)})
  ckpt.save(3, {'w': np.ones(3, np.float32)})
  ckpt.record_metrics(3, {'val_loss': float('nan')})
  ckpt.save(4, {'w': np.ones(3, np.float32)})
  assert ckpt.all_steps() == [1, 4] and ckpt.best_step() == 1


def test_skip_nonfinite_drops_the_update_and_advances_the_step():
  config = _config()
  model = captioner.build_captioner(config.model, 30)
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  tx = state_lib.make_optimizer(config.train, lambda step: 1e-2, 'train')
  clean = state_lib.teacher_forced_logits(model)
  poisoned = lambda variables, batch, **kw: jax.tree.map(lambda x: x * np.nan, clean(variables, batch, **kw))
  rng = np.random.default_rng(0)
  batch = mesh_lib.host_batch_to_global(
      {'image': rng.integers(0, 255, (4, 32, 32, 3), np.uint8),
       'tokens': np.tile(np.array([1, 5, 6, 7, 2, 0, 0, 0, 0, 0, 0, 0], np.int32), (4, 1))}, mesh)
  for skip, expect_same in ((True, True), (False, False)):
    state = state_lib.create_train_state(model, tx, 0, 32, 12, mesh)
    before = jax.device_get(state.params)
    step = state_lib.compile_train_step(poisoned, tx, mesh, skip_nonfinite=skip)
    state, metrics = step(state, batch)
    assert int(state.step) == 1 and not np.isfinite(float(metrics['loss']))
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                     jax.tree.leaves(jax.device_get(state.params))))
    assert same == expect_same


# --------------------------------------------------- 2, 3. refused resumes, config and vocabulary identity


def test_a_changed_config_is_refused_with_a_diff_and_nothing_is_rewritten(run_copy):
  before = {name: (run_copy / name).read_bytes() for name in ('config.json', 'vocab.json', 'history.json')}
  with pytest.raises(errors.ConfigMismatch) as refused:
    train.train_and_evaluate(_config(learning_rate=0.01, num_epochs=3), str(run_copy), _splits())
  message = str(refused.value)
  assert 'train.learning_rate: 0.002 -> 0.01' in message and 'train.num_epochs: 2 -> 3' in message
  assert '--allow_config_change=train.learning_rate,train.num_epochs' in message
  assert {name: (run_copy / name).read_bytes() for name in before} == before
  assert not (run_copy / 'tensorboard').exists() or len(list((run_copy / 'tensorboard').iterdir())) == 1
  with pytest.raises(errors.ConfigMismatch, match='cannot change in a resumed run'):
    config = _config(num_epochs=3)
    config.data.image_size = 48
    train.train_and_evaluate(config, str(run_copy), _splits(),
                             allow_config_change=['data.image_size', 'train.num_epochs'])


def test_an_allowed_change_resumes_and_is_recorded_once(run_copy, base):
  result = train.train_and_evaluate(_config(num_epochs=3, learning_rate=1e-3), str(run_copy), _splits(),
                                    allow_config_change=['train.num_epochs', 'train.learning_rate'])
  epochs = [h['epoch'] for h in result.history]
  assert epochs == [1, 2, 3]
  assert result.history[2]['config_changes'] == {'train.learning_rate': [0.002, 0.001],
                                                 'train.num_epochs': [2, 3]}
  assert json.loads((run_copy / 'config.json').read_text())['train']['learning_rate'] == 1e-3
  # Relative data paths are stored absolute (item 11).
  assert os.path.isabs(json.loads((run_copy / 'config.json').read_text())['data']['data_dir'])


def test_a_permuted_vocabulary_is_detected_by_resume_and_eval(run_copy):
  payload = json.loads((run_copy / 'vocab.json').read_text())
  words = payload['words']
  words[4], words[5] = words[5], words[4]
  payload['fingerprint'] = workdir_lib.vocab_lib.Vocabulary(tuple(words)).fingerprint()  # re-declared
  (run_copy / 'vocab.json').write_text(json.dumps(payload))
  with pytest.raises(errors.ConfigMismatch, match='vocab.json does not hold the vocabulary'):
    train.train_and_evaluate(_config(), str(run_copy), _splits())
  with pytest.raises(errors.ConfigMismatch, match='vocab.json does not hold the vocabulary'):
    inference.restore_variables(str(run_copy), 'latest', mesh_lib.make_mesh())


# ------------------------------------------------------------ 4, 5, 6. metrics, corruption, stale files


def _truncate_array_files(folder: pathlib.Path) -> None:
  """What a disk filling up mid-write (outside orbax's atomic rename) leaves: truncated array data."""
  data_files = [p for p in folder.rglob('*') if p.is_file() and p.parent.name == 'd']
  assert data_files
  for path in data_files:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 3])


def test_corrupted_latest_checkpoint_falls_back_and_metric_failures_cost_nothing(run_copy, base, monkeypatch,
                                                                                 capsys):
  _truncate_array_files(run_copy / 'checkpoints' / '10' / 'state')
  (run_copy / 'checkpoints' / '12.orbax-checkpoint-tmp-1234').mkdir()  # a killed save's leftover

  # eval: 'latest' falls back with one line; an explicit broken step is one clear error.
  _, _, _, _, step = inference.restore_variables(str(run_copy), 'latest', mesh_lib.make_mesh())
  assert step == 5
  assert 'checkpoint 10 in' in capsys.readouterr().out
  with pytest.raises(errors.CheckpointError, match=r'^checkpoint 10 in .* cannot be restored: \w+'):
    inference.restore_variables(str(run_copy), 10, mesh_lib.make_mesh())

  def failing_metrics(*args, **kwargs):
    raise ValueError('max() arg is an empty sequence')
  monkeypatch.setattr(captioning, 'validation_metrics', failing_metrics)
  config = _config()
  config.train.metrics_every_epochs = 1  # operational: not part of the run's identity
  resumed = train.train_and_evaluate(config, str(run_copy), _splits())
  out = capsys.readouterr().out
  assert 'checkpoint 10 in' in out and 'trying 5' in out and 'unfinished checkpoint' in out
  assert sorted(resumed.step_losses) == list(range(6, 11))
  for step_ in range(6, 11):  # the replayed steps are those of the unbroken run
    assert resumed.step_losses[step_] == pytest.approx(base[1].step_losses[step_], rel=1e-6)
  assert (run_copy / 'checkpoints_unreadable' / '10').is_dir()  # kept, not deleted
  assert not (run_copy / 'checkpoints' / '12.orbax-checkpoint-tmp-1234').exists()
  assert 'Warning: epoch 2: caption metrics failed' in out
  assert resumed.history[-1]['metrics_error'].startswith('ValueError')
  assert 10 in checkpointing.Checkpointer(str(run_copy / 'checkpoints'), read_only=True).all_steps()


def test_explicit_broken_step_is_one_line_from_the_command_line(run_copy):
  _truncate_array_files(run_copy / 'checkpoints' / '10' / 'state')
  proc = subprocess.run([sys.executable, str(ROOT / 'launch.py'), '--mode=caption', f'--workdir={run_copy}',
                         f'--images={ROOT / "README.md"}', '--checkpoint_step=10'],
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=''))
  assert proc.returncode == 1
  errors_printed = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors_printed) == 1 and errors_printed[0].startswith('error: checkpoint 10 in'), proc.stderr
  assert 'Traceback' not in proc.stderr and 'never retrieved' not in proc.stderr, proc.stderr[-3000:]


def test_a_second_training_process_is_refused_naming_the_holder(run_copy):
  holder = subprocess.Popen([sys.executable, '-c', textwrap.dedent(f'''
      import sys, time
      sys.path.insert(0, {str(ROOT)!r})
      from capjax import workdir
      with workdir.training_lock({str(run_copy)!r}):
        print('locked', flush=True)
        time.sleep(120)
      ''')], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(errors.WorkdirLocked, match=f'pid {holder.pid} on '):
      train.train_and_evaluate(_config(), str(run_copy), _splits())
  finally:
    holder.kill()
    holder.wait()
  # The lock dies with its process: no stale lock.
  with workdir_lib.training_lock(str(run_copy)):
    pass


def test_stale_tfds_builds_are_reported(tmp_path, capsys):
  kwargs = dict(num_train=4, num_validation=2, num_test=2, image_size=16)
  summary = prepare.prepare_dataset('shapes', tmp_path, **kwargs)
  leftover = pathlib.Path(summary['data_path']).parent / 'incomplete.ABC123_1.0.0'
  leftover.mkdir()
  prepare.prepare_dataset('shapes', tmp_path, **kwargs)
  assert f'{leftover} is an unfinished dataset build' in capsys.readouterr().out


# ------------------------------------------------------------ 7. train loss of a resumed epoch: test_train.py
# ------------------------------------------------------------ 8. best_metric


@pytest.mark.parametrize('metric, mode, message', [('cidr', 'max', 'is not a metric a training epoch'),
                                                    ('val_loss', 'max', "use best_mode='min'")])
def test_best_metric_is_validated_before_anything_is_written(tmp_path, metric, mode, message):
  config = _config(best_metric=metric, best_mode=mode)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / 'run'), _splits())
  assert not (tmp_path / 'run').exists()


# ------------------------------------------------------------ 9. path traversal


def test_image_names_cannot_leave_the_dataset_folder(tmp_path):
  outside = tmp_path / 'outside.jpg'
  outside.write_bytes(ff.image_file_bytes('rgb', seed=3))
  root = tmp_path / 'manual'
  ff.write_images(root / 'Images', {f'{i}.jpg': 'rgb' for i in range(8)})
  rows = ['image,caption'] + [f'{i}.jpg,a picture' for i in range(8)]
  rows += ['../outside.jpg,an outside picture', f'{outside},an absolute path',
           'Images/../../outside.jpg,sneaky']
  (root / 'captions.txt').write_text('\n'.join(rows) + '\n')
  records, report = layouts.read_records(root, dataset='flickr30k')
  assert {r.image_id for r in records} == {f'{i}.jpg' for i in range(8)}
  assert {item.name for item in report.skipped if item.reason == layouts.UNSAFE_PATH} == {
      '../outside.jpg', str(outside), 'Images/../../outside.jpg'}


# ------------------------------------------------------------ 10, 11. config and data paths


def test_the_default_config_is_the_checkouts_not_the_working_directorys(tmp_path):
  marker = tmp_path / 'executed'
  (tmp_path / 'configs').mkdir()
  (tmp_path / 'configs' / 'demo.py').write_text(f'open({str(marker)!r}, "w").write("x")\n')
  proc = subprocess.run([sys.executable, str(ROOT / 'launch.py'), '--mode=eval', '--workdir=nowhere'],
                        cwd=tmp_path, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=''))
  assert not marker.exists()
  assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith('error: ')
  assert 'config.json not found' in proc.stderr


def test_eval_never_rebuilds_missing_demo_data(run_copy, tmp_path, monkeypatch):
  config = json.loads((run_copy / 'config.json').read_text())
  config['data']['data_dir'] = str(tmp_path / 'gone')
  (run_copy / 'config.json').write_text(json.dumps(config))
  monkeypatch.chdir(tmp_path)
  with pytest.raises(FileNotFoundError, match='a demo training run builds it'):
    evaluation_modes.evaluate_workdir(str(run_copy), checkpoint='latest', beam_size=1)
  assert not (tmp_path / 'gone').exists()


# ------------------------------------------------------------ 12. 16-bit PNGs: test_images.py
# ------------------------------------------------------------ 13. caption mode


def test_caption_mode_streams_in_batches_and_fails_clearly(run_copy, tmp_path, monkeypatch):
  folder = tmp_path / 'photos'
  ff.write_images(folder, {f'{i:02d}.jpg': 'rgb' for i in range(11)})
  (folder / 'zz_notes.txt').write_text('not an image')
  batches = []
  real_from, real_caption = inference.ImageCaptioner.from_workdir, inference.ImageCaptioner.caption

  def counting_caption(self, loaded):
    batches.append(len(loaded))
    return real_caption(self, loaded)
  monkeypatch.setattr(inference.ImageCaptioner, 'caption', counting_caption)
  monkeypatch.setattr(inference.ImageCaptioner, 'from_workdir',
                      classmethod(lambda cls, *a, **k: real_from(*a, **{**k, 'batch_size': 4})))
  rows = cli.caption_images(str(run_copy), str(folder), beam_size=1, checkpoint='latest')
  assert sum('caption' in r for r in rows) == 11 and sum('error' in r for r in rows) == 1
  assert batches == [4, 4, 3]  # files are read a batch at a time, never all at once

  def no_model(*args, **kwargs):
    raise AssertionError('the model must not be loaded for bad arguments')
  monkeypatch.setattr(inference.ImageCaptioner, 'from_workdir', no_model)
  with pytest.raises(errors.InputError, match='does not exist'):
    cli.caption_images(str(run_copy), str(folder), output=str(tmp_path / 'no' / 'such' / 'out.jsonl'))
  with pytest.raises(errors.InputError, match='matches no file'):
    cli.caption_images(str(run_copy), str(tmp_path / '*.png'))


def test_caption_mode_exits_non_zero_when_nothing_could_be_captioned(run_copy, tmp_path):
  (tmp_path / 'a.jpg').write_text('not an image')
  with pytest.raises(errors.InputError, match='none of the 1 file'):
    cli.caption_images(str(run_copy), str(tmp_path / 'a.jpg'), beam_size=1, checkpoint='latest')


# ------------------------------------------------------------ 14. the Java tokenizer writes nothing


def _listing(folder: pathlib.Path) -> dict:
  return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_java_tokenizer_writes_nothing_next_to_its_jar_and_matches_pycocoevalcap():
  from pycocoevalcap.tokenizer import ptbtokenizer  # pylint: disable=import-outside-toplevel
  package = pathlib.Path(ptbtokenizer.__file__).parent
  before = _listing(package)
  mode = package.stat().st_mode
  captions = {'1': ["A man's dog, running!", 'Two "kids" (playing)'], '2': ['', 'It costs $5.00.']}
  try:
    package.chmod(stat.S_IRUSR | stat.S_IXUSR)  # read-only (root can still write: the listing decides)
    ours = metrics_lib.tokenize_captions(captions, use_ptb=True)
  finally:
    package.chmod(mode)
  assert _listing(package) == before
  theirs = ptbtokenizer.PTBTokenizer().tokenize(
      {i: [{'caption': c} for c in cs] for i, cs in captions.items()})
  assert ours == theirs


def test_a_broken_java_falls_back_to_the_python_tokenizer(tmp_path, monkeypatch, caplog):
  fake = tmp_path / 'java'
  fake.write_text('#!/bin/sh\necho "Error: broken JVM" >&2\nexit 1\n')
  fake.chmod(0o755)
  monkeypatch.setenv('PATH', f'{tmp_path}:{os.environ["PATH"]}')
  scores = metrics_lib.compute_caption_metrics({'1': 'a dog runs'}, {'1': ['a dog runs', 'a dog']},
                                               metrics=('bleu', 'cider', 'meteor'), on_error='warn')
  assert set(scores) == {'Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'CIDEr'}
  assert 'broken JVM' in caplog.text and 'pure-Python' in caplog.text
