"""Step annotations and a profiler trace of a window of steps (`config.profile`).

Every train step runs inside `jax.profiler.StepTraceAnnotation("train", step_num=N)`, so
any trace (ours, or one taken through `jax.profiler.start_server`) shows where each step
begins and ends and TensorBoard's profile tab can break step time down. An annotation
costs a few microseconds when no trace is being taken.

With `config.profile.num_steps > 0` the run traces that many steps after its first
`skip_steps` (compilation and warm-up excluded) into `DIR/profile/plugins/profile/<run>/`,
which `tensorboard --logdir DIR` (with the tensorboard-plugin-profile package) or XProf
(`xprof --logdir DIR/profile`) shows.
"""

import contextlib
import os

import jax

from jaxtrain import metrics
from jaxtrain.checks import is_int, require

PROFILE_SUBDIR = "profile"


def check_config(profile_config) -> None:
    """Rejects a bad `config.profile`.

    Raises:
      ConfigError: naming the field and why.
    """
    for key in ("num_steps", "skip_steps"):
        value = profile_config[key]
        require(is_int(value) and value >= 0, f"profile.{key}", value, "an integer >= 0")


class StepTracer:
    """Annotates each train step; traces the configured window of them.

    Args:
      profile_config: `config.profile` (num_steps, skip_steps).
      workdir: the run directory; the trace goes to `workdir/profile`.
      start_step: the step this run starts from (0, or the restored step).
    """

    def __init__(self, profile_config, workdir: str, start_step: int):
        check_config(profile_config)
        self.directory = os.path.join(workdir, PROFILE_SUBDIR)
        self.first = start_step + profile_config.skip_steps + 1
        self.last = self.first + profile_config.num_steps - 1  # < first: no trace
        self._tracing = False

    @contextlib.contextmanager
    def step(self, step: int):
        """The context one train step (its input and its dispatch) runs in."""
        if step == self.first and self.last >= self.first and jax.process_index() == 0:
            jax.profiler.start_trace(self.directory)
            self._tracing = True
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            yield
        if self._tracing and step == self.last:
            self.stop()

    def stop(self) -> None:
        """Ends a trace in progress, once the device has finished what it was given."""
        if not self._tracing:
            return
        self._tracing = False
        # The step was only dispatched: wait for the device so the trace holds all of it.
        jax.block_until_ready(jax.live_arrays())
        jax.profiler.stop_trace()
        metrics.console(f"profiler trace of steps {self.first}-{self.last} in {self.directory}")
