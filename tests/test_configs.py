"""Every config in configs/ builds what a run builds from it (the model, the input pipeline's settings,
the objective's checks), so a README command naming one cannot fail on a stale field."""

import importlib
import pathlib

import jax
import jax.numpy as jnp
import pytest

from capjax import input_pipeline
from capjax import scst
from capjax.models import captioner

CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).parent.parent / 'configs').glob('*.py')
                 if p.stem != '__init__')


def test_the_configs_are_found():
  assert {'default', 'demo', 'demo_scst', 'flickr8k', 'flickr8k_gpu'} <= set(CONFIGS)


@pytest.mark.parametrize('name', CONFIGS)
def test_config_builds_the_model_and_the_pipeline_settings(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  scst.check_config(config)
  pipeline = input_pipeline.PipelineConfig.from_config(config)
  assert pipeline.image_size == config.data.image_size
  model = captioner.build_captioner(config.model, vocab_size=40)
  # Shapes only (no compile): the config's model traces at its own image size.
  shapes = jax.eval_shape(lambda key: captioner.init_variables(model, key, config.data.image_size,
                                                               config.data.max_caption_len),
                          jax.random.key(0))
  assert jax.tree.leaves(shapes)


def test_the_gpu_config_is_what_the_readme_says():
  config = importlib.import_module('configs.flickr8k_gpu').get_config()
  model = captioner.build_captioner(config.model, vocab_size=40)
  assert model.dtype == jnp.bfloat16
  assert config.data.device_resident and config.data.augment.on_device
  assert (config.train.batch_size, config.data.seq_per_img, config.data.num_workers) == (256, 5, 8)
