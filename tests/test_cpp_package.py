"""The C++ API as a LibTorch program outside this repository uses it: the
library installed with CMake, found with find_package(TrinityStreamSaver),
and examples/cpp built against it as a downstream project."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trinity_stream_saver import save_safetensors_streaming

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # builds C++ (the package too, outside scripts/test.sh)


def _tool(name):
    beside_python = Path(sys.executable).parent / name
    found = str(beside_python) if beside_python.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is needed to build the C++ example; scripts/setup.sh installs it")
    return found


def _run(*command):
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _cmake_generator_args():
    ninja = Path(sys.executable).parent / "ninja"
    return ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja.exists() else []


@pytest.fixture(scope="module")
def install_prefix(tmp_path_factory):
    """The installed package: the one scripts/test.sh installed, or one
    configured (without GoogleTest), built and installed here."""
    prefix = os.environ.get("TSS_INSTALL_PREFIX")
    if prefix:
        return prefix
    cmake = _tool("cmake")
    work = tmp_path_factory.mktemp("package")
    _run(cmake, "-S", str(ROOT), "-B", str(work / "build"), *_cmake_generator_args(),
         "-DBUILD_TESTING=OFF", "-DCMAKE_BUILD_TYPE=Release",
         f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}")
    _run(cmake, "--build", str(work / "build"), "-j", str(os.cpu_count() or 1))
    _run(cmake, "--install", str(work / "build"), "--prefix", str(work / "prefix"))
    return str(work / "prefix")


@pytest.fixture(scope="module")
def example(install_prefix, tmp_path_factory):
    cmake = _tool("cmake")
    build = tmp_path_factory.mktemp("example")
    _run(cmake, "-S", str(ROOT / "examples" / "cpp"), "-B", str(build), *_cmake_generator_args(),
         f"-DCMAKE_PREFIX_PATH={install_prefix};{torch.utils.cmake_prefix_path}")
    _run(cmake, "--build", str(build))
    return build / "save_module"


def _expected_parameters():
    # The example seeds torch's generator with 0 and builds Embedding(16, 8)
    # then Linear(8, 4); the Python modules draw the same numbers.
    torch.manual_seed(0)
    embed, proj = torch.nn.Embedding(16, 8), torch.nn.Linear(8, 4)
    return {"embed.weight": embed.weight, "proj.weight": proj.weight, "proj.bias": proj.bias}


def test_the_installed_package_has_the_public_headers_and_the_cmake_config(install_prefix):
    prefix = Path(install_prefix)
    for header in ("stream_saver.h", "errors.h", "tensor_meta.h"):
        assert (prefix / "include" / "trinity_stream_saver" / header).is_file()
    configs = list(prefix.glob("lib*/cmake/TrinityStreamSaver/TrinityStreamSaverConfig.cmake"))
    assert len(configs) == 1
    # Internal headers stay private.
    assert not list((prefix / "include").rglob("file_sink.h"))


@pytest.mark.parametrize("mode", [[], ["--overlap"]], ids=["in_turn", "overlap"])
def test_a_downstream_program_saves_a_module_that_safetensors_loads(example, tmp_path, mode):
    out = tmp_path / "model.safetensors"
    _run(str(example), str(out), *mode)
    loaded = load_file(str(out))
    expected = _expected_parameters()
    assert sorted(loaded) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(loaded[name], tensor.detach(), rtol=0, atol=0)
    assert not (tmp_path / "model.safetensors.tmp").exists()


def test_the_cpp_api_writes_the_same_bytes_as_the_python_api(example, tmp_path):
    from_cpp = tmp_path / "cpp.safetensors"
    _run(str(example), str(from_cpp))
    params = {name: t.detach() for name, t in _expected_parameters().items()}
    order = ["embed.weight", "proj.weight", "proj.bias"]  # named_parameters() order
    meta = [(name, params[name].dtype, params[name].shape) for name in order]
    from_python = save_safetensors_streaming(
        ((name, params[name]) for name in order), tmp_path / "py.safetensors", meta,
        metadata={"format": "pt"})
    assert Path(from_python).read_bytes() == from_cpp.read_bytes()


def test_a_failed_save_from_cpp_reports_the_error_and_leaves_nothing(example, tmp_path):
    result = subprocess.run([str(example), str(tmp_path / "missing" / "model.safetensors")],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "No such file or directory" in result.stderr and "missing" in result.stderr
    assert list(tmp_path.iterdir()) == []
