"""Every committed notebook was run top to bottom, opens on Colab, and installs itself there.

These checks read the saved .ipynb files only (no kernel): `make test` separately
re-executes the notebooks with `pytest --nbval-lax`.
"""
import ast
import json
from pathlib import Path

import pytest

REPO = "titans-mini/titans-mini"  # GitHub owner/name used by Colab badges and the Colab install
NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))

params = [pytest.param(p, id=p.name) for p in NOTEBOOKS] or [
    pytest.param(None, marks=pytest.mark.skip(reason="no notebooks/*.ipynb yet"))
]


def _load(path: Path) -> dict:
    with path.open(encoding="utf-8") as f:
        nb = json.load(f)
    assert nb.get("nbformat") == 4, f"{path.name}: expected nbformat 4"
    return nb


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _cells(nb: dict, kind: str) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == kind]


@pytest.mark.parametrize("path", params)
def test_executed_in_order_without_errors(path):
    code = [c for c in _cells(_load(path), "code") if _source(c).strip()]
    assert code, f"{path.name}: no code cells"
    counts = [c.get("execution_count") for c in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{path.name}: execution counts {counts}; re-run it in a fresh kernel, top to bottom"
    )
    for i, cell in enumerate(code, start=1):
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{path.name}: code cell {i} has an error output: {errors[0].get('ename')}"


@pytest.mark.parametrize("path", params)
def test_colab_badge_in_first_markdown_cell(path):
    markdown = _cells(_load(path), "markdown")
    assert markdown, f"{path.name}: no markdown cell"
    link = f"https://colab.research.google.com/github/{REPO}/blob/main/notebooks/{path.name}"
    assert f"]({link})" in _source(markdown[0]), f"{path.name}: first markdown cell lacks a Colab badge linking to {link}"


@pytest.mark.parametrize("path", params)
def test_first_code_cell_installs_only_on_colab(path):
    code = _cells(_load(path), "code")
    assert code, f"{path.name}: no code cells"
    src = _source(code[0])
    tree = ast.parse(src)
    guarded = [
        node for node in ast.walk(tree)
        if isinstance(node, ast.If) and "google.colab" in ast.get_source_segment(src, node.test)
    ]
    assert guarded, f"{path.name}: first code cell has no `if` testing for google.colab"
    body = "\n".join(ast.get_source_segment(src, stmt) for node in guarded for stmt in node.body)
    assert "pip" in body and "install" in body and f"git+https://github.com/{REPO}" in body, (
        f"{path.name}: the google.colab branch must pip install git+https://github.com/{REPO}"
    )
