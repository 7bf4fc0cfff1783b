"""A small PyTorch reference of the seed captioner, for the benchmarks only (eager, batched).

Same architecture as capjax's `Captioner`: torchvision `resnet50(weights=None)` without its fc ->
global average pool -> Linear 2048->256 -> BatchNorm1d; Embedding(V, 256); `nn.LSTM(256, 256)` fed
`[image_vec, emb(<START>), emb(w1), ...]` from a zero state; Linear 256->V. Images arrive as uint8
NHWC and are normalised on the device, as in capjax. The decoders follow capjax/decoding.py: greedy,
and beam search over the whole batch x beam at once (a finished beam is frozen and keeps competing
for its slot; raw log-prob scores), both stopping early once every row has emitted <END>.

`capjax_variables(model)` converts the weights into a capjax variables tree, so both frameworks can
run the very same network; `python -m benchmarks.torch_reference` checks that they agree (no flags).
"""

import os
import sys

if __package__ in (None, ''):  # run as `python benchmarks/torch_reference.py`
  sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from absl import app
import numpy as np
import torch
from torch import nn
import torchvision

from benchmarks import harness
from capjax import vocab as vocab_lib
from capjax.models import captioner

START_ID, END_ID, PAD_ID = vocab_lib.START_ID, vocab_lib.END_ID, vocab_lib.PAD_ID


class TorchCaptioner(nn.Module):
  """ResNet50 encoder + 256-unit LSTM decoder; `forward` is the teacher-forced training graph."""

  def __init__(self, vocab_size: int, embed_dim: int = 256, hidden_size: int = 256):
    super().__init__()
    self.trunk = torchvision.models.resnet50(weights=None)
    self.trunk.fc = nn.Identity()  # keeps avgpool + flatten: (N, 2048)
    self.projection = nn.Linear(2048, embed_dim)
    self.projection_bn = nn.BatchNorm1d(embed_dim)
    self.embed = nn.Embedding(vocab_size, embed_dim)
    self.lstm = nn.LSTM(embed_dim, hidden_size, batch_first=True)
    self.readout = nn.Linear(hidden_size, vocab_size)
    self.register_buffer('mean', torch.tensor(captioner.IMAGENET_MEAN).view(1, 3, 1, 1))
    self.register_buffer('std', torch.tensor(captioner.IMAGENET_STD).view(1, 3, 1, 1))

  def encode(self, images):
    """uint8 (N, H, W, 3) -> image vectors (N, embed_dim)."""
    x = (images.permute(0, 3, 1, 2).float() - self.mean) / self.std
    return self.projection_bn(self.projection(self.trunk(x)))

  def forward(self, images, input_tokens):
    """Teacher forcing: logits (N, T, V) for input tokens (N, T)."""
    image_vec = self.encode(images)
    hidden, _ = self.lstm(torch.cat([image_vec[:, None], self.embed(input_tokens)], dim=1))
    return self.readout(hidden[:, 1:])

  def start(self, image_vec):
    """The LSTM state (h, c), each (1, N, H), after reading the image vector."""
    _, state = self.lstm(image_vec[:, None])
    return state

  def step(self, state, tokens):
    """One token per row (N,) -> (state, logits (N, V))."""
    hidden, state = self.lstm(self.embed(tokens)[:, None], state)
    return state, self.readout(hidden[:, 0])


@torch.inference_mode()
def greedy_decode(model: TorchCaptioner, image_vec, max_len: int):
  """Argmax decoding from image vectors -> int64 (N, max_len), <END> kept, <PAD> after it."""
  n = image_vec.shape[0]
  state = model.start(image_vec)
  tokens = torch.full((n,), START_ID, dtype=torch.long, device=image_vec.device)
  finished = torch.zeros(n, dtype=torch.bool, device=image_vec.device)
  out = torch.full((n, max_len), PAD_ID, dtype=torch.long, device=image_vec.device)
  for t in range(max_len):
    state, logits = model.step(state, tokens)
    tokens = torch.where(finished, PAD_ID, logits.argmax(-1))
    out[:, t] = tokens
    finished |= tokens == END_ID
    if bool(finished.all()):  # a device sync per step, as any eager early-stopping decoder has
      break
  return out


@torch.inference_mode()
def beam_search(model: TorchCaptioner, image_vec, beam_size: int, max_len: int):
  """Batched beam search from image vectors -> the best hypothesis per image, int64 (N, max_len)."""
  n, k, device = image_vec.shape[0], beam_size, image_vec.device
  h, c = model.start(image_vec)
  state = (h.repeat_interleave(k, dim=1), c.repeat_interleave(k, dim=1))
  last = torch.full((n, k), START_ID, dtype=torch.long, device=device)
  log_probs = torch.full((n, k), float('-inf'), device=device)
  log_probs[:, 0] = 0.0  # the K beams start identical: only beam 0 is live
  finished = torch.zeros((n, k), dtype=torch.bool, device=device)
  history = torch.full((n, k, max_len), PAD_ID, dtype=torch.long, device=device)
  for t in range(max_len):
    state, logits = model.step(state, last.reshape(-1))
    logits = logits.reshape(n, k, -1)
    k_tok = min(k, logits.shape[-1])  # only a beam's k best tokens can enter the next beam
    _, token_ids = logits.topk(k_tok, dim=-1)
    token_lp = torch.log_softmax(logits.float(), -1).gather(-1, token_ids)
    frozen = finished[..., None]
    first_only = torch.arange(k_tok, device=device) == 0
    cand_lp = torch.where(frozen, torch.where(first_only, log_probs[..., None], float('-inf')),
                          log_probs[..., None] + token_lp).reshape(n, -1)
    cand_tokens = torch.where(frozen, PAD_ID, token_ids).reshape(n, -1)
    log_probs, best = cand_lp.topk(k, dim=-1)
    parents = best // k_tok
    last = cand_tokens.gather(1, best)
    finished = finished.gather(1, parents) | (last == END_ID)
    history = history.gather(1, parents[..., None].expand(-1, -1, max_len))
    history[:, :, t] = last
    rows = (parents + k * torch.arange(n, device=device)[:, None]).reshape(-1)
    state = (state[0][:, rows], state[1][:, rows])
    if bool(finished.all()):
      break
  return history[:, 0]  # topk keeps beams sorted by score


