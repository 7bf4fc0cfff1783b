from capjax.configs.demo_attention import get_config  # noqa: F401
