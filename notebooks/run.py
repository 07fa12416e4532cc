"""Executes notebooks/tour.ipynb in place, from the repository root, keeping its outputs.

  .venv/bin/python notebooks/run.py [NOTEBOOK]

Needs the `test` extra (nbclient, nbformat, ipykernel) and the MNIST files in data/mnist
(`bash scripts/main.sh` makes them). The notebook is written back only when every cell ran
without error, through a temporary file and a rename.
"""

from __future__ import annotations

import os
import sys
import time

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOUR = os.path.join(REPO, "notebooks", "tour.ipynb")
CELL_TIMEOUT_S = 300
PARAMETERS_TAG = "parameters"
"""The tag of the cell whose assignments `execute(parameters=...)` overrides."""


def with_parameters(notebook: nbformat.NotebookNode,
                    parameters: dict[str, object]) -> nbformat.NotebookNode:
    """`notebook` with a cell assigning `parameters` after its PARAMETERS_TAG cell."""
    cells = notebook.cells
    tagged = [i for i, cell in enumerate(cells)
              if PARAMETERS_TAG in cell.get("metadata", {}).get("tags", [])]
    if not tagged:
        raise ValueError(f"the notebook has no cell tagged {PARAMETERS_TAG!r} to override")
    source = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    injected = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    cells.insert(tagged[0] + 1, injected)
    return notebook


def execute(path: str = TOUR, parameters: dict[str, object] | None = None,
            cell_timeout_s: int = CELL_TIMEOUT_S) -> nbformat.NotebookNode:
    """The notebook at `path` executed top to bottom in a fresh kernel whose working
    directory is the repository root; `parameters` override the tagged cell's values.

    Raises nbclient's CellExecutionError (the cell and its traceback) where a cell fails.
    """
    notebook = nbformat.read(path, as_version=4)
    if parameters:
        notebook = with_parameters(notebook, parameters)
    client = NotebookClient(
        notebook,
        timeout=cell_timeout_s,
        kernel_name="python3",
        resources={"metadata": {"path": REPO}},
        # One stream output per cell: a progress bar keeps its last state, not every update.
        coalesce_streams=True,
        record_timing=False,
        # TensorFlow's C++ start-up lines (oneDNN, CUDA) go to the terminal, not the notebook.
        extra_arguments=["--IPKernelApp.capture_fd_output=False"],
    )
    return client.execute()


def write_atomically(notebook: nbformat.NotebookNode, path: str) -> None:
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        nbformat.write(notebook, temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def main(argv: list[str]) -> int:
    if len(argv) > 2:
        print(f"usage: {argv[0]} [NOTEBOOK]", file=sys.stderr)
        return 2
    path = os.path.abspath(argv[1] if len(argv) == 2 else TOUR)
    if not os.path.isfile(path):
        print(f"run.py: error: {path} not found", file=sys.stderr)
        return 1
    start = time.monotonic()
    notebook = execute(path)
    seconds = time.monotonic() - start
    write_atomically(notebook, path)
    print(f"executed {os.path.relpath(path, REPO)} in {seconds:.0f} s; "
          f"{os.path.getsize(path) / 1e6:.2f} MB with its outputs")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
