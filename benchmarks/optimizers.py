"""Each optimizer on the main job at equal steps, each at a learning rate found by search.

    python benchmarks/optimizers.py [--names=adamw,lion,...] [--search_steps=100]
        [--steps=300] [--workdir=/tmp/jaxtrain_optimizers] [--out=optimizers.json]

For every optimizer, a small search over the peak learning rate in runs of
`--search_steps` steps: three runs a factor of 3 apart around a starting point (the
optimizer's usual scale relative to AdamW's), then one more step past whichever end won,
until an interior point wins or the grid has 5 points. The best learning rate then trains
the main job's full `--steps`, whose validation nats/byte is the optimizer's figure. Each
run is `jaxtrain train --config=configs/gpt_pysource.py` with only `optim.name`,
`optim.lr` and the step count changed (warmup, schedule, clipping, decay as the config
says) and one evaluation, at the last step, on the config's validation batches.

The optimizer-state bytes per parameter come from the state itself: the train state's
layout is built for each optimizer (shapes only, no device memory) and its `opt_state`
leaves' bytes divided by the model's parameter count.

Runs already finished under --workdir are read back, not rerun: a search that was
stopped resumes. Prints a Markdown table and writes every run's result to --out.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIG = os.path.join(ROOT, "configs", "gpt_pysource.py")

# Where each search starts: the usual peak lr of each optimizer for this config's scale
# (AdamW's is the config's 3e-3; sign-based Lion takes a few times less; plain SGD with
# momentum, normalised-update LAMB and Muon, and Adafactor's relative steps, more).
START = {
    "adamw": 3e-3,
    "lamb": 1e-2,
    "lion": 1e-3,
    "adafactor": 1e-2,
    "sgd": 0.3,
    "muon": 2e-2,
    "schedule_free_adamw": 3e-3,
    "ademamix": 3e-3,
}
MAX_POINTS = 5
# What an optimizer needs besides its name: schedule-free AdamW replaces the schedule's
# decay, so it runs on a constant schedule (after the same warmup).
EXTRA = {"schedule_free_adamw": {"schedule": "constant"}}


def run_one(name: str, lr: float, steps: int, workdir: str) -> dict:
    """One training run (or its result read back): final validation loss and wall time."""
    result_path = os.path.join(workdir, "result.json")
    if os.path.exists(result_path):
        with open(result_path) as f:
            return json.load(f)
    command = [
        sys.executable,
        "-m",
        "jaxtrain",
        "train",
        f"--config={CONFIG}",
        f"--workdir={workdir}",
        f"--config.optim.name={name}",
        f"--config.optim.lr={lr!r}",
        f"--config.num_train_steps={steps}",
        f"--config.eval_every_steps={steps}",
        f"--config.checkpoint_every_steps={steps}",
        "--config.checkpoint.async_save=False",
        *(f"--config.optim.{key}={value}" for key, value in EXTRA.get(name, {}).items()),
    ]
    start = time.time()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.time() - start
    result = {"name": name, "lr": lr, "steps": steps, "wall_s": round(wall, 1)}
    if proc.returncode != 0:
        result.update(loss=math.nan, error=proc.stderr.strip().splitlines()[-1:])
    else:
        result["loss"] = final_eval_loss(os.path.join(workdir, "metrics.jsonl"), steps)
    with open(result_path, "w") as f:
        json.dump(result, f)
    return result


def final_eval_loss(path: str, step: int) -> float:
    """The eval loss the run recorded at `step` (metrics.jsonl's eval record)."""
    from jaxtrain import metrics_jsonl

    for record in metrics_jsonl.read_records(path):
        if record.get("step") == step and record.get("split") == "eval":
            return float(record["loss"])
    raise RuntimeError(f"{path}: no eval record at step {step}")


def search(name: str, steps: int, root: str) -> list[dict]:
    """The learning-rate search for one optimizer (see the module docstring)."""
    start = START[name]
    grid = [start / 3, start, start * 3]
    results = {}
    while True:
        for lr in grid:
            if lr not in results:
                workdir = os.path.join(root, f"{name}_lr{lr:.3g}_{steps}steps")
                results[lr] = run_one(name, lr, steps, workdir)
                print(f"{name:>20} lr={lr:<9.3g} loss={results[lr]['loss']:.4f}", flush=True)
        ranked = sorted(grid)
        finite = [lr for lr in ranked if math.isfinite(results[lr]["loss"])]
        if not finite:
            return [results[lr] for lr in ranked]
        best = min(finite, key=lambda lr: results[lr]["loss"])
        if len(grid) >= MAX_POINTS or best not in (ranked[0], ranked[-1]):
            return [results[lr] for lr in ranked]
        grid.append(best / 3 if best == ranked[0] else best * 3)


def state_bytes_per_parameter(name: str) -> float:
    """The optimizer state's bytes per model parameter, from the state's layout."""
    sys.path.insert(0, HERE)
    from overhead import build

    from jaxtrain import config as config_lib
    from jaxtrain import optim

    config = config_lib.load_config(CONFIG)
    config.optim.name = name
    config.optim.update(EXTRA.get(name, {}))
    config_lib.validate(config)
    layout = build(config)[3]  # shapes only: no state is made
    return optim.state_bytes_per_parameter(layout)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", default=",".join(START))
    parser.add_argument("--search_steps", type=int, default=100)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workdir", default="/tmp/jaxtrain_optimizers")
    parser.add_argument("--out", default="optimizers.json")
    args = parser.parse_args(argv)
    names = args.names.split(",")
    unknown = sorted(set(names) - set(START))
    if unknown:
        parser.error(f"unknown optimizer names {unknown}; choices: {', '.join(START)}")
    os.makedirs(args.workdir, exist_ok=True)
    rows = []
    for name in names:
        runs = search(name, args.search_steps, args.workdir)
        finite = [r for r in runs if math.isfinite(r["loss"])]
        best = min(finite, key=lambda r: r["loss"]) if finite else None
        final = None
        if best:
            workdir = os.path.join(args.workdir, f"{name}_lr{best['lr']:.3g}_{args.steps}steps")
            final = run_one(name, best["lr"], args.steps, workdir)
            print(f"{name:>20} lr={best['lr']:<9.3g} {args.steps} steps: {final['loss']:.4f}")
        rows.append(
            {
                "name": name,
                "runs": runs,
                "best_lr": best and best["lr"],
                "final": final,
                "state_bytes_per_parameter": state_bytes_per_parameter(name),
            }
        )
        with open(args.out, "w") as f:
            json.dump(
                {"search_steps": args.search_steps, "steps": args.steps, "rows": rows}, f, indent=1
            )
    print(
        f"\n| optimizer | lr searched | best lr | validation nats/byte at step {args.steps} "
        "| optimizer state, bytes/param |"
    )
    print("|---|---|---|---|---|")
    for row in rows:
        grid = ", ".join(
            f"{r['lr']:.3g}: {r['loss']:.3f}"
            if math.isfinite(r["loss"])
            else f"{r['lr']:.3g}: diverged"
            for r in row["runs"]
        )
        final = row["final"]
        best = f"{final['loss']:.3f}" if final and math.isfinite(final["loss"]) else "-"
        lr = f"{row['best_lr']:.3g}" if row["best_lr"] is not None else "-"
        print(
            f"| `{row['name']}` | {grid} | {lr} | **{best}** | "
            f"{row['state_bytes_per_parameter']:.2f} |"
        )


if __name__ == "__main__":
    main()
