"""train.py with a pause at a named point, for the signal tests.

  python tests/paused_train.py POINT SECONDS [train.py flags ...]

The pause is monkeypatched in here, so the trainer carries no test hook:
POINT 'setup' pauses after the workdir's config.json is written (locks held,
before the text encoder loads); 'save' after every checkpoint save. It prints
``[test pause] POINT`` first, so a test knows when to send its signal.
"""

import os
import runpy
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pausing(fn, point: str, seconds: float):
  def wrapped(*args, **kwargs):
    out = fn(*args, **kwargs)
    print(f"[test pause] {point}", flush=True)
    time.sleep(seconds)
    return out

  return wrapped


def main() -> None:
  point, seconds, flags = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
  sys.path.insert(0, ROOT)
  from imagen_jax.train import checkpoint, fingerprint  # pylint: disable=import-outside-toplevel

  if point == "setup":
    fingerprint.write_config_once = _pausing(fingerprint.write_config_once, point, seconds)
  elif point == "save":
    cls = checkpoint.StageCheckpointer
    cls.save = _pausing(cls.save, point, seconds)
  else:
    raise SystemExit(f"unknown pause point {point!r}: setup or save")
  sys.argv = [os.path.join(ROOT, "train.py"), *flags]
  runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
  main()
