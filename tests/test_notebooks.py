"""Execute the notebooks in ``notebooks/`` and check what they report.

Each notebook has a first code cell tagged ``parameters``; the test appends the overriding
assignments to its source (what papermill does, without the papermill dependency) and runs the notebook top to bottom with
nbclient in a temporary working folder. A cell that raises fails the test (nbclient raises
``CellExecutionError``).

The kernel is a kernelspec written into the test's temporary folder that starts
``sys.executable -m ipykernel_launcher``: the notebook runs in the same Python environment as
pytest, whatever ``python3`` kernels the user or system has installed (a fresh CI venv made with
``pip install -e '.[test]'`` needs nothing else).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
KERNEL = "ltq-test-python"
TIMEOUT_S = 300


def _kernel_manager(tmp: Path):
    """A KernelManager for a kernelspec (in ``tmp``) that runs this interpreter's ipykernel."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = tmp / "kernels" / KERNEL
    spec_dir.mkdir(parents=True, exist_ok=True)
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ltq tests",
        "language": "python",
        "env": {
            "PYTHONPATH": pythonpath,  # import ltq from this checkout even when it is not installed
            "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        },
    }))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp / "kernels")])
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=ksm)


def run_notebook(name: str, params: dict, tmp: Path):
    """Execute ``notebooks/<name>`` with ``params`` in the ``parameters`` cell; returns the executed notebook."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code", "one code cell must be tagged 'parameters'"
    # keep the defaults, override the given names (papermill's "injected-parameters" convention)
    injected = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    tagged[0].source = f"{tagged[0].source}\n\n# injected by tests/test_notebooks.py\n{injected}\n"
    workdir = tmp / "cwd"
    workdir.mkdir(parents=True, exist_ok=True)
    client = nbclient.NotebookClient(
        nb,
        km=_kernel_manager(tmp),
        timeout=TIMEOUT_S,
        allow_errors=False,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()
    nbformat.write(nb, tmp / f"executed_{name}")  # kept for inspection when an assertion fails
    return nb


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream" and o.get("name") == "stdout")


def _summary(nb) -> dict:
    """The JSON line printed by the notebook's last code cell."""
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    lines = [ln for ln in _stdout(last).splitlines() if ln.startswith("{")]
    assert lines, f"the last cell printed no JSON line: {_stdout(last)!r}"
    return json.loads(lines[-1])


def _images(nb) -> int:
    return sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {}))


@pytest.fixture(scope="module")
def ttq_example(tmp_path_factory):
    """explore_ttq.ipynb with CKPT=None: it trains the tiny cnn example itself into WORK_DIR."""
    tmp = tmp_path_factory.mktemp("ttq_nb")
    work = tmp / "work"
    nb = run_notebook("explore_ttq.ipynb", {
        "CKPT": None, "FP_CKPT": None, "DATA_ROOT": None, "MAX_BATCHES": 2,
        "HIST_LAYERS": 3, "DEVICE": "cpu", "WORK_DIR": str(work),
    }, tmp)
    return nb, work


def _checkpoint_sparsity(path: str) -> dict[str, float]:
    """Per-layer fraction of zeros of the ternary kernels stored in a checkpoint (independent of the notebook)."""
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    suffix = ".weight_quantizer.weight_q"
    return {k[len("model."):-len(suffix)]: float((v == 0).float().mean()) for k, v in state.items() if k.endswith(suffix)}


@pytest.mark.slow
def test_explore_ttq_tiny_example(ttq_example):
    nb, work = ttq_example
    s = _summary(nb)
    assert s["example"] is True
    assert Path(s["ckpt"]).is_file() and Path(s["ckpt"]).is_relative_to(work)
    assert s["fp_ckpt"] is not None and Path(s["fp_ckpt"]).is_file()
    # cnn with skip_last=false: the middle conv and the FC are ternary, the first conv stays FP
    assert [layer["layer"] for layer in s["layers"]] == ["features.3", "classifier.0"]
    assert s["n_layers"] == 2
    assert s["three_values"] is True and s["codes_match"] is True
    assert s["stored_match"] is True and s["packed_roundtrip"] is True
    # the two sparsity averages, recomputed from the per-layer table and from the checkpoint itself
    zeros = {layer["layer"]: layer["zero"] for layer in s["layers"]}
    params = {layer["layer"]: layer["params"] for layer in s["layers"]}
    assert s["sparsity_mean"] == pytest.approx(sum(zeros.values()) / len(zeros))
    assert s["sparsity_weighted"] == pytest.approx(sum(zeros[k] * params[k] for k in zeros) / sum(params.values()))
    assert zeros == pytest.approx(_checkpoint_sparsity(s["ckpt"]), abs=1e-7)
    assert 0.0 < s["sparsity_mean"] < 1.0
    for layer in s["layers"]:
        assert layer["w_p"] > 0 and layer["w_n"] > 0 and layer["threshold"] > 0
    assert s["size_ratio_ternary"] >= 14 and s["size_ratio_total"] > 1
    # accuracy on 2 test batches of 64 of the embedded Fashion-MNIST sample, TTQ and its FP start
    assert s["eval_images"] == 128
    for key in ("acc1", "acc5", "fp_acc1", "fp_acc5"):
        assert 0.0 <= s[key] <= 1.0
    assert s["acc5"] >= s["acc1"] and s["fp_acc5"] >= s["fp_acc1"]
    assert _images(nb) >= 2  # the per-layer plot and the histograms


@pytest.mark.slow
def test_explore_ttq_given_checkpoint(ttq_example, tmp_path):
    """The same notebook pointed at an existing checkpoint (FP start and data read from its hparams)."""
    first, _ = ttq_example
    s0 = _summary(first)
    nb = run_notebook("explore_ttq.ipynb", {
        "CKPT": s0["ckpt"], "FP_CKPT": None, "DATA_ROOT": None, "MAX_BATCHES": 2,
        "HIST_LAYERS": 1, "DEVICE": "cpu", "WORK_DIR": None,
    }, tmp_path)
    s = _summary(nb)
    assert s["example"] is False
    assert s["ckpt"] == s0["ckpt"] and s["fp_ckpt"] == s0["fp_ckpt"]  # fp_checkpoint recorded in the checkpoint
    for key in ("layers", "sparsity_mean", "sparsity_weighted", "three_values", "stored_match",
                "size_ratio_ternary", "acc1", "acc5", "fp_acc1", "fp_acc5", "eval_images"):
        assert s[key] == s0[key], key
