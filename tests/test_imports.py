"""Every module under imagen_jax/, benchmarks/ and tools/ imports.

One test per module (its id is the module name), imported with importlib in this
process. Tools import PyTorch (their own venv, `tools/requirements.txt`): they skip
when PyTorch is absent and fail on any other missing module; nothing else may skip.
"""

import importlib
import importlib.util
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("imagen_jax", "benchmarks", "tools")
# What the tools' own venv brings (tools/requirements.txt), and nothing here needs.
TORCH_STACK = frozenset({"torch", "torchvision", "diffusers", "pytorch_fid"})


def module_names(packages=PACKAGES, root=ROOT) -> list[str]:
  """Dotted names of every .py file under `packages` (a package is its __init__)."""
  names = []
  for package in packages:
    for path in sorted((root / package).rglob("*.py")):
      parts = list(path.relative_to(root).with_suffix("").parts)
      if parts[-1] == "__init__":
        parts.pop()
      names.append(".".join(parts))
  return names


def _params():
  for name in module_names():
    yield pytest.param(name, id=name)


def test_every_package_is_listed():
  names = module_names()
  for package in PACKAGES:
    assert package in names or any(n.startswith(package + ".") for n in names), package
  # The walk finds nested modules and __main__ files, not only the top level.
  assert {"imagen_jax.train.trainer", "imagen_jax.convert.__main__"} <= set(names)
  assert all(os.sep not in n and not n.endswith(".py") for n in names)


@pytest.mark.parametrize("name", _params())
def test_module_imports(name):
  try:
    importlib.import_module(name)
  except ModuleNotFoundError as e:
    top = (e.name or "").split(".")[0]
    torch_absent = importlib.util.find_spec("torch") is None
    if name.startswith("tools.") and top in TORCH_STACK and torch_absent:
      pytest.skip(f"{name} needs PyTorch (tools/requirements.txt): {e}")
    raise AssertionError(f"module {name} does not import: {e!r}") from e
  except Exception as e:  # pylint: disable=broad-except
    raise AssertionError(f"module {name} does not import: {e!r}") from e
