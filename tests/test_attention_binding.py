"""Attention that looks where a caption points (issue 28): a task the pooled seed decoder cannot solve.

Each image is two cells, left and right, each of one colour (two different colours of three). Its caption
names a side, then that side's colour: `left is red`. Each cell's annotation vector holds its colour and
its side (one-hot), so the cells can be told apart; the seed decoder reads their mean, in which the two
colours are present but not where, so after `left is` it can only guess between them (50%). The attention
decoder can look at the named cell. Both train on the same cached-feature path the 'cached' encoder mode
uses (`decode_from_features`), with capjax's own models, loss and optimizer.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from capjax import state as state_lib
from capjax import vocab as vocab_lib
from capjax.models import captioner
from configs import tiny

SIDES, COLOURS = ('left', 'right'), ('red', 'green', 'blue')
VOCAB = vocab_lib.Vocabulary((*vocab_lib.SPECIALS, *SIDES, 'is', *COLOURS))
CHANNELS = 256  # the tiny trunk's feature width (8 x 32), as cached features would have
COLOUR_STEP = 3  # input [<START>, side, is, colour]: logits[:, 2] predict the colour, read after 'is'


def _scenes(rng: np.random.Generator, n: int):
  """(annotations (n, 2, C), cached pooled features (n, C), tokens (n, 6), named cell (n,), its colour)."""
  colours = np.stack([rng.choice(len(COLOURS), 2, replace=False) for _ in range(n)])
  annotations = np.zeros((n, 2, CHANNELS), np.float32)
  for cell in range(2):
    annotations[np.arange(n), cell, colours[:, cell]] = 1.0
    annotations[:, cell, len(COLOURS) + cell] = 1.0
  named = rng.integers(0, 2, n)
  colour = colours[np.arange(n), named]
  tokens = np.stack([VOCAB.encode(f'{SIDES[s]} is {COLOURS[c]}', 6) for s, c in zip(named, colour)])
  return annotations, annotations.mean(axis=1), tokens, named, colour


def _train(model, features, tokens, steps: int = 300, batch: int = 64):
  variables = model.init(jax.random.PRNGKey(0), features[:2], tokens[:2, :-1], train=False,
                         method=model.decode_from_features)
  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, batch_stats, opt_state, feats, toks):
    def loss_fn(params):
      logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, feats, toks[:, :-1],
                                    train=True, method=model.decode_from_features,
                                    mutable=['batch_stats', 'losses'])
      total, count = state_lib.token_cross_entropy(logits, toks)
      return total / count, updates.get('batch_stats', batch_stats)
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  rng = np.random.default_rng(1)
  for _ in range(steps):
    rows = rng.integers(0, len(tokens), batch)
    params, batch_stats, opt_state, _ = step(params, batch_stats, opt_state, features[rows], tokens[rows])
  return {'params': params, 'batch_stats': batch_stats}


def _colour_accuracy(model, variables, features, tokens) -> float:
  logits = model.apply(variables, features, tokens[:, :-1], train=False, method=model.decode_from_features)
  predicted = np.asarray(jnp.argmax(logits[:, COLOUR_STEP - 1], axis=-1))
  return float(np.mean(predicted == tokens[:, COLOUR_STEP]))


def test_only_attention_reads_the_colour_of_the_named_side():
  config = tiny.get_config()
  config.model.embed_dim = config.model.hidden_size = 32
  annotations, pooled, tokens, named, _ = _scenes(np.random.default_rng(0), 512)
  test_annotations, test_pooled, test_tokens, test_named, _ = _scenes(np.random.default_rng(7), 256)

  seed = captioner.build_captioner(config.model, len(VOCAB))
  seed_variables = _train(seed, pooled, tokens)
  seed_accuracy = _colour_accuracy(seed, seed_variables, test_pooled, test_tokens)

  config.model.decoder = 'attention'
  config.model.attention_dim = 32
  config.model.attention_dropout = config.model.attention_regularizer = 0.0
  attention = captioner.build_captioner(config.model, len(VOCAB))
  attention_variables = _train(attention, annotations, tokens)
  attention_accuracy = _colour_accuracy(attention, attention_variables, test_annotations, test_tokens)

  # The pooled vector says which two colours are there, not where: a coin flip between them.
  assert 0.35 < seed_accuracy < 0.65, seed_accuracy
  assert attention_accuracy > 0.95, attention_accuracy
  # And it reads the colour where the caption points: its weights, when it predicts the colour after
  # 'left is' / 'right is', are on the named cell.
  alphas = attention.apply(attention_variables, test_annotations, test_tokens[:, 1:],
                           method=attention.attention_weights)
  on_named = np.asarray(alphas)[np.arange(len(test_named)), COLOUR_STEP - 1, test_named]
  assert on_named.mean() > 0.9, on_named.mean()