def caption(model: TorchCaptioner, images, max_len: int, beam_size: int = 1):
  with torch.inference_mode():
    image_vec = model.encode(images)
  if beam_size == 1:
    return greedy_decode(model, image_vec, max_len)
  return beam_search(model, image_vec, beam_size, max_len)


# ----------------------------------------------------------------------------------------------
# The same weights in capjax


def capjax_variables(model: TorchCaptioner) -> dict:
  """The torch model's weights as a capjax `Captioner` variables tree (float32 numpy)."""
  from capjax import pretrained  # pylint: disable=g-import-not-at-top
  as_np = lambda t: t.detach().cpu().float().numpy()  # noqa: E731
  trunk = pretrained.resnet_variables_from_torch(
      {k: as_np(v) for k, v in model.trunk.state_dict().items()})
  bn = model.projection_bn
  params = {
      'encoder': {
          'trunk': trunk['params'],
          'projection': {'kernel': as_np(model.projection.weight).T,
                         'bias': as_np(model.projection.bias)},
          'projection_bn': {'scale': as_np(bn.weight), 'bias': as_np(bn.bias)}},
      'decoder': {
          'embed': {'embedding': as_np(model.embed.weight)},
          'lstm': pretrained.lstm_params_from_torch(
              model.lstm.weight_ih_l0, model.lstm.weight_hh_l0, model.lstm.bias_ih_l0,
              model.lstm.bias_hh_l0),
          'readout': {'kernel': as_np(model.readout.weight).T, 'bias': as_np(model.readout.bias)}}}
  batch_stats = {'encoder': {
      'trunk': trunk['batch_stats'],
      'projection_bn': {'mean': as_np(bn.running_mean), 'var': as_np(bn.running_var)}}}
  return {'params': params, 'batch_stats': batch_stats}


def random_reference(vocab_size: int, image_size: int = 64, seed: int = 0) -> TorchCaptioner:
  """Random weights with activations in a realistic range: every BatchNorm's running statistics are
  set to those of a batch of random images (one train-mode pass with a cumulative average)."""
  torch.manual_seed(seed)
  model = TorchCaptioner(vocab_size)
  norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
  for m in norms:
    m.momentum = None
  with torch.no_grad():
    model.train().encode(torch.randint(0, 256, (8, image_size, image_size, 3), dtype=torch.uint8))
  for m in norms:
    m.momentum = 0.1
  return model.eval()


def check_against_capjax(vocab_size: int = 50, image_size: int = 64, max_len: int = 12) -> dict:
  """Teacher-forced logits, greedy and beam-3 tokens of the torch reference vs capjax on the same
  weights. Returns the differences; raises AssertionError when they disagree."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from capjax import inference  # pylint: disable=g-import-not-at-top
  model = random_reference(vocab_size, image_size)
  variables = capjax_variables(model)
  ours = captioner.Captioner(vocab_size=vocab_size)
  images = np.random.default_rng(0).integers(0, 256, (4, image_size, image_size, 3), np.uint8)
  tokens = np.random.default_rng(1).integers(4, vocab_size, (4, max_len - 1))
  with torch.inference_mode():
    torch_logits = model(torch.from_numpy(images), torch.from_numpy(tokens)).numpy()
  jax_logits = np.asarray(ours.apply(variables, jnp.asarray(images), jnp.asarray(tokens), train=False))
  result = {'max_abs_logit_diff': float(np.abs(torch_logits - jax_logits).max()),
            'logit_scale': float(np.abs(torch_logits).max())}
  for beam in (1, 3):
    torch_tokens = caption(model, torch.from_numpy(images), max_len, beam).numpy()
    jax_tokens = np.asarray(jax.jit(lambda v, x, b=beam: inference.generate_tokens(
        ours, v, x, max_len=max_len, beam_size=b))(variables, jnp.asarray(images)))
    result[f'beam{beam}_tokens_equal'] = bool((torch_tokens == jax_tokens).all())
  assert result['max_abs_logit_diff'] < 1e-3 * max(1.0, result['logit_scale']), result
  assert result['beam1_tokens_equal'] and result['beam3_tokens_equal'], result
  with torch.inference_mode():
    vec = model.encode(torch.from_numpy(images))
  assert torch.equal(greedy_decode(model, vec, max_len), beam_search(model, vec, 1, max_len))
  return result


def main(argv):
  harness.start(argv)
  print(check_against_capjax())
  print('torch reference == capjax on the same weights (logits, greedy, beam 3, beam 1 == greedy)')


if __name__ == '__main__':
  app.run(main)
