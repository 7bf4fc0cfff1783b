"""capjax.images: one image rule for prepare, training and captioning."""

import io

import numpy as np
from PIL import Image
import pytest

from capjax import images
from capjax import inference
from capjax import input_pipeline
from capjax.data import prepare

import flickr_fixtures as ff


@pytest.mark.parametrize('kind', ff.STORED_RGB_KINDS + ff.CONVERTED_KINDS)
def test_files_are_kept_as_they_are_and_conversions_named(tmp_path, kind):
  path = tmp_path / 'a.jpg'
  path.write_bytes(ff.image_file_bytes(kind, seed=1))
  data, conversion = images.read_image_file(path)
  assert data == path.read_bytes()
  assert (conversion is not None) == (kind in ff.CONVERTED_KINDS), conversion
  image = images.load_image(data)
  assert (image.mode, image.size) == ('RGB', ff.IMAGE_SIZE)


@pytest.mark.parametrize('kind', ff.BAD_KINDS)
def test_undecodable_images_raise_bad_image_error(tmp_path, kind):
  path = tmp_path / 'a.jpg'
  path.write_bytes(ff.image_file_bytes(kind, seed=1))
  with pytest.raises(images.BadImageError) as error:
    images.read_image_file(path)
  assert error.value.path == str(path) and error.value.reason
  assert str(path) in str(error.value)


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
  levels = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)  # 0, 257, ... 65535
  out = io.BytesIO()
  Image.fromarray(levels).save(out, format='PNG')
  pixels = np.asarray(images.load_image(out.getvalue()))
  np.testing.assert_array_equal(pixels[..., 0], np.arange(256).reshape(16, 16))
  assert (pixels[..., 0] == pixels[..., 2]).all()
  # What PIL alone does, and why the rule exists: almost everything becomes white.
  clipped = np.asarray(Image.open(io.BytesIO(out.getvalue())).convert('RGB'))
  assert (clipped == 255).mean() > 0.9


def test_alpha_is_composited_on_white():
  rgba = np.zeros((2, 2, 4), np.uint8)
  rgba[0, 0] = (200, 10, 10, 255)  # opaque red
  rgba[0, 1] = (200, 10, 10, 0)  # invisible: white
  rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black: mid grey
  pixels = np.asarray(images.load_image(Image.fromarray(rgba, 'RGBA')))
  assert tuple(pixels[0, 0]) == (200, 10, 10)
  assert tuple(pixels[0, 1]) == (255, 255, 255)
  assert abs(int(pixels[1, 0, 0]) - 127) <= 1


def test_training_and_captioning_see_the_same_pixels(tmp_path):
  """The same RGBA/LA/P/CMYK/16-bit files, prepared into the dataset and read by the pipeline, or
  given to the captioner, give identical model inputs."""
  kinds = {f'{kind}.png': kind for kind in ff.CONVERTED_KINDS + ('rgb',)}
  ff.write_images(tmp_path / 'manual' / 'Images', kinds)
  lines = ['image,caption'] + [f'{name},a picture of {kind}' for name, kind in kinds.items()]
  (tmp_path / 'manual' / 'captions.txt').write_text('\n'.join(lines) + '\n')
  prepare.prepare_dataset('flickr30k', tmp_path / 'data', manual_dir=tmp_path / 'manual')
  splits = prepare.open_splits('flickr30k', tmp_path / 'data')
  size = 24
  stored = {}
  for source in splits.values():
    for batch in input_pipeline.caption_batches(source, image_size=size, host_batch_size=8):
      stored.update(zip(batch['image_id'], batch['image']))
  assert sorted(stored) == sorted(kinds)
  paths = [str(tmp_path / 'manual' / 'Images' / name) for name in sorted(kinds)]
  given = inference._LoadedImages(paths, size)  # what ImageCaptioner.caption feeds the model
  for batch in input_pipeline.caption_batches(given, image_size=size, host_batch_size=8):
    for index, pixels in zip(batch['index'], batch['image']):
      if index >= 0:
        np.testing.assert_array_equal(pixels, stored[sorted(kinds)[index]], err_msg=paths[index])
