from capjax.configs.flickr8k_gpu import get_config  # noqa: F401
