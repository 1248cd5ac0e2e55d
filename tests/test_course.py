"""The course kit: the student edition (`make student`: solutions gone, exercises blank, the
notebooks still run up to the first exercise, whose self-check says it is not done yet) and the
static site (`make site`)."""

import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def tagged(nb, tag):
    return [c for c in nb.cells if tag in c.metadata.get("tags", [])]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    out = tmp_path_factory.mktemp("student")
    subprocess.run([sys.executable, str(ROOT / ".ci" / "student-edition"), str(out)], check=True, capture_output=True)
    return out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_solution_survives_and_exercises_are_blank(path, student):
    original, edition = nbformat.read(path, as_version=4), nbformat.read(student / path.name, as_version=4)
    solutions, exercises = tagged(original, "solution"), tagged(edition, "exercise")
    assert solutions and exercises, "every notebook has tagged exercises and solutions"
    assert not tagged(edition, "solution")
    kept = "\n".join(c.source for c in edition.cells)
    lesson = "\n".join(c.source for c in original.cells if c not in solutions)
    for cell in solutions:  # no line of an answer that the lesson itself does not also contain
        for line in cell.source.splitlines():
            if len(line.strip()) > 12 and line not in lesson:
                assert line not in kept, line
    assert all(not c.outputs and c.execution_count is None for c in exercises if c.cell_type == "code")
    assert len(edition.cells) == len(original.cells) - len(solutions)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_student_notebook_runs_to_its_first_exercise(path, student):
    nb = nbformat.read(student / path.name, as_version=4)
    first = next(i for i, c in enumerate(nb.cells) if "exercise" in c.metadata.get("tags", []))
    nb.cells = nb.cells[: first + 1]
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(student)}}).execute()
    printed = "".join(o.get("text", "") for o in nb.cells[first].outputs)
    assert "not" in printed and "correct" not in printed, printed  # the self-check runs and says "not yet"


def test_the_site_has_every_notebook_in_order_with_its_plots(tmp_path):
    subprocess.run([sys.executable, str(ROOT / ".ci" / "build-site"), str(tmp_path)], check=True, capture_output=True)
    index = (tmp_path / "index.html").read_text()
    positions = [index.index(f'href="{p.stem}.html"') for p in NOTEBOOKS]
    assert positions == sorted(positions)  # the series map lists them in order
    for i, path in enumerate(NOTEBOOKS):
        html = (tmp_path / f"{path.stem}.html").read_text()
        assert "data:image/png;base64" in html  # plots are inside the page
        assert f"colab.research.google.com/github/titans-mini/titans-mini/blob/main/notebooks/{path.name}" in html
        assert not re.search(r'href="\d\d_\w+\.ipynb"', html)  # links between notebooks point to pages
        if i + 1 < len(NOTEBOOKS):
            assert f'href="{NOTEBOOKS[i + 1].stem}.html"' in html  # the "next" link
