"""Reading the JSON files a converter or a run folder holds, with one-line errors.

Used by the converters (diffusers configs, scheduler configs, model indexes) and by
``run`` (a run's ``config.json``). Remote paths (``gs://...``) go through
``etils.epath``, imported only for them: the fixture generators under ``tools/`` read
IF's constants through ``convert.if_config`` in an environment without it.
"""

import json
import os
import pathlib
from typing import Any


def read_json(path: Any, what: str = "") -> dict:
  """The JSON object in ``path``.

  Args:
    path: a local path or an ``epath``-readable URL.
    what: why the file should be there, added to the message when it is not.

  Raises:
    FileNotFoundError: no such file (naming it and ``what``).
    ValueError: not valid UTF-8 JSON, or JSON that is not an object (naming it).
  """
  if "://" in os.fspath(path):
    from etils import epath  # pylint: disable=import-outside-toplevel

    p = epath.Path(path)
  else:
    p = pathlib.Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"{path} not found" + (f": {what}" if what else ""))
  try:
    data = json.loads(p.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON ({' '.join(str(e).split())})") from None
  if not isinstance(data, dict):
    raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object")
  return data
