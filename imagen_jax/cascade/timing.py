"""How long each stage of a ``Cascade.sample`` call took: compiling and running.

``CompileTimer`` listens to JAX's compile events only while it is entered and
only for the thread that entered it, so a compile elsewhere (another thread's
jit, a checkpointer's) is never counted in a stage's time.
"""

import dataclasses
import threading

import jax

_COMPILE_EVENTS = (
  "/jax/core/compile/jaxpr_trace_duration",
  "/jax/core/compile/jaxpr_to_mlir_module_duration",
  "/jax/core/compile/backend_compile_duration",
)


@dataclasses.dataclass
class StageTiming:
  """Wall time of one stage in one ``sample`` call."""

  compile_s: float = 0.0  # tracing + lowering + XLA compilation
  run_s: float = 0.0  # the rest: sampling itself (and transfers)
  compiles: int = 0  # XLA compilations (0: every program was cached)
  calls: int = 0  # jitted sampler calls (batches)

  def add_call(self, wall_s: float, timer: "CompileTimer") -> None:
    """Counts one jitted call of ``wall_s`` seconds, ``timer``'s compiles among them."""
    self.compile_s += timer.seconds
    self.run_s += max(wall_s - timer.seconds, 0.0)
    self.compiles += timer.count
    self.calls += 1


class CompileTimer:
  """Sums JAX's compile event durations of this thread while entered (a context manager).

  Attributes:
    seconds: tracing + lowering + compilation seconds seen so far.
    count: XLA compilations seen (cache hits are not compilations).
  """

  def __init__(self):
    self.seconds, self.count = 0.0, 0
    self._thread = None

  def __enter__(self) -> "CompileTimer":
    self.seconds, self.count = 0.0, 0
    self._thread = threading.get_ident()
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def _listen(self, event: str, duration: float, **kwargs) -> None:
    del kwargs
    if event in _COMPILE_EVENTS and threading.get_ident() == self._thread:
      self.seconds += duration
      self.count += event == _COMPILE_EVENTS[-1]

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_duration_listener(self._listen)


def timings_table(out) -> str:
  """One line per stage of a ``CascadeOutput``: images, steps, guidance, compile and run s."""
  n = len(out.final)
  lines = []
  for name, t in out.timings.items():
    s = out.settings[name]
    lines.append(
      f"{name}: {n} images, {s.sampler} {s.steps} steps, guidance "
      f"{s.guidance if s.guided else 'off'}, compile {t.compile_s:.1f}s, "
      f"run {t.run_s:.1f}s ({t.calls} call{'s' * (t.calls > 1)})"
    )
  return "\n".join(lines)
