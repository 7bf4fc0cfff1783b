"""Demo with the attention decoder (Show, Attend and Tell) on the built-in shapes data, CPU-sized.

  python launch.py --config=configs/demo_attention.py --workdir=workdirs/demo_attention
  python launch.py --mode=caption --workdir=workdirs/demo_attention --images=workdirs/data/... \
      --attention_maps=workdirs/demo_attention/maps
Same data and training budget as configs/demo.py; the decoder attends over the trunk's spatial grid.
"""

from configs import demo


def get_config():
  config = demo.get_config()
  config.model.decoder = 'attention'
  return config
