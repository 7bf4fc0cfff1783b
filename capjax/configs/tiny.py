"""A tiny model and dataset for tests and smoke runs (seconds on a CPU)."""

from capjax.configs import demo


def get_config():
  config = demo.get_config()
  config.data.image_size = 32
  config.data.max_caption_len = 12
  config.data.min_word_count = 2
  config.data.shapes_num_train = 48
  config.data.shapes_num_validation = 16
  config.data.shapes_num_test = 16
  config.data.shapes_image_size = 48
  config.data.random_caption = False
  config.data.seq_per_img = 1  # tests count (image, caption) pairs; the shared pass has its own tests
  config.model.stage_sizes = (1, 1, 1, 1)
  config.model.width = 8
  config.model.embed_dim = 32
  config.model.hidden_size = 32
  config.train.batch_size = 16
  config.train.num_epochs = 2
  config.train.eval_batch_size = 16
  config.train.log_every_steps = 5
  config.train.metrics_every_epochs = 1
  config.train.metrics_num_images = 16
  return config
