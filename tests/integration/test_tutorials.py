"""The tutorials in docs/tutorials run as notebooks, offline, on the shipped tiny models.

Each jupytext percent script is converted to a notebook and executed cell by cell in a fresh
``python3`` kernel (ipykernel, this interpreter) with nbclient, in a temporary folder. A probe cell
appended to the notebook reads the tutorial's own variables and prints them as JSON, so the checks
below are on what the tutorial computed (exactness, held-out fit, bit-for-bit resume, the
applications' effects), not just on the absence of a traceback.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
ipykernel_spec = pytest.importorskip("ipykernel.kernelspec")
pytest.importorskip("matplotlib")
pytest.importorskip("open_clip")

TUTORIALS = Path(__file__).resolve().parents[2] / "docs" / "tutorials"
FILES = sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))
CELL_TIMEOUT = 120  # seconds per cell; each tutorial takes well under a minute on 2 cores

#: per tutorial: Python expressions evaluated in the executed notebook's namespace, printed as JSON
PROBES: dict[str, dict[str, str]] = {
    "01_quickstart_clip": {
        "error": "stack.error()",
        "by_hand": "float(by_hand)",
        "shares_sum": "float(per_component.sum())",
        "zero_shot": "accuracy",
        "heat_vs_heads": "float((heat.total() - expected).abs().max())",
        "heat_grid": "list(heat.grid)",
        "top_colour": "table.top('colour', 1)[0][0]",
        "n_spans": "len(spans)",
    },
    "02_non_clip_through_compalign": {
        "cosine": "held_out['cosine']",
        "cosine_shared": "held_out_shared['cosine']",
        "defect": "held_out['defect_max']",
        "zero_shot": "correct['Swin through CompAlign, zero-shot'] / n",
        "overlap": "len(by_text & by_classifier)",
        "top_colour": "table.top('colour', 1)[0][0]",
    },
    "03_dataset_scale_store": {
        "first": "first.chunks_done",
        "second": "second.chunks_done",
        "n_chunks": "store.n_chunks",
        "same": "same",
        "skipped": "[s['id'] for s in manifest['skipped']]",
        "merge_mean": "float(np.abs(merged.mean - whole.mean).max())",
        "merge_cov": "float(np.abs(merged.covariance - whole.covariance).max())",
        "zero_shot": "result['zero_shot']['accuracy']",
        "changed": "changed",
    },
    "04_applications": {
        "precisions": "precisions",
        "seg_fg_iou": "{m: v['fg_iou'] for m, v in seg.metrics.items()}",
        "seg_n": "seg.n_images",
        "wga_baseline": "result.baseline['worst_group']",
        "wga_ablated": "result.ablated['worst_group']",
        "wga_random_max": "result.random_summary()['worst_group_max']",
        "wga_variance": "result.variance_control['worst_group']",
    },
}
#: recorded by every tutorial's probe: it worked in a temporary folder and cleaned it up
COMMON = {
    "work": "str(WORK)",
    "work_left": "WORK.exists()",
    "cache": "os.environ.get('VITDECOMP_CACHE')",
    "python": "sys.executable",
}


def _probe_cell(stem: str) -> Any:
    exprs = {**COMMON, **PROBES[stem]}
    body = ", ".join(f"{key!r}: {expr}" for key, expr in exprs.items())
    code = f"import json as _j, sys\nprint('PROBE ' + _j.dumps({{{body}}}, default=str))"
    return nbformat.v4.new_code_cell(code)


def _kernel_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A python3 kernelspec of this interpreter first on the path; the kernel's files under tmp_path."""
    jupyter = tmp_path / "jupyter"
    ipykernel_spec.write_kernel_spec(jupyter / "kernels" / "python3", overrides={"argv": [
        sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]})
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "matplotlib"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # the tutorial's tempfile.mkdtemp() lands here
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "tmp").mkdir()


def _run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, dict[str, Any]]:
    _kernel_env(tmp_path, monkeypatch)
    nb = jupytext.read(path)
    nb.cells.append(_probe_cell(path.stem))
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError (with the cell and its traceback) on any error
    lines = [line for out in nb.cells[-1].outputs if out.get("output_type") == "stream"
             for line in out.get("text", "").splitlines() if line.startswith("PROBE ")]
    assert len(lines) == 1, nb.cells[-1].outputs
    return nb, json.loads(lines[0][len("PROBE "):])


def _text(nb: Any) -> str:
    return "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                     for out in cell.get("outputs", []) if out.get("output_type") == "stream")


