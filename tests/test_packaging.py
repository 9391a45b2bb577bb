"""The source distribution holds everything the extension and the CMake
package build from, so that `python -m build` and `pip install` of the
sdist work on another machine."""

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # builds an sdist


def test_the_sdist_holds_every_source_header_and_cmake_file(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", str(tmp_path), str(ROOT)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (sdist,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        packed = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    needed = [
        path.relative_to(ROOT).as_posix()
        for folder in ("csrc", "include", "cmake", "examples", "python")
        for path in (ROOT / folder).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".so")
    ]
    assert needed, "found no sources to check"
    missing = sorted(set(needed + ["CMakeLists.txt", "setup.py", "pyproject.toml"]) - packed)
    assert missing == []
