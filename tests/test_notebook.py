"""The notebooks run top to bottom in a real Jupyter kernel, from a non-editable install.

Each notebook is executed by nbclient in an ipykernel whose PYTHONPATH holds jaxtrain as
`pip install .` makes it (the wheel, `wheel_install` in conftest.py), with the kernel's
working directory outside the checkout: what a user's Jupyter runs. The checks read the
cells' outputs. The first cell (the Colab install) is also tested on its own: its
decisions, and what pip does with the command it builds.
"""

import ast
import base64
import json
import os
import re
import struct
import subprocess
import sys
import zipfile

import jax
import nbformat
import pytest
from conftest import REPO

NOTEBOOKS = os.path.join(REPO, "notebooks")


def _read(name: str):
    return nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)


def _execute(name: str, site, data_dir, cwd):
    """Runs notebook `name` in a fresh kernel; returns it with its outputs."""
    from nbclient import NotebookClient

    notebook = _read(name)
    env = {**os.environ, "PYTHONPATH": str(site), "TFDS_DATA_DIR": data_dir}
    env.pop("XLA_FLAGS", None)  # a user's kernel: one CPU device unless a cell says more
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute(env=env)
    return notebook


def _text(cell) -> str:
    """Everything a code cell printed (stdout and stderr streams), in order."""
    return "".join(o.text for o in cell.outputs if o.output_type == "stream")


def _cell(notebook, needle: str):
    """The one code cell whose source contains `needle`."""
    [cell] = [c for c in notebook.cells if c.cell_type == "code" and needle in c.source]
    return cell


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in:\n{text[-3000:]}"
    return float(match.group(1))


def _row(text: str, name: str) -> list[str]:
    """A row of a printed parameter table, split on runs of 2+ spaces."""
    [line] = [line for line in text.splitlines() if line.startswith(name + " ")]
    return re.split(r"\s{2,}", line.strip())


def _installed_here(notebook, site):
    install = _text(notebook.cells[1])
    assert re.fullmatch(r"jaxtrain \S+ is installed: nothing to do\n", install), install
    location = re.search(r"jaxtrain \S+ from (\S+)", _text(_cell(notebook, "import jaxtrain")))
    assert location and location.group(1).startswith(str(site)), location  # the wheel


def test_quickstart_notebook_runs_from_a_wheel_install(wheel_install, data_dir, tmp_path):
    site, _ = wheel_install
    notebook = _execute("quickstart", site, data_dir, tmp_path)
    _installed_here(notebook, site)
    assert "1 cpu device(s)" in _text(_cell(notebook, "import jaxtrain"))

    curves = _text(_cell(notebook, "metrics.jsonl"))
    first = _number(r"train loss ([\d.]+) at step 10 ->", curves)
    last = _number(r"-> ([\d.]+) at step 100", curves)
    assert last < first - 1.0, curves  # from ~ln 256 = 5.5 to below 4.5 nats/byte
    evals = json.loads(re.search(r"eval loss at steps \[25, 50, 75, 100\]: (\[.*\])", curves)[1])
    assert evals[-1] < evals[0]

    [figure] = [o for o in _cell(notebook, "plot_runs").outputs if "image/png" in o.get("data", {})]
    png = base64.b64decode(figure["data"]["image/png"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24])[0] >= 400

    layout = _text(_cell(notebook, "= jaxtrain.load_run("))
    assert "step 100, mesh {'data': 1, 'fsdp': 1, 'sequence': 1, 'tensor': 1}" in layout
    assert _row(layout, "blocks/0/mlp/up/kernel") == [
        "blocks/0/mlp/up/kernel",
        "(64, 128)",
        "P('fsdp', 'tensor')",
        "(64, 128)",
    ]
    assert _row(layout, "embed/embedding")[2] == "P('tensor', 'fsdp')"
    assert "blocks/1/" not in layout

    sampled = _text(_cell(notebook, "sample_text"))
    text = ast.literal_eval(sampled.strip())
    assert text.startswith("def ") and len(text) > 20, sampled

    orbax = _text(_cell(notebook, "ocp.CheckpointManager"))
    assert orbax == (
        "Orbax read step 100: blocks/0/mlp/up/kernel (64, 128); same as load_run: True\n"
    )


