from capjax.configs.demo_scst import get_config  # noqa: F401
