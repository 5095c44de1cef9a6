"""The README's two commands are the ones CI and users actually run."""

import os
import re

from conftest import REPO


def _read(*path):
    with open(os.path.join(REPO, *path), encoding="utf-8") as f:
        return f.read()


def test_readme_test_command_is_what_ci_runs():
    ci_command = re.search(r"^TEST_COMMAND='(.*)'$", _read(".ci", "run"), re.M).group(1)
    bash_blocks = re.findall(r"```bash\n(.*?)\n```", _read("README.md"), re.S)
    assert ci_command in bash_blocks


def test_readme_main_command_names_a_real_config():
    readme = _read("README.md")
    main = re.search(r"```bash\n(python3 -m venv .*jaxtrain train .*)\n```", readme).group(1)
    config = re.search(r"--config=(\S+?\.py)", main).group(1)
    assert os.path.isfile(os.path.join(REPO, config))
    assert "--workdir=" in main
