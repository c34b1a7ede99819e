"""What a run reports: clu scalars (TensorBoard + console), a metrics.jsonl history, a progress line
with throughput and ETA, model FLOPs utilisation, and the loss-curve PNG. Never report text."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any

import jax
import numpy as np

from mvlp_jax.runtime import storage

# Dense bf16 peak FLOP/s per chip of accelerators we know (for the MFU estimate).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
}


def peak_flops_per_device(configured: float) -> float:
    """Configured value, else the known peak of this device kind, else a matmul measured here (CPU)."""
    if configured:
        return configured
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    n = 2048
    a = jax.numpy.ones((n, n), jax.numpy.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    fastest = float("inf")
    for _ in range(10):  # the fastest of several: a busy moment at start-up must not lower the peak (MFU > 100%)
        start = time.perf_counter()
        f(a).block_until_ready()
        fastest = min(fastest, time.perf_counter() - start)
    return 2 * n**3 / fastest / jax.local_device_count()


def step_flops(compiled) -> float:
    """FLOPs of one step from XLA's cost analysis (per device for a partitioned program); 0 if unknown."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost.get("flops", 0.0))
    except Exception:  # cost analysis is best-effort on some backends
        return 0.0


HISTORY = "metrics.jsonl"
LAST_VALUE = ("skipped_nonfinite", "nonfinite_run", "learning_rate")  # counters and schedules: not averaged


@jax.jit
def _add(total: dict, metrics: dict) -> dict:
    return jax.tree.map(lambda a, b: a + b.astype(a.dtype), total, metrics)


class IntervalMeans:
    """Sums a step's metrics on the device (no host sync) and averages them over the logging interval.

    An objective's metrics ('name/x') are averaged over the steps where it ran ('name/active' = 1): in a
    cyclic schedule each objective reports the mean of its own steps, not a mean diluted by idle zeros.
    """

    def __init__(self) -> None:
        self.total: dict | None = None
        self.steps = 0

    def add(self, metrics: dict) -> None:
        metrics = {k: v.astype(np.float32) for k, v in metrics.items()}
        self.total = metrics if self.total is None else _add(self.total, metrics)
        self.last = metrics
        self.steps += 1

    def means(self) -> dict[str, float]:
        total, last = jax.device_get((self.total, self.last))
        out = {}
        for key, value in total.items():
            if key in LAST_VALUE:
                out[key] = float(last[key])
                continue
            count = float(total.get(key.split("/")[0] + "/active", self.steps)) if "/" in key else self.steps
            if not key.endswith("/active") and count > 0:
                out[key] = float(value) / count
        self.total, self.steps = None, 0
        return out


class Reporter:
    """Accumulates step timings; every `log_every` steps writes scalars and prints one progress line. The rate
    counts what a batch holds: `examples` "images", "studies" (data.max_views > 1) or "volumes" (a ViT3D)."""

    def __init__(
        self,
        workdir: str,
        total_steps: int,
        global_batch: int,
        flops_per_step: float,
        peak: float,
        start_step: int,
        examples: str = "images",
    ):
        from clu import metric_writers

        self.is_main = jax.process_index() == 0
        # TensorBoard events and metrics.jsonl grow by appends: process 0 spools them (uploaded at each report
        # when the workdir is remote); the other processes only log
        self.spool = storage.Spool(workdir, carried=(HISTORY,)) if self.is_main else None
        self.writer = metric_writers.create_default_writer(
            self.spool.local if self.spool else os.fspath(workdir), just_logging=not self.is_main
        )
        self.history = os.path.join(self.spool.local, HISTORY) if self.spool else None
        self.total, self.batch, self.examples = total_steps, global_batch, examples
        self.flops, self.peak = flops_per_step, peak
        self.start_step, self.start_time = start_step, time.perf_counter()
        self.last_step, self.last_time = start_step, self.start_time

    def write_hparams(self, flat_config: dict) -> None:
        self.writer.write_hparams(
            {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat_config.items()}
        )

    def report(self, step: int, metrics: dict[str, float]) -> None:
        """metrics: the interval's means (IntervalMeans.means())."""
        now = time.perf_counter()
        steps = max(step - self.last_step, 1)
        step_time = (now - self.last_time) / steps
        scalars = dict(metrics)
        throughput = f"{self.examples}_per_s"
        scalars.update({throughput: self.batch / step_time, "step_time_s": step_time})
        if self.flops and self.peak:
            scalars["mfu"] = self.flops / step_time / self.peak
        self.writer.write_scalars(step, scalars)
        if self.is_main:
            with open(self.history, "a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")
            rate = (step - self.start_step) / max(now - self.start_time, 1e-9)
            eta = (self.total - step) / max(rate, 1e-9)
            losses = " ".join(f"{k}={v:.4f}" for k, v in scalars.items() if k.endswith("loss"))
            unit = "img" if self.examples == "images" else self.examples
            print(
                f"step {step}/{self.total} | {losses} | {scalars[throughput]:.1f} {unit}/s | "
                f"{step_time * 1e3:.0f} ms/step"
                + (f" | MFU {scalars['mfu']:.1%}" if "mfu" in scalars else "")
                + f" | ETA {_duration(eta)}",
                flush=True,
            )
            self.flush()
        self.last_step, self.last_time = step, now

    def flush(self) -> None:
        """Writes out the TensorBoard events (and uploads the spool of a remote workdir)."""
        self.writer.flush()
        if self.spool:
            self.spool.sync()

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
        if self.spool:
            self.spool.close()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def read_history(workdir: str) -> dict[int, dict]:
    """step -> scalars; a step logged twice (a resumed run redoing steps) keeps its last record."""
    path = storage.path(workdir) / HISTORY
    history: dict[int, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            history[record["step"]] = record
    return dict(sorted(history.items()))


def plot_losses(workdir: str) -> str | None:
    """loss_curve.png: every '*loss' scalar against step; returns its path (None without history)."""
    history = read_history(workdir)
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in history.values() for k in r if k.endswith("loss")})
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        steps = [s for s, r in history.items() if key in r]
        ax.plot(steps, [history[s][key] for s in steps])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = storage.save_figure(fig, storage.join(workdir, "loss_curve.png"), dpi=100)
    plt.close(fig)
    return path


