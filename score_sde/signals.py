"""One signal policy for every mode (train, eval, sample, fid_stats, all, train_classifier).

SIGTERM / SIGINT (a preemption, a ``kill``, Ctrl-C) do not kill the process on the spot: they set
a flag that the running unit of work checks at its next safe point (after a compiled training
call, after a sample batch, between evaluation parts). There it saves what is resumable and raises
:class:`Interrupted`; the command line then skips every later phase and exits with status
128 + signal number (143 for SIGTERM, 130 for SIGINT) and a one-line message. Rerunning the same
command resumes.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

__all__ = ["Interrupted", "StopSignals"]

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
  """A stop signal ended the run at a safe point; what was resumable has been saved."""

  def __init__(self, message: str, signum: int = signal.SIGTERM):
    super().__init__(message)
    self.signum = int(signum)

  @property
  def exit_code(self) -> int:
    return 128 + self.signum


class StopSignals:
  """Context manager that turns SIGTERM / SIGINT into a flag (``requested``, ``name``).

  Nested uses share the flag of the outermost one, so a signal received while one mode runs is
  still seen by the phases after it (which then do not start). Outside the main thread it
  installs nothing (Python delivers signals to the main thread only).
  """

  _active: list["StopSignals"] = []

  def __init__(self):
    self._requested: Optional[int] = None
    self._old: dict = {}

  @property
  def requested(self) -> bool:
    return self._root()._requested is not None

  @property
  def name(self) -> Optional[str]:
    signum = self._root()._requested
    return None if signum is None else signal.Signals(signum).name

  def _root(self) -> "StopSignals":
    return StopSignals._active[0] if StopSignals._active else self

  def _handler(self, signum, frame):
    del frame
    self._requested = signum

  def check(self, what: str) -> None:
    """Raises :class:`Interrupted` (``what``: what was saved) if a stop signal arrived."""
    signum = self._root()._requested
    if signum is not None:
      raise Interrupted(f"Received {signal.Signals(signum).name}: {what}", signum)

  def __enter__(self):
    if not StopSignals._active and threading.current_thread() is threading.main_thread():
      for sig in _SIGNALS:
        self._old[sig] = signal.signal(sig, self._handler)
    StopSignals._active.append(self)
    return self

  def __exit__(self, *exc):
    StopSignals._active.remove(self)
    for sig, old in self._old.items():
      signal.signal(sig, old)
    return False
