"""Imported torch weights compute what torch computes: torchvision ResNet50 -> our trunk, nn.LSTM -> LSTM.

Tolerance. Both sides run float32 on CPU (jax at 'highest' matmul precision; torch's CPU default is
full float32) but sum in different orders, so they differ by float32 rounding that grows through 50
layers. The torch network's BatchNorm statistics are calibrated so that activations stay O(1) on
average, as in a trained network (the largest final-map value here is about 67). We require
max abs error <= 1e-4 * max |torch activation|; measured: about 8e-6 of it for the 7x7x2048 map
(5e-4 absolute) and 2e-6 for the pooled features. A mapping bug (mean/var swapped, a kernel's H and
W swapped, a shifted padding) gives errors of the order of the activations themselves.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')
safetensors_torch = pytest.importorskip('safetensors.torch')

from capjax import pretrained  # noqa: E402  pylint: disable=g-import-not-at-top
from capjax.models import captioner  # noqa: E402  pylint: disable=g-import-not-at-top
from capjax.models import lstm  # noqa: E402  pylint: disable=g-import-not-at-top
from capjax.models import resnet  # noqa: E402  pylint: disable=g-import-not-at-top

IMAGE_SIZE = 224
RELATIVE_TOLERANCE = 1e-4  # of the largest reference activation; see the module docstring.


def _calibrate_and_randomise_batchnorm(model, generator):
  """Random BN affine params and running stats, near the real statistics of random inputs.

  Fresh BatchNorm (mean 0, var 1, scale 1, bias 0) is nearly the identity and would hide mapping
  bugs; purely random statistics make activations grow to O(500) over 16 blocks. So: measure the
  statistics of one training-mode pass, then perturb every one of them.
  """
  norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for norm in norms:
      norm.weight.uniform_(0.5, 1.5, generator=generator)
      norm.bias.normal_(0.0, 0.2, generator=generator)
      norm.reset_running_stats()
      norm.momentum = None  # Cumulative average: after one pass, exactly that batch's statistics.
    model.train()
    model(torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator))
    model.eval()
    for norm in norms:
      norm.momentum = 0.1
      std = norm.running_var.sqrt()
      norm.running_mean.add_(0.2 * std * torch.randn(norm.num_features, generator=generator))
      norm.running_var.mul_(torch.empty(norm.num_features).uniform_(0.5, 2.0, generator=generator))


@pytest.fixture(scope='module')
def torch_resnet50():
  torch.manual_seed(0)
  model = torchvision.models.resnet50(weights=None)
  _calibrate_and_randomise_batchnorm(model, torch.Generator().manual_seed(1))
  return model.eval()


@pytest.fixture(scope='module')
def resnet50_files(torch_resnet50, tmp_path_factory):
  folder = tmp_path_factory.mktemp('weights')
  state_dict = torch_resnet50.state_dict()
  torch.save(state_dict, folder / 'resnet50.pth')
  safetensors_torch.save_file(state_dict, str(folder / 'resnet50.safetensors'))
  return {'pth': folder / 'resnet50.pth', 'safetensors': folder / 'resnet50.safetensors',
          'folder': folder, 'state_dict': state_dict}


@pytest.fixture(scope='module')
def images():
  """Two uint8 RGB images: noise, and a smooth colour gradient (unequal channels catch RGB/BGR)."""
  noise = np.random.default_rng(0).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
  ramp = np.linspace(0, 1, IMAGE_SIZE, dtype=np.float32)
  gradient = np.stack([np.outer(ramp, np.ones_like(ramp)), np.outer(np.ones_like(ramp), ramp),
                       np.outer(ramp, ramp)], axis=-1)
  return np.stack([noise, (gradient * 255).astype(np.uint8)])


def _torch_trunk_outputs(model, images):
  """torchvision's own preprocessing convention: x/255, then ImageNet mean/std. -> NHWC map, pooled."""
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
  x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor(
      [0.229, 0.224, 0.225])[:, None, None]
  trunk = torch.nn.Sequential(*list(model.children())[:-2])
  with torch.no_grad():
    feature_map = trunk(x)
    pooled = torch.flatten(model.avgpool(feature_map), 1)
  return feature_map.permute(0, 2, 3, 1).numpy(), pooled.numpy()


def _abstract_variables(model, image_size=32):
  """The model's variables as shapes only: nothing runs, so even ResNet50 costs no time."""
  return jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3), jnp.uint8),
      jnp.zeros((1, 3), jnp.int32), train=False))


