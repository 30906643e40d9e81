"""The layer rules (pyproject.toml's [tool.importlinter] contracts) hold for the package as it is."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_import_contracts_hold():
    """world/ and the maths import no other part of posttrain, the core never imports the methods, report or
    command line, and the report reads output files only: import-linter checks every import, direct or not."""
    lint = Path(sys.executable).parent / "lint-imports"
    checked = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout[-3000:]
    assert "0 broken" in checked.stdout
