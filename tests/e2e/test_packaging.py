"""The wheel a user installs (`pip install /path/to/millwright`) holds what the commands need:
`millwright demo` runs from it, away from the source tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from tests.e2e.test_demo import LINE

ROOT = Path(__file__).resolve().parents[2]
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", "data", "results"
)


def test_the_demo_runs_from_the_wheel(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy: building in place would leave build/ in the tree
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE, symlinks=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path / "dist"), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("millwright-*.whl")
    installed = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(installed)
    # -S: no site-packages processing, so not the editable install of the source tree; the
    # dependencies come from this venv's site-packages, the gateway only from the wheel.
    path = f"{installed}:{sysconfig.get_paths()['purelib']}"
    where = subprocess.run(
        [sys.executable, "-S", "-c", "import gateway; print(gateway.__file__)"],
        env={"PYTHONPATH": path}, cwd=tmp_path, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert Path(where.stdout.strip()).is_relative_to(installed)
    result = subprocess.run(
        [sys.executable, "-S", "-m", "gateway", "demo", "--duration", "4"],
        env={"PYTHONPATH": path}, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    shown = [m for line in result.stdout.splitlines() if (m := LINE.match(line))]
    assert {m.group(1) for m in shown} == {"press-1", "press-2", "cnc-1"}, result.stdout
