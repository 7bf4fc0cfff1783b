"""Import pretrained torch weights: torchvision's ResNet50 into our trunk, torch.nn.LSTM into our LSTM.

    variables = model.init(...)                                  # a full Captioner variables tree
    variables = pretrained.load_encoder_init('resnet50.pth', variables)   # config.model.encoder_init

Files: a torchvision ResNet state dict saved as `.pth`/`.pt` (`torch.save(model.state_dict(), path)`,
read with `weights_only=True`, so no pickled code ever runs) or `.safetensors` (read with the
safetensors numpy API: no torch needed). Its names map one to one onto `capjax.models.resnet.ResNet`:
`conv1`/`bn1` -> `stem_conv`/`stem_bn`, `layer{i}.{j}` -> `stage{i}_block{j+1}`,
`downsample.{0,1}` -> `proj_conv`/`proj_bn`; `fc.*` and `num_batches_tracked` are dropped. The
imported trunk computes the same features as torchvision's (to float32 rounding, see
tests/test_pretrained.py): both are ResNet v1.5, BatchNorm eps 1e-5, the stem max-pool pads with -inf
in both, and `captioner.normalize_images` uses torchvision's ImageNet mean/std on RGB.

Keras `.h5`/`.keras` ResNet50 files are refused. Keras' ResNet50 is ResNet v1: each stage's first
block strides its first 1x1 conv, where v1.5 (ours, torchvision's) strides the 3x3 conv, so no
renaming makes the same weights compute the same function. (The other differences could be folded
away: its BatchNorm eps 1.001e-5 into the variance, its conv biases into the BN mean; its caffe
preprocessing, BGR with mean subtraction only, into the stem conv except at the zero-padded border.)
"""

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
import os

from flax import traverse_util
import jax.numpy as jnp
import numpy as np

RESNET50_STAGE_SIZES = (3, 4, 6, 3)
TORCH_SUFFIXES = ('.pth', '.pt')
SAFETENSORS_SUFFIX = '.safetensors'
KERAS_SUFFIXES = ('.h5', '.keras')
INSTALL_HINT = 'pip install -r requirements-torch.txt'

# torch BatchNorm2d buffer/parameter name -> (flax collection, flax name).
_BN_NAMES = {
    'weight': ('params', 'scale'),
    'bias': ('params', 'bias'),
    'running_mean': ('batch_stats', 'mean'),
    'running_var': ('batch_stats', 'var'),
}


# ----------------------------------------------------------------------------------------------
# Reading files.


def load_torch_state_dict(path, stage_sizes: Sequence[int] = RESNET50_STAGE_SIZES
                          ) -> dict[str, np.ndarray]:
  """A torchvision ResNet state dict from `.pth`/`.pt`/`.safetensors` -> {name: numpy array}.

  Floating tensors come back as float32 (our parameters are float32, and numpy has no bfloat16).
  Raises ValueError naming the file for an unsupported suffix, a Keras file, a file torch will not
  load without running pickled code, or a state dict that is not a ResNet of `stage_sizes`.
  """
  path = os.fspath(path)
  suffix = os.path.splitext(path)[1].lower()
  if suffix in KERAS_SUFFIXES:
    raise ValueError(
        f'{path}: Keras ResNet50 weights cannot be imported exactly. Keras\' ResNet50 is ResNet v1 '
        '(the stride-2 of each stage sits on the first 1x1 conv); our trunk, like torchvision\'s, is '
        'v1.5 (stride on the 3x3 conv), so the same weights would compute different features. '
        'Use torchvision ResNet50 weights saved as .pth, .pt or .safetensors.')
  if suffix not in TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,):
    raise ValueError(f'{path}: unsupported weights file suffix {suffix!r}; expected one of '
                     f'{TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,)} (a torchvision ResNet state dict).')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No weights file at {path}')
  read = _read_torch_file if suffix in TORCH_SUFFIXES else _read_safetensors_file
  state_dict = read(path)
  check_resnet_keys(state_dict, stage_sizes, source=path)
  return state_dict


def _read_torch_file(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'Reading {path} needs torch: {INSTALL_HINT}') from e
  try:
    # weights_only=True: only tensors and containers are unpickled, never arbitrary code.
    loaded = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # Corrupt or non-torch files fail with many types (KeyError, RuntimeError..).
    raise ValueError(
        f'{path}: torch.load(weights_only=True) could not read it as a plain state dict (a pickled '
        f'whole model is refused on purpose; save `model.state_dict()` instead): '
        f'{type(e).__name__}: {e}') from e
  if not isinstance(loaded, Mapping) or not all(torch.is_tensor(v) for v in loaded.values()):
    keys = list(loaded)[:5] if isinstance(loaded, Mapping) else type(loaded).__name__
    raise ValueError(f'{path}: expected a flat state dict (name -> tensor), got {keys} '
                     '(for a training checkpoint, save its model\'s `state_dict()` alone).')
  return {name: _tensor_to_numpy(tensor) for name, tensor in loaded.items()}


