r"""README's picture of the serve page, taken from a real `launch.py --mode=serve` on a trained model.

  python launch.py                                   # once: trains workdirs/demo
  python docs/serve_screenshot.py                    # -> docs/images/serve_page.png
  python docs/serve_screenshot.py --workdir=workdirs/demo_attention --word=3   # an attention model

Starts the server on a free localhost port, opens the page in headless Chromium (Debian's chromium and
chromium-driver, see tests/browser.py; nothing is downloaded), uploads the first --images held-out test
images of the model's dataset through the file picker, waits until every caption is shown and saves the
window. For an attention model `--word=N` first clicks the N-th word of the first image so its map shows.
"""

import argparse
import os
import pathlib
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path[0] = str(REPO)
sys.path.insert(1, str(REPO / 'tests'))

import browser  # noqa: E402  (tests/browser.py)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from benchmarks import serve_load  # noqa: E402
from capjax import workdir as workdir_lib  # noqa: E402
from capjax.data import prepare  # noqa: E402
from capjax.data import records as records_lib  # noqa: E402


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='workdirs/demo')
  parser.add_argument('--images', type=int, default=3)
  parser.add_argument('--first', type=int, default=0, help='index of the first test image')
  parser.add_argument('--beam_size', type=int, default=3, help='the page\'s default decoding')
  parser.add_argument('--word', type=int, default=-1, help='attention models: the word to show (-1: none)')
  parser.add_argument('--output', default=str(browser.SCREENSHOT_DIR / 'serve_page.png'))
  return parser.parse_args()


def main():
  args = parse_args()
  config = workdir_lib.load_config(args.workdir)
  test = prepare.open_dataset(config.data, build_demo=False)['test']
  port = serve_load.free_port()
  url = f'http://127.0.0.1:{port}'
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    paths = []
    for index in range(args.first, args.first + args.images):
      record = test[index]
      path = tmp / os.path.basename(records_lib.as_text(record['image_id']))
      path.write_bytes(record['image'])
      paths.append(str(path))
    log = str(tmp / 'server.log')
    server = serve_load.start_server(os.path.abspath(args.workdir), port, log, beam_size=args.beam_size,
                                     max_batch_size=8, max_wait_ms=10.0)
    try:
      serve_load.wait_until_serving(url, server, log)
      with browser.chromium(1280, 760) as driver:
        driver.get(url)
        wait = WebDriverWait(driver, 300)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#beam option'))
        driver.find_element(By.ID, 'files').send_keys('\n'.join(paths))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '.card')) == len(paths)
                   and not d.find_elements(By.CSS_SELECTOR, '.caption.pending'))
        wait.until(lambda d: 'captioned in' in d.find_element(By.ID, 'stats').text)
        if args.word >= 0:
          first = driver.find_elements(By.CSS_SELECTOR, '.card')[0]
          first.find_elements(By.CSS_SELECTOR, '.words button')[args.word].click()
        for card in driver.find_elements(By.CSS_SELECTOR, '.card'):
          name, caption = (card.find_element(By.CLASS_NAME, c).text for c in ('name', 'caption'))
          print(f'{name} -> {caption}')
        if not driver.save_screenshot(args.output):
          raise RuntimeError(f'chromium could not save {args.output}')
    finally:
      server.terminate()
      server.wait(timeout=60)
  print(f'wrote {args.output}')


if __name__ == '__main__':
  main()