def test_custom_model_notebook_trains_on_one_device_then_a_2x2x2_mesh(
    wheel_install, data_dir, tmp_path
):
    site, _ = wheel_install
    notebook = _execute("custom_model", site, data_dir, tmp_path)
    _installed_here(notebook, site)
    # The XLA_FLAGS cell made 8 CPU devices in a kernel that started with one.
    assert "8 cpu devices for the 8-device mesh" in _text(_cell(notebook, "import jaxtrain"))

    one = _text(_cell(notebook, "one_dir ="))
    one_accuracy = _number(r"one device: eval accuracy ([\d.]+)", one)
    one_loss = _number(r"one device: .* eval loss ([\d.]+)", one)
    assert one_accuracy > 0.8  # 4 classes: chance is 0.25
    assert "mesh {'data': 1, 'fsdp': 1, 'sequence': 1, 'tensor': 1} on 1 cpu devices" in one

    eight = _text(_cell(notebook, "mesh_dir ="))
    assert "mesh {'data': 2, 'fsdp': 2, 'sequence': 1, 'tensor': 2} on 8 cpu devices" in eight
    eight_loss = _number(r"\(2, 2, 2\) mesh: .* eval loss ([\d.]+)", eight)
    assert _number(r"differs from one device's by ([\d.e+-]+)", eight) < 1e-4
    assert abs(eight_loss - one_loss) < 1e-3

    table_cell = _cell(notebook, "visualize_array_sharding")
    table = _text(table_cell)
    assert _row(table, "up/kernel")[1:] == ["(32, 256)", "P('fsdp', 'tensor')", "(16, 128)"]
    assert _row(table, "down/kernel")[1:] == ["(256, 4)", "P('tensor', None)", "(128, 4)"]
    assert _row(table, "norm/scale")[3] == "(128,)"
    pictures = [o for o in table_cell.outputs if o.output_type == "display_data"]
    picture = re.sub(r"\x1b\[[\d;]*m", "", pictures[0]["data"]["text/plain"])  # colours off
    assert re.findall(r"CPU \d,\d", picture) == ["CPU 0,4", "CPU 1,5", "CPU 2,6", "CPU 3,7"]

    restored = _text(_cell(notebook, "= jaxtrain.load_run("))
    assert "restored step 200 onto mesh {'data': 1, 'fsdp': 1, 'sequence': 1, 'tensor': 1}" in (
        restored
    )
    assert abs(_number(r"eval loss ([\d.]+)", restored) - eight_loss) < 1e-4


def test_committed_notebooks_carry_no_outputs():
    for name in ("quickstart", "custom_model"):
        for cell in _read(name).cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, (name, cell.source)


def _definitions(tree: ast.Module, names=None) -> dict[str, str]:
    return {
        node.name: ast.unparse(node)
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.ClassDef)
        and (names is None or node.name in names)
    }


def test_custom_model_notebook_has_the_examples_code():
    """The notebook's model, loss and data are examples/custom_model.py's (the README's)."""
    with open(os.path.join(REPO, "examples", "custom_model.py"), encoding="utf-8") as f:
        example = _definitions(ast.parse(f.read()), {"Classifier", "loss", "make_data"})
    cell = _cell(_read("custom_model"), "class Classifier")
    assert _definitions(ast.parse(cell.source), set(example)) == example


# --- The first cell: install jaxtrain in Colab, nothing elsewhere ---------------------------


def _install_cell() -> dict:
    """The first cell's imports, constants and functions, without running its last lines."""
    source = _read("quickstart").cells[1].source
    assert source == _read("custom_model").cells[1].source  # the same cell in both
    tree = ast.parse(source)
    tree.body = [
        node
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom | ast.FunctionDef)
        or (isinstance(node, ast.Assign) and node.targets[0].id.isupper())
    ]
    namespace: dict = {}
    exec(compile(tree, "install cell", "exec"), namespace)
    return namespace


