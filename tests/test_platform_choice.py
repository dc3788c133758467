"""Where libtpu is installed but no TPU is attached, our entry points run on the CPU
without starting libtpu (whose warnings would fill a newcomer's first screen); anywhere
the user or the host says otherwise, JAX chooses as always."""

import os
import subprocess
import sys

import pytest

from imagen_jax.parallel import distributed
from imagen_jax.parallel import topology
from tiny import ROOT


@pytest.mark.parametrize(
  "env, vendors, accel, plugins, want",
  [
    ({}, ["0x1af4", "0x8086"], [], [], "cpu"),  # a CPU VM
    ({"JAX_PLATFORMS": ""}, [], [], [], None),  # the user's choice, even an empty one
    ({"JAX_FORCE_TPU_INIT": "1"}, [], [], [], None),
    ({"TPU_ACCELERATOR_TYPE": "v5p-8"}, [], [], [], None),
    ({}, ["0x8086", "0x1ae0"], [], [], None),  # a TPU on the PCI bus
    ({}, [], ["/dev/accel0"], [], None),
    ({}, [], ["/dev/vfio/0"], [], None),
    ({}, ["0x10de"], [], ["xla_cuda12"], None),  # a GPU plugin: JAX picks the GPU
  ],
)
def test_cpu_only_where_no_accelerator_and_no_choice(env, vendors, accel, plugins, want):
  assert distributed.cpu_only_platform(env, vendors, accel, plugins) == want


@pytest.mark.skipif(not topology.libtpu_available(), reason="libtpu not installed")
def test_a_command_on_a_cpu_host_prints_no_libtpu_warning():
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  facts = distributed._host_accelerators()  # pylint: disable=protected-access
  if distributed.cpu_only_platform(env, *facts, distributed._installed_plugins()) is None:  # pylint: disable=protected-access
    pytest.skip("this host has an accelerator, or a platform choice in its environment")
  code = (
    "from imagen_jax.parallel import distributed\n"
    "distributed.initialize()\n"
    "import jax\n"
    "print(jax.default_backend())\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "cpu"
  assert "TPU" not in out.stderr and "libtpu" not in out.stderr, out.stderr[-2000:]
