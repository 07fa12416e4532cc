"""notebooks/tour.ipynb: the committed copy is executed and small; it runs top to bottom on a
tiny MNIST written here (no network, no data/mnist needed)."""

import json
from pathlib import Path

import numpy as np
import pytest

from input_data.mnist import mnist_shift
from input_data.mnist.record_names import record_name
from tests.test_input_mnist import digits, write_idx

nbformat = pytest.importorskip("nbformat", reason="needs the test extra: pip install -e .[test]")
pytest.importorskip("nbclient", reason="needs the test extra: pip install -e .[test]")
pytest.importorskip("ipykernel", reason="needs the test extra: pip install -e .[test]")

from notebooks.run import TOUR, execute, with_parameters  # noqa: E402

MAX_BYTES = 1_500_000
CELL_TIMEOUT_S = 300


def image_cells(notebook) -> set[str]:
    """The sources of the code cells that show a PNG picture."""
    return {cell.source for cell in notebook.cells if cell.cell_type == "code"
            and any("image/png" in output.get("data", {}) for output in cell.outputs)}


def test_committed_notebook_is_executed_top_to_bottom_with_pictures_and_small():
    notebook = json.loads(Path(TOUR).read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert [cell["execution_count"] for cell in code] == list(range(1, len(code) + 1))
    outputs = [output for cell in code for output in cell["outputs"]]
    assert not [output for output in outputs if output["output_type"] == "error"]
    assert sum("image/png" in output.get("data", {}) for output in outputs) >= 5
    assert Path(TOUR).stat().st_size < MAX_BYTES


def test_parameters_are_assigned_right_after_the_tagged_cell():
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("A = 1", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("print(A)")])
    cells = with_parameters(notebook, {"A": "x/y", "B": 2}).cells
    assert [cell.source for cell in cells] == ["A = 1", "A = 'x/y'\nB = 2", "print(A)"]
    with pytest.raises(ValueError, match="no cell tagged 'parameters'"):
        with_parameters(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("A = 1")]),
                        {"A": 2})


@pytest.fixture
def tiny_mnist(tmp_path) -> Path:
    """IDX files of 256 training and 200 test random 'digits' and the test records the
    notebook reads (test_0shifted_mnist.tfrecords), in tmp_path."""
    rng = np.random.default_rng(0)
    train_labels = rng.integers(0, 10, 256).astype(np.uint8)
    test_images = digits(200, seed=2)
    test_labels = rng.integers(0, 10, 200).astype(np.uint8)
    write_idx(tmp_path, (digits(256, seed=1), train_labels), (test_images, test_labels))
    mnist_shift.write_single(test_images, test_labels, str(tmp_path / record_name("test", 0)),
                             shift=0, pad=0)
    return tmp_path


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_and_shows_its_pictures(tiny_mnist):
    executed = execute(parameters={"DATA_DIR": str(tiny_mnist)}, cell_timeout_s=CELL_TIMEOUT_S)

    code = [cell for cell in executed.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code)
    assert not [output for cell in code for output in cell.outputs
                if output.output_type == "error"]
    committed = nbformat.read(TOUR, as_version=4)
    assert image_cells(committed) <= image_cells(executed)