def _figures(nb: Any) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
               for out in cell.get("outputs", []))


def test_there_are_tutorials_and_each_has_checks():
    assert len(FILES) >= 3, FILES
    assert sorted(p.stem for p in FILES) == sorted(PROBES)


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_tutorial_source_teaches_and_opens_as_a_notebook(path):
    nb = jupytext.read(path)
    markdown = [c for c in nb.cells if c.cell_type == "markdown"]
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(markdown) >= 5 and len(code) >= 5
    assert nb.metadata["kernelspec"]["name"] == "python3"
    text = path.read_text(encoding="utf-8")
    assert re.search(r"docs/method\.md §\d", text), "cite the method as docs/method.md §N"
    assert "tempfile.mkdtemp" in text and 'os.environ["VITDECOMP_CACHE"]' in text  # writes only to a temp dir
    assert not re.search(r"from vitdecomp[.\w]* import _|\._[a-z]\w*\(", text), "public API only"
    # the notebook form round-trips to the same script
    assert jupytext.writes(jupytext.reads(jupytext.writes(nb, "ipynb"), "ipynb"), "py:percent").strip() == \
        jupytext.writes(nb, "py:percent").strip()


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_tutorial_runs(path, tmp_path, monkeypatch):
    nb, got = _run(path, tmp_path, monkeypatch)
    # it ran in this interpreter, worked in a temporary folder under TMPDIR and removed it
    assert got["python"] == sys.executable
    assert got["work"].startswith(str(tmp_path / "tmp")) and not got["work_left"]
    assert got["cache"].startswith(got["work"])
    stem = path.stem
    if stem == "01_quickstart_clip":
        assert got["error"] <= 1e-5 and got["by_hand"] <= 1e-5  # the pieces add up to the model's output
        assert abs(got["shares_sum"] - 1.0) <= 1e-6
        assert got["zero_shot"] >= 0.9  # the shipped CLIP reads colour
        assert got["heat_vs_heads"] <= 1e-4 and got["heat_grid"] == [8, 8]
        assert got["top_colour"].startswith("L") and ".H" in got["top_colour"]
        assert got["n_spans"] == 4
        assert _figures(nb) >= 3
        assert "max relative error of the sum" in _text(nb)
    elif stem == "02_non_clip_through_compalign":
        assert got["cosine"] >= 0.7  # held out: the test split, never seen by the fit
        assert got["cosine"] >= got["cosine_shared"] + 0.1  # one map per component beats one shared map
        assert got["defect"] <= 1e-4  # orthogonal parametrisation: exact isometries
        assert got["zero_shot"] >= 0.9
        assert got["overlap"] >= 4  # text through CompAlign finds what the Swin's classifier uses
        assert got["top_colour"].startswith("S1.")
        assert _figures(nb) >= 2
    elif stem == "03_dataset_scale_store":
        assert got["first"] == [0, 1, 2] and got["second"] == list(range(3, got["n_chunks"]))
        assert got["same"] is True  # resumed == uninterrupted, bit for bit
        assert got["skipped"] == ["red/broken.png"]
        assert got["merge_mean"] <= 1e-12 and got["merge_cov"] <= 1e-12
        assert got["zero_shot"] >= 0.9
        out = _text(nb)
        assert "changed since: []" in out and "refused:" in out
        assert len(got["changed"]) == 1 and got["changed"][0].startswith("classes:")
    elif stem == "04_applications":
        p = got["precisions"]
        assert p["colour"]["colour"] >= 0.9 and p["colour"]["colour"] > p["full"]["colour"]
        assert p["background"]["background"] >= 0.9 and p["background"]["background"] > p["full"]["background"]
        assert p["colour"]["background"] < 0.5  # the colour group ignores the background
        fg = got["seg_fg_iou"]
        assert got["seg_n"] == 100 and fg["decomposition"] > fg["raw_attention"]
        assert got["wga_ablated"] >= got["wga_baseline"] + 0.3
        assert got["wga_ablated"] > got["wga_random_max"] and got["wga_variance"] < got["wga_baseline"]
        assert _figures(nb) >= 3
    else:  # pragma: no cover - test_there_are_tutorials_and_each_has_checks guards this
        pytest.fail(f"no checks for {stem}")


def test_readme_lists_every_tutorial():
    readme = (TUTORIALS / "README.md").read_text(encoding="utf-8")
    for path in FILES:
        assert path.name in readme, path.name
    assert "jupytext --to notebook" in readme
