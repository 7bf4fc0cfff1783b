from capjax.configs.flickr8k_attention import get_config  # noqa: F401
