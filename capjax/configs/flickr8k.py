"""Flickr8k with the seed recipe (alias of default.py; kept so commands read naturally)."""

from capjax.configs import default


def get_config():
  return default.get_config()
