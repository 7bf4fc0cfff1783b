"""capjax's command line: the flags and the dispatch to each mode. `launch.py` at a checkout's root and
the `capjax` console command of an installed package (pyproject.toml) both run `run()`.

  capjax                                             # demo: train on built-in shapes data
  capjax --config=configs/default.py --workdir=W     # train (resumes if W has checkpoints)
  capjax --mode=prepare --config=configs/flickr8k.py --config.data.manual_dir=/data/flickr8k
  capjax --mode=eval --workdir=W --split=test --beam_size=3 --checkpoint_step=best
  capjax --mode=caption --workdir=W --images='photos/*.jpg' --output=captions.jsonl
  capjax --mode=compare --workdirs=W1,W2 --split=test --beam_size=3   # one report, two models
  capjax --mode=serve --workdir=W --port=8000                         # web page + JSON API
  capjax --mode=export --workdir=W --export_dir=E                     # a pickle-free model directory
  capjax --mode=caption --export_dir=E --images='photos/*.jpg'        # (serve takes --export_dir too)

An installed package has no configs/ folder of its own: its configs are capjax/configs/*.py, e.g.
  capjax --config="$(python -c 'import capjax.configs as c; print(c.__path__[0])')/default.py"
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from capjax import cli
from capjax import errors
from capjax import export_mode
from capjax import serve
from capjax.configs import demo as demo_config
from capjax.data import prepare
from capjax.evaluation import modes as evaluation_modes

# The default config is the packaged demo (capjax/configs/demo.py; configs/demo.py in a checkout is a
# one-line alias of it), wherever the command is started from: a relative default would execute any
# configs/demo.py in the current directory. eval, caption, serve and export read the workdir's (or the
# export's) config.json and ignore --config.
_DEMO_CONFIG = os.path.abspath(demo_config.__file__)
config_flags.DEFINE_config_file('config', _DEMO_CONFIG, 'Training configuration file.', lock_config=True)
flags.DEFINE_string('workdir', 'workdirs/demo', 'Checkpoints, vocabulary, logs and results.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'caption', 'prepare', 'compare', 'serve', 'export'],
                  'What to run.')
flags.DEFINE_string('export_dir', None,
                    'export: the directory to write (new or empty). caption/serve: load the model from this '
                    'export directory instead of --workdir (--checkpoint_step is then ignored).')
flags.DEFINE_string('split', 'test', 'eval: which split to caption and score.')
flags.DEFINE_integer('beam_size', 3, 'eval/caption/serve/export: beam width (1 = greedy).')
flags.DEFINE_float('length_penalty', 0.0, 'eval/caption/serve/export: GNMT length-penalty alpha (0 = none).')
flags.DEFINE_integer('no_repeat_ngram', 0,
                     'eval/caption/serve/export: never repeat an n-gram of this size in a caption (3 = '
                     'trigram blocking; 0 = off).')
flags.DEFINE_float('temperature', 0.0, 'caption: >0 samples captions at this temperature (diversity).')
flags.DEFINE_integer('top_k', 0, 'caption: with --temperature, sample from the k likeliest words.')
flags.DEFINE_string('checkpoint_step', 'best',
                    "eval/caption/serve/export: 'best', 'latest' or a step number.")
flags.DEFINE_string('images', None, 'caption: an image file, a directory, or a glob.')
flags.DEFINE_string('output', None, 'caption: also write the captions to this .jsonl file.')
flags.DEFINE_string('attention_maps', None,
                    'caption: write one PNG per image with its word-by-word attention maps to this folder '
                    '(attention decoder only).')
flags.DEFINE_list('workdirs', [], 'compare: the workdirs (two or more) whose checkpoints are compared.')
flags.DEFINE_bool('allow_different_data', False,
                  'compare: compare workdirs whose split holds other images or references (matched by '
                  'image id) instead of refusing.')
flags.DEFINE_string('host', '127.0.0.1',
                    'serve: address to bind. The service has no authentication: bind to other than '
                    'localhost only on a network you trust.')
flags.DEFINE_integer('port', 8000, 'serve: port.')
flags.DEFINE_integer('max_batch_size', 16, 'serve: images captioned together in one jitted call.')
flags.DEFINE_float('max_wait_ms', 10.0, 'serve: how long a request waits for others to join its batch.')
flags.DEFINE_integer('max_upload_mb', 20, 'serve: largest request body accepted.')
flags.DEFINE_integer('max_image_pixels', 40_000_000, 'serve: larger images are refused.')
flags.DEFINE_integer('max_decode_mb', 256,
                     'serve: the most memory decoding may hold, estimated from each image\'s header (size, '
                     'bit depth, conversion to RGB): an image that would need more is refused (413), and '
                     'concurrent decodes wait their turn while the ones in flight hold this much together. '
                     'A 40-megapixel 8-bit RGB image takes about 165 MB.')
flags.DEFINE_list('allowed_hosts', [],
                  'serve: host names (the Host header; a port is ignored) the server answers besides '
                  'localhost, 127.0.0.1 and [::1], e.g. the name a reverse proxy forwards; * answers any. '
                  'Bound to loopback (the default --host), other names get 421 (a guard against DNS '
                  'rebinding); bound to another address, the Host header is checked only when this is given.')
flags.DEFINE_list('allow_config_change', [],
                  'train: config fields that may differ from the checkpoints a run resumes from, e.g. '
                  'train.learning_rate,train.num_epochs (recorded in history.json).')
flags.DEFINE_bool('distributed', False,
                  'Call jax.distributed.initialize() first (multi-host GPU/TPU; see README).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    # Progress and results are printed; library INFO logs (orbax, tfds) only with -v 0 or --verbosity.
    logging.set_verbosity(logging.WARNING)
  if flags.FLAGS.distributed:
    jax.distributed.initialize()
  try:
    _run_mode(flags.FLAGS)
  except (errors.CapjaxError, FileNotFoundError) as e:
    # Conditions a user can fix get one clear line, not a traceback. Then exit at once: after a failed
    # checkpoint read, tensorstore's abandoned reads finish on their own threads while the interpreter
    # shuts down and print tracebacks of their own, which would bury this line. Every file capjax
    # writes is complete by now (written atomically, checkpoints saved synchronously).
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)  # pylint: disable=protected-access


def _run_mode(FLAGS) -> None:  # pylint: disable=invalid-name
  if FLAGS.mode == 'train':
    cli.train(FLAGS.config, FLAGS.workdir, allow_config_change=FLAGS.allow_config_change)
  elif FLAGS.mode == 'prepare':
    prepare.prepare_from_config(FLAGS.config.data)
  elif FLAGS.mode == 'eval':
    evaluation_modes.evaluate_workdir(FLAGS.workdir, split=FLAGS.split, checkpoint=FLAGS.checkpoint_step,
                                      beam_size=FLAGS.beam_size, length_penalty=FLAGS.length_penalty,
                                      no_repeat_ngram=FLAGS.no_repeat_ngram)
  elif FLAGS.mode == 'compare':
    evaluation_modes.compare_workdirs(FLAGS.workdirs, split=FLAGS.split, checkpoint=FLAGS.checkpoint_step,
                                      beam_size=FLAGS.beam_size, length_penalty=FLAGS.length_penalty,
                                      no_repeat_ngram=FLAGS.no_repeat_ngram,
                                      allow_different_data=FLAGS.allow_different_data)
  elif FLAGS.mode == 'export':
    export_mode.export_workdir(FLAGS.workdir, FLAGS.export_dir, checkpoint=FLAGS.checkpoint_step,
                               beam_size=FLAGS.beam_size, length_penalty=FLAGS.length_penalty,
                               no_repeat_ngram=FLAGS.no_repeat_ngram)
  elif FLAGS.mode == 'serve':
    serve.serve(FLAGS.workdir, export_dir=FLAGS.export_dir, host=FLAGS.host, port=FLAGS.port,
                checkpoint=FLAGS.checkpoint_step, beam_size=FLAGS.beam_size,
                length_penalty=FLAGS.length_penalty, no_repeat_ngram=FLAGS.no_repeat_ngram,
                max_batch_size=FLAGS.max_batch_size, max_wait_ms=FLAGS.max_wait_ms,
                max_upload_mb=FLAGS.max_upload_mb, max_image_pixels=FLAGS.max_image_pixels,
                max_decode_mb=FLAGS.max_decode_mb, allowed_hosts=FLAGS.allowed_hosts)
  else:
    cli.caption_images(FLAGS.workdir, FLAGS.images, export_dir=FLAGS.export_dir, output=FLAGS.output,
                       beam_size=FLAGS.beam_size, checkpoint=FLAGS.checkpoint_step,
                       length_penalty=FLAGS.length_penalty, no_repeat_ngram=FLAGS.no_repeat_ngram,
                       temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                       attention_maps=FLAGS.attention_maps)


def run() -> None:
  """The `capjax` console command (pyproject.toml) and launch.py."""
  # absl's --help shows the starting module's docstring and key flags (launch.py, or the console
  # script pip writes, which has no docstring): make this module's flags theirs, and its usage text.
  for flag in flags.FLAGS.get_flags_for_module(__name__):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  starter = sys.modules['__main__']
  if not getattr(starter, '__doc__', None):
    starter.__doc__ = __doc__
  app.run(main)


if __name__ == '__main__':
  run()
