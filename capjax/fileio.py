"""Files that are never left half-written: write to a temporary name next to the target, then rename.

A reader (or a resumed run) sees either the old file or the new one, never a truncated one: `os.replace`
is atomic on POSIX file systems when both names are in the same directory.
"""

from collections.abc import Callable
import errno
import json
import os
from typing import IO, Any

import numpy as np

from capjax import errors


def write_atomically(path: str, write: Callable[[IO], Any], *, binary: bool = False) -> None:
  """Calls `write(file)` on a temporary file beside `path`, then renames it to `path`."""
  # The pid keeps two processes (hosts sharing a workdir, or a stale writer) off each other's temp file.
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, 'wb' if binary else 'w', **({} if binary else {'encoding': 'utf-8'})) as f:
      write(f)
    os.replace(tmp, path)
  except OSError as e:
    if e.errno != errno.ENOSPC:
      raise
    raise errors.DiskFull(f'{path} could not be written: no space left on its disk; the previous '
                          'version of the file, if any, is intact') from None
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str, payload: Any, *, indent: int | None = 1) -> None:
  write_atomically(path, lambda f: json.dump(payload, f, indent=indent, ensure_ascii=False))


def write_text(path: str, text: str) -> None:
  write_atomically(path, lambda f: f.write(text))


def write_npy(path: str, array: np.ndarray) -> None:
  write_atomically(path, lambda f: np.save(f, array), binary=True)


def read_json(path: str) -> Any:
  with open(path, encoding='utf-8') as f:
    return json.load(f)
