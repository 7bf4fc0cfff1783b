"""Errors whose message tells a user everything: launch.py prints them in one line, without a traceback.

Raise these for conditions a user causes and can fix (a refused resume, a broken checkpoint, a locked
workdir, diverged training, bad input); programming errors stay ordinary exceptions with tracebacks.
"""


class CapjaxError(Exception):
  """Base class: the message names the file or field and what was expected."""


class ConfigMismatch(CapjaxError):
  """A run would resume from checkpoints made with another config or vocabulary."""


class CheckpointError(CapjaxError):
  """A checkpoint that cannot be read, or a step that does not exist."""


class DiskFull(CapjaxError):
  """A file could not be written for lack of space; what was written before is intact."""


class TrainingDiverged(CapjaxError):
  """The loss or gradient norm became NaN/Inf."""


class WorkdirLocked(CapjaxError):
  """Another training process holds the workdir."""


class InputError(CapjaxError):
  """Bad user input: files, globs, output paths."""