def _tensor_to_numpy(tensor) -> np.ndarray:
  tensor = tensor.detach().cpu()
  if tensor.is_floating_point():
    tensor = tensor.float()  # bfloat16/float16 -> float32: numpy has no bfloat16.
  return tensor.numpy()


def _read_safetensors_file(path: str) -> dict[str, np.ndarray]:
  try:
    from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'Reading {path} needs safetensors: {INSTALL_HINT}') from e
  try:
    arrays = safetensors_numpy.load_file(path)
  except Exception as e:  # safetensors raises its own error types for a malformed header.
    raise ValueError(f'{path}: not a readable safetensors file: {type(e).__name__}: {e}') from e
  return {name: _float32_if_floating(array) for name, array in arrays.items()}


def _float32_if_floating(array: np.ndarray) -> np.ndarray:
  # bfloat16 arrives as an ml_dtypes type, which np.issubdtype does not count as floating.
  if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
    return array
  return np.asarray(array, np.float32)


# ----------------------------------------------------------------------------------------------
# torchvision ResNet names -> our ResNet variables.


def _torch_layers(stage_sizes: Sequence[int]) -> Iterator[tuple[str, tuple[str, ...], str]]:
  """(torchvision module name, our module path, 'conv' | 'bn') for every layer, in torch's order."""
  yield 'conv1', ('stem_conv',), 'conv'
  yield 'bn1', ('stem_bn',), 'bn'
  for stage, num_blocks in enumerate(stage_sizes, start=1):
    for block in range(num_blocks):
      torch_block, our_block = f'layer{stage}.{block}', f'stage{stage}_block{block + 1}'
      for k in (1, 2, 3):
        yield f'{torch_block}.conv{k}', (our_block, f'conv{k}'), 'conv'
        yield f'{torch_block}.bn{k}', (our_block, f'bn{k}'), 'bn'
      # Only a stage's first block changes shape (channels and/or stride), in both implementations.
      if block == 0:
        yield f'{torch_block}.downsample.0', (our_block, 'proj_conv'), 'conv'
        yield f'{torch_block}.downsample.1', (our_block, 'proj_bn'), 'bn'


def expected_torch_keys(stage_sizes: Sequence[int] = RESNET50_STAGE_SIZES) -> list[str]:
  """The state-dict keys the trunk needs, in torchvision's order (no `fc.*`, no counters)."""
  keys = []
  for torch_name, _, kind in _torch_layers(stage_sizes):
    suffixes = ['weight'] if kind == 'conv' else list(_BN_NAMES)
    keys.extend(f'{torch_name}.{suffix}' for suffix in suffixes)
  return keys


def _is_dropped(key: str) -> bool:
  """The classifier and BatchNorm's step counters have no counterpart in our trunk."""
  return key.startswith('fc.') or key.endswith('.num_batches_tracked')


def check_resnet_keys(state_dict: Mapping[str, object], stage_sizes: Sequence[int] = RESNET50_STAGE_SIZES,
                      source: str = 'state dict') -> None:
  """ValueError naming `source` and the first missing (or unexpected) key, in torchvision's order.

  Unexpected keys are errors too: a ResNet101 holds every ResNet50 key with the same shapes and would
  otherwise import silently as a truncated network.
  """
  expected = expected_torch_keys(stage_sizes)
  what = f'a torchvision ResNet state dict with stage sizes {tuple(stage_sizes)}'
  if tuple(stage_sizes) == RESNET50_STAGE_SIZES:
    what = 'a torchvision ResNet50 state dict'
  kept = [key for key in state_dict if not _is_dropped(key)]
  sample = f'it has {len(kept)} other keys, e.g. {kept[:3]}'
  missing = [key for key in expected if key not in state_dict]
  if missing:
    raise ValueError(f'{source} is not {what}: first missing key {missing[0]!r} '
                     f'({len(missing)} of {len(expected)} missing; {sample}).')
  expected_set = set(expected)
  unexpected = [key for key in state_dict if key not in expected_set and not _is_dropped(key)]
  if unexpected:
    raise ValueError(f'{source} is not {what}: first unexpected key {unexpected[0]!r} '
                     f'({len(unexpected)} unexpected; a deeper ResNet?).')


def resnet_variables_from_torch(state_dict: Mapping[str, np.ndarray],
                                stage_sizes: Sequence[int] = RESNET50_STAGE_SIZES) -> dict:
  """torchvision ResNet state dict -> {'params': ..., 'batch_stats': ...} for `resnet.ResNet`.

  Conv weights go OIHW -> HWIO; BatchNorm weight/bias -> params scale/bias and running_mean/var ->
  batch_stats mean/var (same eps 1e-5, so no adjustment). Arrays come back as float32 numpy.
  """
  check_resnet_keys(state_dict, stage_sizes)
  flat = {}
  for torch_name, our_path, kind in _torch_layers(stage_sizes):
    if kind == 'conv':
      kernel = np.asarray(state_dict[f'{torch_name}.weight'], np.float32)
      flat[('params', *our_path, 'kernel')] = np.transpose(kernel, (2, 3, 1, 0))
    else:
      for torch_suffix, (collection, our_name) in _BN_NAMES.items():
        value = np.asarray(state_dict[f'{torch_name}.{torch_suffix}'], np.float32)
        flat[(collection, *our_path, our_name)] = value
  return traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------------------------
