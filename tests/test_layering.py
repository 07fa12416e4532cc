"""The data layer stands below the model: input_data imports only capsules' data modules."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What input_data may use of capsules: errors, data set facts, feature keys, tf.data helpers
# and process facts; never the training, checkpoint, run directory, distribution or model
# modules (they would make every data tool load the model).
ALLOWED = {"capsules.errors", "capsules.datasets", "capsules.features", "capsules.tf_data",
           "capsules.processes", "capsules.tf_logs"}


def _capsules_imports(path: Path) -> list[str]:
    """The capsules modules (or names of the package) that the file at `path` imports."""
    imported = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "capsules":
            imported += [f"capsules.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.append(node.module)
    return [name for name in imported if name == "capsules" or name.startswith("capsules.")]


def test_input_data_imports_only_the_data_modules_of_capsules():
    files = sorted((ROOT / "input_data").rglob("*.py"))
    assert len(files) > 10  # the walk found the package
    wrong = [f"{path.relative_to(ROOT)}: {name}" for path in files
             for name in _capsules_imports(path) if name not in ALLOWED]
    assert not wrong, "input_data imports modules above it:\n" + "\n".join(wrong)


def test_the_check_sees_every_form_of_import(tmp_path):
    source = tmp_path / "module.py"
    source.write_text("import capsules.run_dir\nfrom capsules import training as t\n"
                      "from capsules.models import CapsNet\nfrom capsules.errors import X\n"
                      "def f():\n    import capsules.checkpoints\n")
    assert _capsules_imports(source) == ["capsules.run_dir", "capsules.training",
                                         "capsules.models", "capsules.errors",
                                         "capsules.checkpoints"]
