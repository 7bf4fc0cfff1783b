from capjax.configs.default import get_config  # noqa: F401
