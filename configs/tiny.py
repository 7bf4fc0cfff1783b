from capjax.configs.tiny import get_config  # noqa: F401
