"""Tests of the notebook runner's argument handling and the notebooks' parameter cells."""

import ast

import nbformat
import pytest

from rtrl_moe import reproduce

NOTEBOOKS = sorted(reproduce.NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def test_notebooks_found():
    assert [path.name[:2] for path in NOTEBOOKS] == ["01", "02", "03", "04"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_parameters_cell_plain(path):
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    names = set()
    for node in ast.parse(tagged[0].source).body:
        assert isinstance(node, ast.Assign)
        name = node.targets[0].id
        assert name.isupper()
        ast.literal_eval(node.value)
        names.add(name)
    assert {"DEVICE", "FIGURES_DIR"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_parameters_never_reassigned(path):
    nb = nbformat.read(path, as_version=4)
    names = set(reproduce.notebook_parameters(path))
    code = [c for c in nb.cells
            if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", [])]
    for cell in code:
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                assert node.id not in names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_notebook_executed(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.kernelspec.name == "python3"
    assert "papermill" not in nb.metadata
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)


def test_unknown_parameter_rejected():
    with pytest.raises(ValueError, match="unknown parameter 'NOT_A_PARAMETER'"):
        reproduce.parse_overrides([["NOT_A_PARAMETER", "1"]], NOTEBOOKS)


def test_parameter_of_unselected_notebook_rejected():
    only_01 = reproduce.select_notebooks("01")
    with pytest.raises(ValueError, match="unknown parameter 'SEEDS'"):
        reproduce.parse_overrides([["SEEDS", "[0, 1]"]], only_01)


def test_non_literal_value_rejected():
    with pytest.raises(ValueError, match="SEQUENCES must be a Python literal"):
        reproduce.parse_overrides([["SEQUENCES", "abc"]], NOTEBOOKS)


def test_literal_values_parsed():
    overrides = reproduce.parse_overrides(
        [["SEEDS", "[0, 1, 2]"], ["SEQUENCES", "10"], ["DEVICE", "cuda"]], NOTEBOOKS)
    assert overrides == {"SEEDS": [0, 1, 2], "SEQUENCES": 10, "DEVICE": "cuda"}


def test_unknown_prefix_rejected():
    with pytest.raises(ValueError, match="no notebook starts with 99"):
        reproduce.select_notebooks("99")


def test_main_exits_2_on_bad_parameter(capsys):
    assert reproduce.main(["-p", "NOT_A_PARAMETER", "1"]) == 2


def test_volatile_metadata_stripped(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.metadata["papermill"] = {"duration": 1.0}
    cell = nbformat.v4.new_code_cell("1")
    cell.metadata["papermill"] = {"start_time": "now"}
    cell.metadata["execution"] = {"iopub.status.busy": "now"}
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)

    reproduce.strip_volatile_metadata(path)

    stripped = nbformat.read(path, as_version=4)
    assert "papermill" not in stripped.metadata
    assert "papermill" not in stripped.cells[0].metadata
    assert "execution" not in stripped.cells[0].metadata
    assert stripped.cells[0].metadata["tags"] == ["parameters"]