def test_install_cell_installs_only_in_colab_and_only_when_missing(tmp_path):
    cell = _install_cell()
    args = cell["pip_install_args"]
    pins = ["jax==0.12.0", "jaxlib==0.12.0"]
    source = "git+https://example.org/jaxtrain"
    assert args(in_colab=False, installed=True, source=source, pins=pins) is None
    assert args(in_colab=True, installed=True, source=source, pins=pins) is None
    assert args(in_colab=True, installed=False, source=source, pins=pins) == [
        "install",
        "-q",
        source,
        "--constraint",
        cell["CONSTRAINTS"],
    ]
    assert args(in_colab=True, installed=False, source=source, pins=[]) == ["install", "-q", source]
    with pytest.raises(RuntimeError, match="not installed in this kernel's environment"):
        args(in_colab=False, installed=False, source=source, pins=pins)
    with pytest.raises(RuntimeError, match="set JAXTRAIN_SOURCE"):
        args(in_colab=True, installed=False, source="", pins=pins)

    assert cell["find_checkout"](NOTEBOOKS) == REPO
    assert cell["find_checkout"](str(tmp_path)) == ""
    pinned = cell["jax_family_pins"]()
    assert f"jax=={jax.__version__}" in pinned and any(p.startswith("jaxlib==") for p in pinned)
    assert not any(p.startswith("jaxtrain") for p in pinned)


def _wheel(directory, name: str, version: str, requires: tuple[str, ...] = ()) -> None:
    """A wheel holding only metadata: enough for pip to resolve it."""
    dist = f"{name.replace('-', '_')}-{version}"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires
    )
    wheel = "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    with zipfile.ZipFile(directory / f"{dist}-py3-none-any.whl", "w") as archive:
        archive.writestr(f"{dist}.dist-info/METADATA", metadata)
        archive.writestr(f"{dist}.dist-info/WHEEL", wheel)
        archive.writestr(f"{dist}.dist-info/RECORD", "")


def _would_install(args: list[str], index, tmp_path) -> tuple[int, list[str], str]:
    """What `pip <args>` would install into this environment (`--dry-run`: nothing is)."""
    report = tmp_path / "report.json"
    report.unlink(missing_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", *args, "--dry-run", "--report", str(report)]
        + ["--no-index", "--find-links", str(index)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode:
        return proc.returncode, [], proc.stderr
    installs = json.loads(report.read_text())["install"]
    return 0, sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in installs), ""


@pytest.mark.slow
def test_the_install_command_never_replaces_the_installed_jax(tmp_path):
    """This environment's jax plays Colab's; the index offers a newer (CPU) jax."""
    index = tmp_path / "index"
    index.mkdir()
    _wheel(index, "jax", "99.0")
    _wheel(index, "needs-any-jax", "1.0", (f"jax>={jax.__version__}",))
    _wheel(index, "needs-newer-jax", "1.0", ("jax>=99",))
    cell = _install_cell()
    cell["CONSTRAINTS"] = str(tmp_path / "constraints.txt")
    pins = cell["jax_family_pins"]()
    (tmp_path / "constraints.txt").write_text("\n".join(pins) + "\n")

    def args(source):
        return cell["pip_install_args"](in_colab=True, installed=False, source=source, pins=pins)

    # A requirement the installed jax meets keeps it: pip installs without upgrading.
    assert _would_install(args("needs-any-jax"), index, tmp_path) == (0, ["needs-any-jax==1.0"], "")
    # A dependency asking for a newer jax would replace it, without the constraints...
    status, installs, _ = _would_install(["install", "needs-newer-jax"], index, tmp_path)
    assert status == 0 and "jax==99.0" in installs
    # ... and with them, pip refuses instead.
    status, installs, err = _would_install(args("needs-newer-jax"), index, tmp_path)
    assert status != 0 and installs == [] and "jax" in err