def _captioner_variables(model):
  """A full variables tree of zeros (real arrays), built without running the network."""
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), _abstract_variables(model))


def _our_trunk_outputs(model, variables, images):
  def trunk_outputs(module, images):
    feature_map = module.encoder.trunk(captioner.normalize_images(images, jnp.float32), train=False)
    return feature_map, module.encoder.pooled_trunk_features(images)
  with jax.default_matmul_precision('highest'):
    apply = jax.jit(lambda v, x: model.apply(v, x, method=trunk_outputs))
    return jax.tree.map(np.asarray, apply(variables, images))


def _assert_close(ours, reference, what):
  error = np.max(np.abs(ours - reference))
  scale = np.max(np.abs(reference))
  print(f'{what}: max abs error {error:.3g}, max |activation| {scale:.3g}, ratio {error / scale:.3g}')
  assert error <= RELATIVE_TOLERANCE * scale, (what, error, scale)


def test_resnet50_import_matches_torchvision(torch_resnet50, resnet50_files, images):
  model = captioner.Captioner(vocab_size=10)  # ResNet50 trunk, default widths.
  variables = _captioner_variables(model)
  loaded = pretrained.load_encoder_init(resnet50_files['pth'], variables)
  # Only the trunk changes: the rest of the tree is passed through as it was.
  assert loaded['params']['decoder'] is variables['params']['decoder']
  assert loaded['params']['encoder']['projection'] is variables['params']['encoder']['projection']

  torch_map, torch_pooled = _torch_trunk_outputs(torch_resnet50, images)
  our_map, our_pooled = _our_trunk_outputs(model, loaded, images)
  assert our_map.shape == torch_map.shape == (2, 7, 7, 2048)
  assert our_pooled.shape == torch_pooled.shape == (2, 2048)
  _assert_close(our_map, torch_map, 'feature map')
  _assert_close(our_pooled, torch_pooled, 'pooled features')


def test_safetensors_and_pth_give_the_same_arrays(resnet50_files):
  from_pth = pretrained.load_torch_state_dict(resnet50_files['pth'])
  from_safetensors = pretrained.load_torch_state_dict(resnet50_files['safetensors'])
  assert from_pth.keys() == from_safetensors.keys()
  for name, array in from_pth.items():
    np.testing.assert_array_equal(array, from_safetensors[name], err_msg=name)
  assert from_pth['conv1.weight'].dtype == np.float32


