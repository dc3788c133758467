"""A lock file that says who holds it: pid, host and a heartbeat.

  with lockfile.hold(os.path.join(workdir, '.lock'), what='training workdir'):
    ...  # nobody else holds this path meanwhile

The lock is a small JSON file (`pid`, `host`, `what`, `since`, `token`)
created atomically with O_CREAT | O_EXCL, so it works on local and shared
(NFS-style) filesystems alike. While it is held, a daemon thread touches the
file every `heartbeat` seconds: its mtime is the heartbeat.

A second `hold` on the same path raises `Locked` (one line naming the
holder's pid and host), or waits for it with `wait=` seconds (None: as long
as the holder lives). A stale lock is taken over with a warning: one whose
pid is gone on this host, or whose heartbeat is older than `stale_after`
seconds (the only test possible for a holder on another host). Takeovers are
serialized through a second O_EXCL file, so two waiters never both win.

A leaf module: standard library only.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Iterator

_log = logging.getLogger(__name__)
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0
# A lock file without readable content (its creator died between creating
# and writing it, microseconds) counts as stale after this many seconds.
_UNREADABLE_GRACE_S = 10.0
_TAKEOVER_SUFFIX = ".takeover"


class Locked(RuntimeError):
  """The path is held by another live process (the message names it)."""


def _host() -> str:
  return socket.gethostname()


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Another user's live process.
    return True
  return True


def read(path: str | os.PathLike) -> tuple[dict[str, Any], float] | None:
  """(holder info, heartbeat age in seconds) of a lock file, None if absent.

  The info is {} when the file exists but holds no readable JSON yet.
  """
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
    age = time.time() - os.stat(path).st_mtime
  except FileNotFoundError:
    return None
  try:
    info = json.loads(text)
  except ValueError:
    info = {}
  return (info if isinstance(info, dict) else {}), age


def _stale_reason(info: dict[str, Any], age: float, stale_after: float) -> str | None:
  """Why a lock is stale (a phrase for the warning), or None if it is live."""
  if not info:
    return f"unreadable lock file, {age:.0f} s old" if age > _UNREADABLE_GRACE_S else None
  if info.get("host") == _host() and not _pid_alive(int(info.get("pid", -1))):
    return f"pid {info.get('pid')} is gone"
  if age > stale_after:
    return f"no heartbeat for {age:.0f} s (limit {stale_after:.0f} s)"
  return None


def _describe(info: dict[str, Any], age: float) -> str:
  if not info:
    return "a process that is still writing the lock file"
  return (
    f"pid {info.get('pid')} on host {info.get('host')} since "
    f"{info.get('since')} (heartbeat {age:.0f} s ago)"
  )


def _take_over(path: str, seen: dict[str, Any], reason: str) -> None:
  """Removes the stale lock `seen` unless someone else is taking it over."""
  guard = path + _TAKEOVER_SUFFIX
  try:
    fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    try:  # A takeover takes microseconds: an old guard is a dead one's.
      if time.time() - os.stat(guard).st_mtime > _UNREADABLE_GRACE_S:
        os.unlink(guard)
    except FileNotFoundError:
      pass
    return
  try:
    current = read(path)
    # Someone else may have taken it over already and hold it now.
    if current is not None and current[0].get("token") == seen.get("token"):
      os.unlink(path)
      _log.warning(
        "Taking over the stale lock %s of %s: %s.", path, _describe(seen, current[1]), reason
      )
  finally:
    os.close(fd)
    os.unlink(guard)


def _create(path: str, what: str) -> dict[str, Any] | None:
  """Creates the lock file atomically; its info, or None if it exists."""
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return None
  info = {
    "pid": os.getpid(),
    "host": _host(),
    "what": what,
    "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "token": uuid.uuid4().hex,
  }
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    json.dump(info, f)
  return info


def _heartbeat(path: str, token: str, interval: float, stop: threading.Event) -> None:
  """Touches the lock every `interval` s while it is still ours."""
  while not stop.wait(interval):
    current = read(path)
    if current is None or current[0].get("token") != token:
      _log.warning("Lock %s is no longer held by this process (taken over as stale?).", path)
      return
    with contextlib.suppress(FileNotFoundError):
      os.utime(path)


def _release(path: str, token: str) -> None:
  current = read(path)
  if current is not None and current[0].get("token") == token:
    os.unlink(path)


@contextlib.contextmanager
def hold(
  path: str | os.PathLike,
  what: str = "this folder",
  *,
  wait: float | None = 0.0,
  stale_after: float = STALE_AFTER_S,
  heartbeat: float = HEARTBEAT_S,
  poll: float = 0.5,
) -> Iterator[dict[str, Any]]:
  """Holds the lock file `path` for the duration of the `with` block.

  Args:
    path: the lock file (its folder must exist); removed on exit.
    what: what the lock protects, for messages (e.g. 'training workdir').
    wait: seconds to wait for a live holder before raising `Locked`; 0 raises
      at once, None waits as long as the holder lives.
    stale_after: a heartbeat older than this makes the lock stale.
    heartbeat: seconds between heartbeats (well below `stale_after`).
    poll: seconds between attempts while waiting.

  Yields:
    This holder's info: {'pid', 'host', 'what', 'since', 'token'}.

  Raises:
    Locked: another live process holds `path` (after `wait` seconds).
  """
  path = os.fspath(path)
  deadline = None if wait is None else time.monotonic() + wait
  announced = False
  while True:
    info = _create(path, what)
    if info is not None:
      break
    current = read(path)
    if current is None:
      continue  # Released meanwhile: try again at once.
    holder, age = current
    reason = _stale_reason(holder, age, stale_after)
    if reason is not None:
      _take_over(path, holder, reason)
      time.sleep(0.01)  # If another waiter was taking over, let it finish.
      continue
    if deadline is not None and time.monotonic() >= deadline:
      raise Locked(
        f"{what} is locked by {_describe(holder, age)}: {path} "
        f"(a lock whose process is gone is taken over)."
      )
    if not announced:
      _log.warning("Waiting for %s to release %s (%s).", _describe(holder, age), what, path)
      announced = True
    time.sleep(poll)
  stop = threading.Event()
  beat = threading.Thread(
    target=_heartbeat,
    name=f"lock heartbeat {path}",
    args=(path, info["token"], heartbeat, stop),
    daemon=True,
  )
  beat.start()
  try:
    yield info
  finally:
    stop.set()
    beat.join()
    _release(path, info["token"])