def use_compilation_cache(setting: str, workdir: str) -> str | None:
    """Turns on JAX's persistent compilation cache (before the first compile of the process); returns its folder.
    '' (auto): beside a remote workdir (a preempted spot VM comes back with an empty home) or in
    ~/.cache/mvlp_jax/xla for a local one; 'none': off; else the folder named (local or gs://)."""
    if setting == "none":
        return None
    if setting:
        folder = os.fspath(storage.path(setting))
    elif storage.is_remote(workdir):
        folder = storage.join(workdir, "compilation_cache")
    else:
        folder = os.path.join(os.path.expanduser("~"), ".cache", "mvlp_jax", "xla")
    jax.config.update("jax_compilation_cache_dir", folder)
    return folder


class CompileTimer:
    """Times a block that compiles and counts JAX's persistent-cache hits inside it."""

    def __enter__(self) -> CompileTimer:
        self.hits, self.seconds = 0, 0.0
        self._start = time.perf_counter()
        jax.monitoring.register_event_listener(self._event)
        return self

    def _event(self, event: str, **kwargs) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            self.hits += 1

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._start
        jax.monitoring.unregister_event_listener(self._event)

    def describe(self, cache: str | None) -> str:
        if cache is None:
            return "compilation cache off"
        return f"compilation cache {'hit' if self.hits else 'miss'}, {cache}"


class ProfileWindow:
    """A jax.profiler trace of steps START..END (`profile_steps='START,END'`, inclusive) into
    WORKDIR/plugins/profile/, where TensorBoard's profile tab finds it. Every process traces its own devices;
    a remote workdir gets the trace uploaded when the window closes. '' : no trace."""

    def __init__(self, spec: str, workdir: str):
        self.first, self.last = (int(x) for x in spec.split(",")) if spec else (0, -1)  # validated in configuration
        self.workdir, self.local, self.running = workdir, None, False

    def before(self, step: int) -> None:
        if step == self.first:
            self.local = tempfile.mkdtemp(prefix="mvlp-profile-") if storage.is_remote(self.workdir) else self.workdir
            jax.profiler.start_trace(self.local)
            self.running = True

    def after(self, step: int, outputs: Any) -> None:
        if self.running and step >= self.last:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        if not self.running:
            return
        jax.profiler.stop_trace()
        self.running = False
        if self.local != self.workdir:
            storage.copy_tree(self.local, self.workdir)
            shutil.rmtree(self.local, ignore_errors=True)
        if jax.process_index() == 0:
            print(
                f"profile of steps {self.first}-{self.last} written to {self.workdir}/plugins/profile "
                f"(TensorBoard's profile tab)",
                flush=True,
            )
