from capjax.configs.demo import get_config  # noqa: F401