def test_converted_tree_is_exactly_our_resnet50_tree(resnet50_files):
  converted = pretrained.resnet_variables_from_torch(resnet50_files['state_dict'])
  expected = jax.eval_shape(lambda: resnet.ResNet().init(
      jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
  shapes = lambda tree: jax.tree.map(lambda x: (tuple(x.shape), x.dtype), tree)  # noqa: E731
  assert shapes(converted) == shapes(expected)


def test_lstm_import_matches_torch():
  torch.manual_seed(0)
  torch_lstm = torch.nn.LSTM(256, 256, batch_first=True)
  inputs = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    torch_outputs, (torch_h, torch_c) = torch_lstm(inputs)  # Zero initial state.

  params = pretrained.lstm_params_from_torch(
      torch_lstm.weight_ih_l0, torch_lstm.weight_hh_l0, torch_lstm.bias_ih_l0, torch_lstm.bias_hh_l0)
  ours_lstm = lstm.LSTM(hidden_size=256)
  expected = jax.eval_shape(ours_lstm.init, jax.random.PRNGKey(0), ours_lstm.zero_carry(2), inputs.numpy())
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, expected['params'])
  with jax.default_matmul_precision('highest'):
    (c, h), outputs = ours_lstm.apply({'params': params}, ours_lstm.zero_carry(2), inputs.numpy())

  for what, ours, reference in [('outputs', outputs, torch_outputs), ('h', h, torch_h[0]),
                                ('c', c, torch_c[0])]:
    error = np.max(np.abs(np.asarray(ours) - reference.numpy()))
    print(f'LSTM {what}: max abs error {error:.3g}')
    assert error <= 1e-5, (what, error)


def test_stem_max_pool_pads_like_torch():
  """torch pads MaxPool2d with -inf; so must we, or negative borders would read the padding's 0."""
  x = -1 - np.abs(np.random.default_rng(0).standard_normal((1, 6, 6, 2), dtype=np.float32))
  ours = nn.max_pool(jnp.asarray(x), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  reference = torch.nn.MaxPool2d(3, 2, 1)(torch.from_numpy(x).permute(0, 3, 1, 2))
  np.testing.assert_array_equal(np.asarray(ours), reference.permute(0, 2, 3, 1).numpy())


# Error messages.


def test_refuses_unsupported_and_keras_files(tmp_path):
  for name in ['weights.ckpt', 'weights.npz']:
    (tmp_path / name).write_bytes(b'')
    with pytest.raises(ValueError, match=r'weights\.(ckpt|npz).*unsupported.*suffix'):
      pretrained.load_torch_state_dict(tmp_path / name)
  for name in ['resnet50.h5', 'resnet50.keras']:
    (tmp_path / name).write_bytes(b'')
    with pytest.raises(ValueError, match=rf'{name}.*Keras.*v1\b.*v1\.5'):
      pretrained.load_torch_state_dict(tmp_path / name)
  with pytest.raises(FileNotFoundError, match=r'absent\.pth'):
    pretrained.load_torch_state_dict(tmp_path / 'absent.pth')


def test_names_the_file_and_first_missing_key(resnet50_files, tmp_path):
  lstm_file = tmp_path / 'lstm.pth'
  torch.save(torch.nn.LSTM(4, 4).state_dict(), lstm_file)
  with pytest.raises(ValueError, match=r"lstm\.pth is not a torchvision ResNet50 state dict: first "
                                       r"missing key 'conv1\.weight'"):
    pretrained.load_torch_state_dict(lstm_file)

  state_dict = dict(resnet50_files['state_dict'])
  del state_dict['layer2.1.conv2.weight'], state_dict['layer4.2.bn3.running_var']
  broken = tmp_path / 'broken.safetensors'
  safetensors_torch.save_file(state_dict, str(broken))
  with pytest.raises(ValueError, match=r"broken\.safetensors .*first missing key "
                                       r"'layer2\.1\.conv2\.weight' \(2 of 265 missing"):
    pretrained.load_torch_state_dict(broken)


def test_refuses_a_deeper_resnet(resnet50_files):
  """ResNet101 has every ResNet50 key with the same shapes: only its extra keys tell them apart."""
  state_dict = dict(resnet50_files['state_dict'])
  state_dict['layer3.6.conv1.weight'] = state_dict['layer3.5.conv1.weight']
  with pytest.raises(ValueError, match=r"first unexpected key 'layer3\.6\.conv1\.weight'"):
    pretrained.resnet_variables_from_torch(state_dict)


def test_refuses_a_pickled_module_without_running_it(tmp_path):
  path = tmp_path / 'whole_model.pth'
  torch.save(torch.nn.Linear(2, 2), path)
  with pytest.raises(ValueError, match=r'whole_model\.pth.*weights_only=True.*state_dict'):
    pretrained.load_torch_state_dict(path)
  not_torch = tmp_path / 'text.pt'
  not_torch.write_text('hello')
  with pytest.raises(ValueError, match=r'text\.pt: torch\.load'):
    pretrained.load_torch_state_dict(not_torch)
  not_safetensors = tmp_path / 'text.safetensors'
  not_safetensors.write_text('hello')
  with pytest.raises(ValueError, match=r'text\.safetensors: not a readable safetensors file'):
    pretrained.load_torch_state_dict(not_safetensors)


def test_load_encoder_init_names_every_shape_mismatch(resnet50_files):
  narrow = captioner.Captioner(vocab_size=10, width=32)  # ResNet50 depth, half the width.
  variables = _abstract_variables(narrow)
  with pytest.raises(ValueError, match=r'resnet50\.pth does not fit .*params/encoder/trunk/'
                                       r'stem_conv/kernel: model \(7, 7, 3, 32\), file \(7, 7, 3, 64\)'):
    pretrained.load_encoder_init(resnet50_files['pth'], variables)


def test_load_encoder_init_follows_the_model_depth(resnet50_files):
  shallow = captioner.Captioner(vocab_size=10, stage_sizes=(1, 1, 1, 1))
  variables = _abstract_variables(shallow)
  with pytest.raises(ValueError, match=r"stage sizes \(1, 1, 1, 1\): first unexpected key "
                                       r"'layer1\.1\.conv1\.weight'"):
    pretrained.load_encoder_init(resnet50_files['pth'], variables)


def test_lstm_shape_errors():
  with pytest.raises(ValueError, match='Not one torch.nn.LSTM layer'):
    pretrained.lstm_params_from_torch(np.zeros((16, 3)), np.zeros((16, 5)), np.zeros(16), np.zeros(16))
