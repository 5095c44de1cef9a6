"""What works from an editable install works from `pip install .` too (as in Colab).

The package is built as a wheel and installed (without its dependencies, which this
environment has) into a directory of its own, then used from outside the checkout.
"""

import os
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO

USE = """
import jaxtrain, sys
assert jaxtrain.__file__.startswith(sys.argv[1]), jaxtrain.__file__
config = jaxtrain.load_config("gpt_pysource.py:smoke")
from jaxtrain.configs import base
assert config.task == "lm" and base.get_config().nonfinite.policy == "abort"
print("configs", " ".join(jaxtrain.config.bundled_configs()))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(root), REPO],
        check=True,
        capture_output=True,
        timeout=600,
    )
    [wheel] = [f for f in os.listdir(root) if f.endswith(".whl")]
    with zipfile.ZipFile(root / wheel) as archive:
        names = archive.namelist()
    site = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site)]
        + [str(root / wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return site, names


def _run(site, *args, cwd):
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_wheel_carries_the_bundled_configs(installed):
    _, names = installed
    for name in ("base.py", "gpt_pysource.py", "digits_cnn.py"):
        assert f"jaxtrain/configs/{name}" in names


@pytest.mark.slow
def test_bundled_configs_load_by_name_from_a_wheel_install(installed, tmp_path):
    site, _ = installed
    proc = _run(site, "-c", USE, str(site), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "configs digits_cnn.py gpt_1b.py gpt_8b.py gpt_pysource.py" in proc.stdout
    # The command line too: train the smoke config, named, not by path.
    proc = _run(
        site,
        "-m",
        "jaxtrain",
        "train",
        "--config=gpt_pysource.py:smoke",
        f"--workdir={tmp_path / 'run'}",
        "--config.num_train_steps=2",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step      2  eval" in proc.stdout
