"""Throughput paths (issue 15): one encoder pass for an image's K captions, augmentation on the device,
device-resident training images. Each must train exactly what it claims."""

import jax
import numpy as np
import optax
import pytest

from capjax import input_pipeline
from capjax import mesh as mesh_lib
from capjax import state as state_lib
from capjax import train
from capjax import vocab as vocab_lib
from capjax.data import shapes
from capjax.models import captioner
from configs import tiny


def _source(n=8):
  return list(shapes.generate_records('train', n, 48))


def _vocab(source):
  return vocab_lib.build_vocabulary([c for r in source for c in r['captions']], min_count=1)


def _batches(source, count=1, **overrides):
  cfg = dict(image_size=32, max_caption_len=12, captions_per_image=5, seed=3,
             augment=input_pipeline.AugmentConfig(crop_scale=(1, 1), crop_ratio=(1, 1), flip_prob=0,
                                                  brightness=0, contrast=0, rotation_degrees=0))
  cfg.update(overrides)
  iterator = input_pipeline.make_train_iterator(source, _vocab(source), input_pipeline.PipelineConfig(**cfg),
                                                host_batch_size=4)
  return [next(iterator) for _ in range(count)]


def test_an_example_holds_an_image_and_k_of_its_captions():
  source = _source()
  vocab = _vocab(source)
  (batch,) = _batches(source, seq_per_img=5)
  assert batch['image'].shape == (4, 32, 32, 3) and batch['tokens'].shape == (4, 5, 12)
  decoded = {tuple(vocab.decode(row) for row in rows) for rows in batch['tokens']}
  references = {tuple(' '.join(vocab_lib.tokenize(c)) for c in r['captions']) for r in source}
  assert decoded <= references  # all five captions of one image, in order
  # K=2 of 5 captions: 3 examples per image and epoch, captions (0,1) (2,3) (4,0).
  epoch = _batches(source, count=6, seq_per_img=2)
  assert sum(len(b['tokens']) for b in epoch) == 8 * 3
  groups = input_pipeline._pick_captions({'captions': list('abcde')}, 2, 2, None)
  assert groups == ['e', 'a']
  drawn = input_pipeline._pick_captions({'captions': list('abcde')}, -1, 3, np.random.default_rng(0))
  assert len(set(drawn)) == 3  # without replacement


def test_device_augmentation_ships_fixed_size_images_and_device_resident_ships_indices():
  source = _source()
  (host,) = _batches(source, seq_per_img=5, augment_on_device=True, store_size=40)
  assert host['image'].shape == (4, 40, 40, 3) and host['image'].dtype == np.uint8
  (indexed,) = _batches(input_pipeline.CaptionsOnly(source), seq_per_img=5, augment_on_device=True,
                        store_size=40, device_resident=True)
  assert set(indexed) == {'index', 'tokens'} and indexed['index'].dtype == np.int32
  table = input_pipeline.image_table(source, 40)
  np.testing.assert_array_equal(table[indexed['index']], host['image'])  # the same images, same order
  np.testing.assert_array_equal(indexed['tokens'], host['tokens'])


def _setup(devices, vocab_size=30):
  config = tiny.get_config()
  mesh = mesh_lib.make_mesh(devices)
  model = captioner.build_captioner(config.model, vocab_size)
  tx = state_lib.make_optimizer(config.train, optax.constant_schedule(1e-3), 'train')
  return mesh, model, tx, state_lib.create_train_state(model, tx, 0, 32, 12, mesh)


def _tokens(rng, shape, vocab_size=30):
  tokens = rng.integers(4, vocab_size, shape + (12,)).astype(np.int32)
  tokens[..., 0] = vocab_lib.START_ID
  lengths = rng.integers(3, 11, shape)
  for index in np.ndindex(shape):
    tokens[index][lengths[index]] = vocab_lib.END_ID
    tokens[index][lengths[index] + 1:] = vocab_lib.PAD_ID
  return tokens


