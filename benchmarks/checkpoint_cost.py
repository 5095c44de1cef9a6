"""What an asynchronous checkpoint costs training: per save, and amortised at the interval.

    python benchmarks/checkpoint_cost.py [--config=gpt_pysource.py] [--repeats=5]
        [--window=20] [--set KEY=VALUE ...]

With the train step compiled by jaxtrain's own functions and batches premade on the device
(as in overhead.py), each repeat runs two windows of `window` steps from the same state,
in alternating order:
  plain: the steps, blocking once at the end;
  save:  the same, but after step 5 the loop does what `train_and_evaluate` does at a
    checkpoint step: waits for that step's metrics (the non-finite guard reads them),
    then `Checkpointer.save` (Orbax, asynchronous), and goes on stepping while the files
    are written in the background.
A save's cost is the median of (save window - plain window); it blocks training for the
time `save()` holds the loop plus whatever the background write takes from the steps.
Amortised cost = cost / (checkpoint_every_steps x seconds per step). The background
write must have committed by the window's end (checked: the wait after it is timed too).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import load, load_average, setup  # noqa: E402

from jaxtrain import checkpoint, state  # noqa: E402


def main(spec, repeats, window, settings):
    config = load(spec, settings)
    mesh, layout, step, batches, iterator = setup(config, window)
    config_dict = json.loads(config.to_json_best_effort())
    save_after = 5
    plain, saved, blocked, waited = [], [], [], []
    with jax.set_mesh(mesh), tempfile.TemporaryDirectory() as workdir:
        ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)
        start_state = state.create_state(layout, config.seed)
        # Warm up: the step, and one save (Orbax's first save sets up its threads).
        fresh = lambda: jax.tree.map(lambda x: x.copy(), start_state)  # noqa: E731 (donated)
        train_state, metrics = step(fresh(), batches[0])
        jax.block_until_ready(metrics)
        ckpt.save(1, train_state, iterator.get_state(), config_dict)
        ckpt.wait_until_finished()

        def run(with_save: bool, number: int) -> None:
            train_state = fresh()
            jax.block_until_ready(train_state)
            start = time.perf_counter()
            for i, batch in enumerate(batches, 1):
                train_state, metrics = step(train_state, batch)
                if with_save and i == save_after:
                    jax.device_get(metrics)  # as the loop settles a checkpoint step
                    call = time.perf_counter()
                    ckpt.save(number, train_state, iterator.get_state(), config_dict)
                    blocked.append(time.perf_counter() - call)
            jax.block_until_ready((train_state, metrics))
            end = time.perf_counter()
            (saved if with_save else plain).append(end - start)
            if with_save:
                ckpt.wait_until_finished()
                waited.append(time.perf_counter() - end)

        for repeat in range(repeats):
            order = (False, True) if repeat % 2 == 0 else (True, False)
            for with_save in order:
                run(with_save, 100 * (repeat + 2))
            print(
                f"repeat {repeat}: plain {plain[-1]:.3f} s, with a save {saved[-1]:.3f} s, "
                f"save() held the loop {blocked[-1] * 1e3:.1f} ms, write still running at "
                f"the end {waited[-1] * 1e3:.1f} ms (load average {load_average()})",
                flush=True,
            )
        ckpt.close()
        size = sum(
            os.path.getsize(os.path.join(root, f))
            for root, _, files in os.walk(os.path.join(workdir, "checkpoints"))
            for f in files
        )
    step_s = statistics.median(plain) / window
    cost = statistics.median(b - a for a, b in zip(plain, saved, strict=True))
    every = config.checkpoint_every_steps
    print(
        f"{spec} {' '.join(settings)}: {step_s:.4f} s/step; a save costs {cost:.4f} s of "
        f"training (median; {cost / step_s:.2f} step times; save() itself "
        f"{statistics.median(blocked) * 1e3:.1f} ms); at checkpoint_every_steps={every} "
        f"that is {100 * cost / (every * step_s):.2f}% of training time "
        f"(checkpoints kept on disk: {size / 2**20:.1f} MiB)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="gpt_pysource.py")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--set", action="append", default=[], help="dotted.key=literal")
    args = parser.parse_args()
    main(args.config, args.repeats, args.window, args.set)
