"""Headless Chromium for tests that look at a page the way a person would (Debian's chromium and
chromium-driver, driven by selenium).

Nothing is downloaded: selenium is pointed at /usr/bin/chromium and /usr/bin/chromedriver, which skips
Selenium Manager (it would fetch a browser and a driver), and the browser runs with its background
networking, updates and sync switched off, in a fresh profile that is deleted afterwards.

    with browser.chromium() as driver:
      driver.get(pathlib.Path(report).as_uri())
      path = browser.save_screenshot(driver, 'eval_report', tmp_path)
"""

import contextlib
import os
import pathlib
import shutil
import tempfile

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM = '/usr/bin/chromium'
CHROMEDRIVER = '/usr/bin/chromedriver'
# CAPJAX_SAVE_SCREENSHOTS=1 writes the README's screenshots here instead of to the test's tmp dir.
SCREENSHOT_DIR = pathlib.Path(__file__).resolve().parent.parent / 'docs' / 'images'
FLAGS = ('--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync',
         '--disable-default-apps', '--disable-extensions', '--disable-dev-shm-usage', '--hide-scrollbars')

# CI sets CAPJAX_REQUIRE_BROWSER=1 (after installing the browser), so there a missing browser fails the
# browser tests instead of skipping them.
needs_chromium = pytest.mark.skipif(
    not os.environ.get('CAPJAX_REQUIRE_BROWSER') and not os.path.exists(CHROMIUM),
    reason=f'{CHROMIUM} is missing: `apt-get install -y chromium chromium-driver` runs the browser tests')


@contextlib.contextmanager
def chromium(width: int = 1280, height: int = 900):
  """A selenium WebDriver for a fresh headless Chromium with a `width` x `height` window; quit on exit."""
  profile = tempfile.mkdtemp(prefix='capjax-chromium-')
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in (*FLAGS, f'--user-data-dir={profile}', f'--window-size={width},{height}'):
    options.add_argument(flag)
  driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
  try:
    driver.set_page_load_timeout(60)
    yield driver
  finally:
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def screenshot_path(name: str, tmp_dir, *, for_readme: bool = False) -> pathlib.Path:
  """<tmp_dir>/<name>.png, or docs/images/<name>.png for a README picture when CAPJAX_SAVE_SCREENSHOTS=1
  (`CAPJAX_SAVE_SCREENSHOTS=1 python -m pytest tests/test_report.py` refreshes them)."""
  to_docs = for_readme and os.environ.get('CAPJAX_SAVE_SCREENSHOTS') == '1'
  folder = SCREENSHOT_DIR if to_docs else pathlib.Path(tmp_dir)
  folder.mkdir(parents=True, exist_ok=True)
  return folder / f'{name}.png'


def save_screenshot(driver, name: str, tmp_dir, *, for_readme: bool = False) -> pathlib.Path:
  """A PNG of what the window shows now, at `screenshot_path(...)`; returns its path."""
  path = screenshot_path(name, tmp_dir, for_readme=for_readme)
  if not driver.save_screenshot(str(path)):
    raise RuntimeError(f'chromium could not save a screenshot to {path}')
  return path