def test_shared_pass_loss_and_gradients_equal_the_pairs_on_repeated_images():
  """B images x K captions in one pass == the B*K (image, caption) pairs with each image repeated K
  times: same loss and gradients (BatchNorm statistics are unchanged by repeating every image)."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (8, 32, 32, 3), np.uint8)
  tokens = _tokens(rng, (8, 3))
  _, model, _, state = _setup(jax.devices()[:1])
  logits_fn = state_lib.teacher_forced_logits(model)

  def loss_and_grads(batch):
    def loss_fn(params):
      logits, _ = logits_fn({'params': params, 'batch_stats': state.batch_stats}, batch, train=True,
                            mutable=['batch_stats'])
      loss_sum, count = state_lib.token_cross_entropy(logits, batch['tokens'])
      return loss_sum / count
    return jax.jit(jax.value_and_grad(loss_fn))(state.params)

  loss_a, grads_a = loss_and_grads({'image': images, 'tokens': tokens})
  loss_b, grads_b = loss_and_grads({'image': np.repeat(images, 3, axis=0), 'tokens': tokens.reshape(24, 12)})
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads_b))  # leaves of pure float noise
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):  # exist (zero-init BN scales)
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * scale)


def test_shared_pass_eight_devices_equal_one():
  rng = np.random.default_rng(1)
  batch = {'image': rng.integers(0, 255, (8, 32, 32, 3), np.uint8), 'tokens': _tokens(rng, (8, 5))}
  losses = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh, model, tx, state = _setup(devices)
    step = state_lib.compile_train_step(state_lib.teacher_forced_logits(model), tx, mesh)
    for _ in range(2):
      state, metrics = step(state, mesh_lib.host_batch_to_global(batch, mesh))
    losses.append(float(metrics['loss']))
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)


def _config(**data):
  config = tiny.get_config()
  config.data.seq_per_img = 5
  config.data.augment.on_device = True
  config.data.store_size = 40
  config.train.batch_size = 8
  config.train.num_epochs = 2
  config.train.metrics_every_epochs = 0
  config.train.best_metric, config.train.best_mode = 'val_loss', 'min'
  config.train.checkpoint_every_steps = 1
  for key, value in data.items():
    config.data[key] = value
  return config


def _splits():
  return {s: list(shapes.generate_records(s, n, 48)) for s, n in [('train', 24), ('validation', 8),
                                                                    ('test', 8)]}


def test_device_resident_training_equals_host_fed_and_resumes_exactly(tmp_path, monkeypatch, capsys):
  """Host-fed (device augmentation, K=5) vs device-resident images, killed after 3 steps and resumed:
  the same numbers at every step, the whole epoch's train loss after the resume."""
  splits = _splits()
  fed = train.train_and_evaluate(_config(), str(tmp_path / 'fed'), splits)
  assert len(fed.step_losses) == 6  # 24 images / 8 per batch, 2 epochs
  real_draw = train._draw_batches

  def killed_after_3_steps(iterator, count):
    for i, item in enumerate(real_draw(iterator, count)):
      if i == 4:  # one batch is drawn ahead: steps 1-3 ran, checkpoint 3 is saved
        raise KeyboardInterrupt('simulated kill')
      yield item
  monkeypatch.setattr(train, '_draw_batches', killed_after_3_steps)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(_config(device_resident=True), str(tmp_path / 'resident'), splits)
  assert 'Device-resident data: 24 training images' in capsys.readouterr().out
  monkeypatch.setattr(train, '_draw_batches', real_draw)
  resumed = train.train_and_evaluate(_config(device_resident=True), str(tmp_path / 'resident'), splits)
  assert sorted(resumed.step_losses) == [4, 5, 6]
  for step, loss in resumed.step_losses.items():  # same images, same augmentation keys: same numbers
    assert loss == pytest.approx(fed.step_losses[step], rel=1e-6), step
  assert [h['train_loss'] for h in resumed.history] == pytest.approx([h['train_loss'] for h in fed.history],
                                                                     rel=1e-6)


def test_device_resident_falls_back_to_the_host_when_the_images_do_not_fit(capsys):
  assert train._device_resident(_config(device_resident=True), 24)
  assert not train._device_resident(_config(device_resident=True, device_resident_max_gb=1e-4), 24)
  assert 'Device-resident data off: the training images need' in capsys.readouterr().out
  assert not train._device_resident(_config(), 24)
