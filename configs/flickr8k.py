from capjax.configs.flickr8k import get_config  # noqa: F401
