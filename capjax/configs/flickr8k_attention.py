"""Flickr8k with the attention decoder: ResNet50's 7x7x2048 grid at 224 px, resized to 14x14 cells as
the best-known PyTorch implementations do (AdaptiveAvgPool2d((14, 14))), soft attention as in Xu et al.

  python launch.py --config=configs/flickr8k_attention.py --workdir=/tmp/capjax_flickr8k_attention
  python launch.py --mode=caption --workdir=/tmp/capjax_flickr8k_attention --images='photos/*.jpg' \
      --attention_maps=/tmp/maps

With a frozen ImageNet trunk (--config.model.encoder_mode=cached --config.model.encoder_init=...pth), the
cached grid is float16: 8,000 images x 14 x 14 x 2048 x 2 bytes = 6.4 GB (1.6 GB with attention_grid=0,
the native 7x7).
"""

from capjax.configs import default


def get_config():
  config = default.get_config()
  config.model.decoder = 'attention'
  config.model.attention_grid = 14
  return config
