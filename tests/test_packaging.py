"""The installable package (pyproject.toml): a wheel built from the sources, installed into a fresh venv,
gives a `capjax` command that runs from any folder, with the package data and configs inside; the
pins agree with requirements*.txt.

Offline and fast: the wheel is built without build isolation (this venv's setuptools), installed without
dependencies, and the fresh venv sees this venv's packages through a .pth file, never the checkout.
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE_DATA = ('capjax/evaluation/static/report.css', 'capjax/serve/static/page.html',
                'capjax/configs/demo.py', 'capjax/configs/default.py', 'capjax/configs/tiny.py')


def _clean_env() -> dict:
  return {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONHOME')}


@pytest.fixture(scope='module')
def wheel(tmp_path_factory) -> pathlib.Path:
  """The wheel, built from a copy of what it is made of (the build writes build/ and *.egg-info next to
  its sources, which must not land in the checkout)."""
  base = tmp_path_factory.mktemp('packaging')
  sources = base / 'src'
  shutil.copytree(ROOT / 'capjax', sources / 'capjax', ignore=shutil.ignore_patterns('__pycache__'))
  for name in ('pyproject.toml', 'README.md'):
    shutil.copy(ROOT / name, sources / name)
  done = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation',
                         '--no-index', '--wheel-dir', str(base / 'dist'), str(sources)],
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
  (built,) = (base / 'dist').glob('capjax-*.whl')
  return built


@pytest.fixture(scope='module')
def venv(wheel, tmp_path_factory) -> pathlib.Path:
  """A fresh venv with the wheel installed, this venv's site-packages (jax, flax...) on its path."""
  home = tmp_path_factory.mktemp('venv') / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(home)], check=True, timeout=120)
  python = home / 'bin' / 'python'
  site = subprocess.run([str(python), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                        capture_output=True, text=True, check=True).stdout.strip()
  ours = {sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']}
  pathlib.Path(site, 'outer_venv.pth').write_text('\n'.join(sorted(ours)) + '\n')
  done = subprocess.run([sys.executable, '-m', 'pip', '--python', str(python), 'install', '--no-deps',
                         '--no-index', str(wheel)], capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
  return home


def test_the_wheel_holds_the_package_data_and_the_command(wheel):
  names = zipfile.ZipFile(wheel).namelist()
  assert set(PACKAGE_DATA) <= set(names), sorted(set(PACKAGE_DATA) - set(names))
  assert not any(n.startswith(('tests/', 'configs/', 'benchmarks/', 'examples/')) for n in names)
  entry_points = next(n for n in names if n.endswith('entry_points.txt'))
  assert 'capjax = capjax.main:run' in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_installed_command_runs_from_anywhere(venv, tmp_path):
  where = subprocess.run([str(venv / 'bin' / 'python'), '-c', 'import capjax; print(capjax.__file__)'],
                         cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=120)
  assert where.returncode == 0, where.stderr[-2000:]
  assert pathlib.Path(where.stdout.strip()).is_relative_to(venv), where.stdout  # the wheel's, not ours
  done = subprocess.run([str(venv / 'bin' / 'capjax'), '--help'], cwd=tmp_path, env=_clean_env(),
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 1, done.stderr[-3000:]  # absl's --help exits 1 (so does launch.py's)
  assert '--mode' in done.stdout and '--export_dir' in done.stdout and 'capjax --mode=export' in done.stdout
  default = re.search(r"--config: .*\n\s*\(default: '([^']+)'\)", done.stdout).group(1)
  assert str(venv) in re.sub(r'\n\s*', '', default)  # absl wraps a long path after a hyphen


def test_the_installed_command_loads_its_packaged_default_config(venv, tmp_path):
  """The default --config is the packaged demo; eval then needs a workdir: one error line."""
  env = dict(_clean_env(), JAX_PLATFORMS='cpu', XLA_FLAGS='')
  done = subprocess.run([str(venv / 'bin' / 'capjax'), '--mode=eval', '--workdir=nowhere'], cwd=tmp_path,
                        env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1].startswith('error: ') and 'config.json not found' in done.stderr


def _requirements(name: str) -> list[str]:
  lines = (ROOT / name).read_text().splitlines()
  return [line.strip() for line in lines if line.strip() and not line.startswith(('#', '-r'))]


def test_the_pins_are_the_requirement_files():
  project = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
  extras = project['optional-dependencies']
  assert project['dependencies'] == _requirements('requirements.txt')
  assert extras['torch'] == _requirements('requirements-torch.txt')
  assert extras['cuda'] == _requirements('requirements-cuda.txt')
  assert extras['tpu'] == _requirements('requirements-tpu.txt')
  assert extras['test'] == ['capjax[torch]', *_requirements('requirements-test.txt')]
  assert set(extras['serve']) <= set(project['dependencies'])
  assert project['scripts'] == {'capjax': 'capjax.main:run'}