# torch.nn.LSTM -> our LSTM.


def lstm_params_from_torch(weight_ih, weight_hh, bias_ih, bias_hh) -> dict:
  """One torch.nn.LSTM layer (`weight_ih_l0`, ... ) -> params for `models.lstm.LSTM`.

  Both use gate order i, f, g, o, so the weights only transpose. Our recurrent Dense has no bias:
  torch's two biases are always summed into the gates, so their sum goes on the input projection.
  Accepts numpy arrays or torch tensors.
  """
  weight_ih, weight_hh, bias_ih, bias_hh = (
      _as_float32(x) for x in (weight_ih, weight_hh, bias_ih, bias_hh))
  _check_lstm_shapes(weight_ih, weight_hh, bias_ih, bias_hh)
  return {'input': {'kernel': weight_ih.T, 'bias': bias_ih + bias_hh},
          'cell': {'recurrent': {'kernel': weight_hh.T}}}


def _check_lstm_shapes(weight_ih, weight_hh, bias_ih, bias_hh) -> None:
  shapes = {'weight_ih': weight_ih.shape, 'weight_hh': weight_hh.shape,
            'bias_ih': bias_ih.shape, 'bias_hh': bias_hh.shape}
  four_hidden = weight_hh.shape[0] if weight_hh.ndim == 2 else -1
  fits = (weight_hh.shape == (four_hidden, four_hidden // 4) and four_hidden % 4 == 0
          and weight_ih.ndim == 2 and weight_ih.shape[0] == four_hidden
          and bias_ih.shape == bias_hh.shape == (four_hidden,))
  if not fits:
    raise ValueError(f'Not one torch.nn.LSTM layer: shapes {shapes}; expected weight_ih (4H, D), '
                     'weight_hh (4H, H), bias_ih and bias_hh (4H,).')


def _as_float32(x) -> np.ndarray:
  if hasattr(x, 'detach'):  # A torch tensor, maybe requiring grad: numpy() refuses those.
    return _tensor_to_numpy(x).astype(np.float32)
  return np.asarray(x, np.float32)


# ----------------------------------------------------------------------------------------------
# Into a captioner.


def load_encoder_init(path, variables: Mapping) -> dict:
  """A full Captioner variables tree with its image trunk replaced by the weights in `path`.

  The trunk's depth is read from `variables`, and every imported array must have the shape of the
  one it replaces (ValueError listing the differences otherwise). Values take the existing leaves'
  dtypes. `variables` is not modified; its leaves may be arrays or `jax.ShapeDtypeStruct`s.
  """
  path = os.fspath(path)
  model_trunk = {collection: variables[collection]['encoder']['trunk']
                 for collection in ('params', 'batch_stats')}
  stage_sizes = _stage_sizes_of(model_trunk['params'])
  imported = resnet_variables_from_torch(load_torch_state_dict(path, stage_sizes), stage_sizes)
  fitted = _fit_to_model(imported, model_trunk, path)
  new_variables = dict(variables)
  for collection, trunk in fitted.items():
    encoder = {**variables[collection]['encoder'], 'trunk': trunk}
    new_variables[collection] = {**variables[collection], 'encoder': encoder}
  return new_variables


def _stage_sizes_of(trunk_params: Mapping) -> tuple[int, ...]:
  """Blocks per stage from names like 'stage3_block6'."""
  blocks = Counter(name.split('_')[0] for name in trunk_params if name.startswith('stage'))
  return tuple(blocks[f'stage{i}'] for i in range(1, len(blocks) + 1))


def _fit_to_model(imported: Mapping, model_trunk: Mapping, path: str) -> dict:
  """Imported trunk arrays cast to the model's dtypes, after checking names and shapes one by one."""
  ours = traverse_util.flatten_dict(imported)
  model = traverse_util.flatten_dict(model_trunk)
  problems = [f'{_name(key)}: not in the model' for key in ours if key not in model]
  problems += [f'{_name(key)}: not in the file' for key in model if key not in ours]
  problems += [f'{_name(key)}: model {tuple(model[key].shape)}, file {ours[key].shape}'
               for key in ours if key in model and tuple(model[key].shape) != ours[key].shape]
  if problems:
    shown = '; '.join(problems[:5]) + (f'; ... ({len(problems)} in all)' if len(problems) > 5 else '')
    raise ValueError(f'encoder_init {path} does not fit the model\'s trunk (config.model.width / '
                     f'stage_sizes?): {shown}')
  fitted = {key: jnp.asarray(value, dtype=model[key].dtype) for key, value in ours.items()}
  return traverse_util.unflatten_dict(fitted)


def _name(key: tuple[str, ...]) -> str:
  collection, *rest = key
  return '/'.join([collection, 'encoder', 'trunk', *rest])
