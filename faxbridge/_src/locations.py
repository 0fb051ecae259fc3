"""Turn a JAX equation's ``source_info`` into the user's ``file:line`` for error messages."""

from __future__ import annotations

import inspect
import os
import traceback

from faxbridge._src.jax_internals import is_user_filename, user_frames

# faxbridge/_src/locations.py -> the checkout (or site-packages) holding faxbridge/ and converters/.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Frames inside these folders are ours or JAX's, never the line a user wants to see.
_INTERNAL_DIRS = tuple(
    os.path.join(_PACKAGE_ROOT, d) + os.sep for d in ("faxbridge", "converters")
)


def _is_internal(file_name: str) -> bool:
  return file_name.startswith(_INTERNAL_DIRS) or is_user_filename(file_name) is False


def user_frame(source_info):
  """The innermost user frame of ``source_info`` (``file_name``, ``function_name``, ``start_line``,
  ``start_column``, ``end_line``, ``end_column``: the span of the call being made), or None."""
  if source_info is None or source_info.traceback is None:
    return None
  return next((f for f in user_frames(source_info.traceback) if not _is_internal(f.file_name)),
              None)


def user_location(source_info) -> str | None:
  """``file:line (function)`` of the innermost user frame of ``source_info``, or None."""
  frame = user_frame(source_info)
  return None if frame is None else f"{frame.file_name}:{frame.start_line} ({frame.function_name})"


def describe(source_info, fallback=None) -> str:
  """`` at file:line (function)`` or the empty string when JAX kept no traceback.

  ``fallback`` (the source_info of the enclosing equation) is used when ``source_info`` has no
  user frame: an equation inside a jitted or custom_jvp library function (``jax.nn.relu``) then
  points at the user's call of that function.
  """
  where = user_location(source_info) or user_location(fallback)
  return f" at {where}" if where else ""


def enclosing(source_info, fallback=None):
  """The source_info to fall back on inside an equation's sub-jaxpr: its own if it names user
  code, else the one it fell back on itself."""
  return source_info if user_location(source_info) else fallback


def traceback_location(exc: BaseException) -> str:
  """`` at file:line (function)`` of the innermost user frame of an exception's traceback."""
  for frame in reversed(traceback.extract_tb(exc.__traceback__)):
    if is_user_filename(frame.filename) and not _is_internal(frame.filename) \
        and "importlib" not in frame.filename and not frame.filename.startswith("<"):
      return f" at {frame.filename}:{frame.lineno} ({frame.name})"
  return ""


def definition(fn) -> str:
  """``file:line`` where the function ``fn`` is defined (its ``def``), or the empty string."""
  code = getattr(inspect.unwrap(fn), "__code__", None)
  return f"{code.co_filename}:{code.co_firstlineno}" if code is not None else ""
