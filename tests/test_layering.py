"""The package's import layering: nothing low imports something high.

Reads every module's imports (module level and inside functions) and checks
them against the dependency order that the README's layout section states:

  axes, config, safetensors_dir, lockfile, cli, jsonfile   (leaves)
  diffusion (no flax, no models)   parallel
  models   text   data
  stages
  run
  cascade   convert
  eval   train
"""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "imagen_jax")

LEAVES = {"axes", "config", "safetensors_dir", "lockfile", "cli", "jsonfile"}
# component → the imagen_jax components it may import (besides itself and the leaves).
ALLOWED = {
  "diffusion": set(),
  "parallel": set(),
  "models": {"parallel"},
  "text": {"parallel"},
  "data": {"parallel", "text"},
  "stages": {"diffusion", "models", "parallel"},
  "run": {"parallel", "stages"},
  "cascade": {"diffusion", "models", "parallel", "run", "stages", "text"},
  "convert": {"diffusion", "models", "parallel", "run", "stages", "text"},
  "eval": {"cascade", "data", "diffusion", "models", "parallel", "run", "stages", "text"},
  "train": {"cascade", "data", "diffusion", "eval", "models", "parallel", "run", "stages", "text"},
}
ALLOWED.update({leaf: set() for leaf in LEAVES})
NO_FLAX = {"diffusion"}


def _imports(path):
  """(line, imported module) for every import in a file, nested ones included."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      if node.module == "imagen_jax":
        for alias in node.names:
          yield node.lineno, f"imagen_jax.{alias.name}"
      else:
        yield node.lineno, node.module


def _modules():
  for root, _, files in os.walk(PACKAGE):
    for name in sorted(files):
      if name.endswith(".py"):
        path = os.path.join(root, name)
        parts = os.path.relpath(path, PACKAGE)[:-3].split(os.sep)
        yield path, parts[0]


def upward_imports():
  """Every import that breaks the layering, as 'file:line imports X' strings."""
  bad = []
  for path, component in _modules():
    rel = os.path.relpath(path, os.path.dirname(PACKAGE))
    for line, module in _imports(path):
      top = module.split(".")
      if top[0] == "flax" and component in NO_FLAX:
        bad.append(f"{rel}:{line} imports {module} ({component}/ never uses flax)")
      if top[0] != "imagen_jax" or len(top) < 2:
        continue
      target = top[1]
      if target == component or target in LEAVES:
        continue
      if component not in ALLOWED:
        bad.append(f"{rel}:{line}: component {component!r} is not in the layering table")
      elif target not in ALLOWED[component]:
        bad.append(f"{rel}:{line} imports imagen_jax.{target} ({component} sits below it)")
  return bad


def test_every_component_is_in_the_table():
  components = {c for _, c in _modules() if c != "__init__"}
  assert components <= set(ALLOWED), sorted(components - set(ALLOWED))


def test_no_upward_imports():
  assert upward_imports() == []


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
  # A copy of one low module with an import of the trainer must be reported.
  pkg = tmp_path / "imagen_jax"
  (pkg / "diffusion").mkdir(parents=True)
  (pkg / "diffusion" / "bad.py").write_text(
    "def f():\n  from imagen_jax.train import trainer\n  import flax\n"
  )
  monkeypatch.setattr(__import__(__name__), "PACKAGE", str(pkg))
  found = upward_imports()
  assert any("imports imagen_jax.train" in b for b in found), found
  assert any("never uses flax" in b for b in found), found


if __name__ == "__main__":
  raise SystemExit(pytest.main([__file__]))
