"""benchmarks.peers without its PyTorch peers: --help works, a run says how to install them."""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*argv, code=None):
  cmd = [sys.executable] + (["-c", code] if code else ["-m", "benchmarks.peers", *argv])
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_help_needs_no_peers():
  out = run("--help")
  assert out.returncode == 0, out.stderr
  assert "--which" in out.stdout and "--json" in out.stdout


def test_parsing_imports_no_torch():
  out = run(
    code="import sys, benchmarks.peers as p; a = p.parse_args(['--small']); "
    "print(a.which, a.resolution, 'torch' in sys.modules)"
  )
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ["['if',", "'imagen']", "32", "False"]


def test_unknown_peer_is_a_usage_error():
  out = run("--which", "if,nope")
  assert out.returncode == 2
  assert "unknown peer" in out.stderr


@pytest.mark.skipif(
  importlib.util.find_spec("torch") is not None,
  reason="torch is importable: the peers may be installed",
)
def test_missing_peers_exit_2_with_install_hint():
  out = run("--small")
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1, out.stderr
  assert "missing" in lines[0] and "torch" in lines[0]
  assert "benchmarks/requirements-peers.txt" in lines[0]
  assert "--system-site-packages" in lines[0]
