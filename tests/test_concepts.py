"""docs/concepts.md: its loop built from the public pieces runs as written."""

import os
import re

import numpy as np
from conftest import REPO
from jax.sharding import PartitionSpec as P


def _block_after(path: str, heading: str) -> str:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_pieces_by_hand_train_and_checkpoint(tmp_path, capsys):
    namespace = {"__name__": "example"}  # the example's definitions, not its main
    with open(os.path.join(REPO, "examples", "custom_model.py"), encoding="utf-8") as f:
        exec(compile(f.read(), "custom_model.py", "exec"), namespace)
    namespace["workdir"] = str(tmp_path)
    code = _block_after(os.path.join(REPO, "docs", "concepts.md"), "## The pieces by hand")
    exec(compile(code, "concepts.md", "exec"), namespace)

    state = namespace["state"]
    assert int(state.step) == 100
    # 4 classes start near ln 4 = 1.386; 100 steps of AdamW bring the loss well below.
    loss = float(re.search(r"step 100: loss ([\d.]+)", capsys.readouterr().out).group(1))
    assert loss < 1.0
    assert state.params["up"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["100"]
    assert np.isfinite(float(namespace["metrics"]["loss"]))
