"""One process of a multi-process test run: join the job, then train as the CLI does.

    python tests/multihost_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID CONFIG WORKDIR \
        [--heartbeat_timeout_s=S] [KEY=VALUE ...]

CONFIG is `path.py[:arg]`; each KEY=VALUE sets a dotted config field to a Python literal.
The number of local CPU devices comes from the environment (JAX_NUM_CPU_DEVICES).
"""

import ast
import sys

from jaxtrain import distributed


def main(argv: list[str]) -> None:
    coordinator, num_processes, process_id, spec, workdir, *rest = argv
    heartbeat = [a for a in rest if a.startswith("--heartbeat_timeout_s=")]
    overrides = [a for a in rest if a not in heartbeat]
    kwargs = {"heartbeat_timeout_s": int(heartbeat[-1].split("=", 1)[1])} if heartbeat else {}
    # Before anything else touches jax: the backend starts sized to the whole job.
    distributed.initialize(coordinator, int(num_processes), int(process_id), **kwargs)

    from jaxtrain.config import load_config
    from jaxtrain.train import train_and_evaluate

    config = load_config(spec)
    for override in overrides:
        key, value = override.split("=", 1)
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = ast.literal_eval(value)
    print(distributed.describe(), flush=True)
    train_and_evaluate(config, workdir)


if __name__ == "__main__":
    main(sys.argv[1:])
