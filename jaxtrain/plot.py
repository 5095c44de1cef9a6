"""Training and evaluation curves of one or several runs on one figure (matplotlib).

    plot_runs(["runs/lr3e-3", "runs/lr1e-3"], metric="loss", out="curves.png")

Each run gets one colour: its training curve as a line, its evaluations during training
(`split` "eval" in `metrics.jsonl`) as dots joined by dashes, and any `jaxtrain eval`
records ("eval:<split>") as open squares. The legend names each run by its directory.
"""

import os

from jaxtrain import metrics_jsonl
from jaxtrain.errors import ConfigError

# 8 x 5 inches at 100 dpi: an 800 x 500 pixel PNG, readable in a README and a notebook.
FIGSIZE = (8.0, 5.0)
DPI = 100
# Line styles by split: training's log, training's evaluations, `jaxtrain eval` records.
_STYLES = {
    "train": dict(linewidth=1.2),
    "eval": dict(linestyle="--", marker="o", markersize=4),
    "eval:": dict(linestyle=":", marker="s", markersize=5, fillstyle="none"),
}


def read_metrics(workdir: str) -> list[dict]:
    """The records of `workdir/metrics.jsonl`, in file order (`jaxtrain.metrics_jsonl.read_records`:
    non-finite values as floats; a line cut short, or anything else not a record, skipped).

    Raises:
      ConfigError: no metrics.jsonl in `workdir`.
    """
    path = os.path.join(workdir, "metrics.jsonl")
    try:
        return metrics_jsonl.read_records(path)
    except FileNotFoundError:
        raise ConfigError(f"run {workdir!r} has no metrics.jsonl (not a run directory?)") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path!r}: {e.strerror or e}") from e


def curves(records: list[dict], metric: str) -> dict[str, tuple[list[int], list[float]]]:
    """{split: (steps, values)} of one metric, each split's steps in increasing order.

    A step logged more than once in a split (an evaluation repeated) keeps its last value.
    """
    by_split: dict[str, dict[int, float]] = {}
    for record in records:
        if metric in record and "step" in record and "split" in record:
            by_split.setdefault(record["split"], {})[record["step"]] = record[metric]
    return {
        split: (sorted(points), [points[s] for s in sorted(points)])
        for split, points in by_split.items()
    }


def plot_runs(workdirs: list[str], *, metric: str = "loss", out: str | None = None):
    """Draws `metric` over steps for each run, train and eval splits, on one figure.

    Uses matplotlib's object-oriented API with the Agg canvas: no pyplot state and no
    change to the session's backend, so a notebook shows the returned figure inline.

    Args:
      workdirs: run directories (each with a metrics.jsonl).
      metric: the metric to plot ("loss", "accuracy", "grad_norm", ...).
      out: a PNG file to write (800 x 500 pixels); None: none.

    Returns:
      The `matplotlib.figure.Figure`.

    Raises:
      ConfigError: no runs, a run without metrics.jsonl or without `metric` (naming the
        metrics it has), or `out` cannot be written.
    """
    if not workdirs:
        raise ConfigError("no run directories to plot")
    runs = {}
    for workdir in workdirs:
        records = read_metrics(workdir)
        found = curves(records, metric)
        if not found:
            have = sorted({k for r in records for k in r} - {"step", "split"})
            raise ConfigError(f"run {workdir!r} has no metric {metric!r}; it has {have}")
        runs[os.path.normpath(workdir)] = found

    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (name, found) in enumerate(runs.items()):
        colour = colours[index % len(colours)]
        for split, (steps, values) in sorted(found.items(), key=lambda kv: kv[0] != "train"):
            style = _STYLES.get(split, _STYLES["eval:"])
            axes.plot(steps, values, color=colour, label=f"{name} {split}", **style)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    axes.set_xlabel("step")
    axes.set_ylabel(metric)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    if out is not None:
        try:
            figure.savefig(out, format="png")
        except OSError as e:
            raise ConfigError(f"cannot write {out!r}: {e.strerror or e}") from e
    return figure
