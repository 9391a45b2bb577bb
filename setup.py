"""Builds trinity_stream_saver._C against the torch that is already installed.

Build with `pip install --no-build-isolation .`: an isolated build would
compile against a freshly downloaded torch, and the extension would then
fail to import next to the user's own torch.
"""

import glob
import os

from setuptools import setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as error:  # pragma: no cover - depends on the environment
    raise SystemExit(
        "trinity_stream_saver is built against your installed torch, which "
        "could not be imported. Install torch first, then run "
        "`pip install --no-build-isolation .`"
    ) from error

import torch


def _nlohmann_json_include_dirs():
    """nlohmann_json is a build dependency that pip cannot install; say so
    before the compiler fails on a missing header. Returns the include
    directory to add, if it is not one the compiler searches anyway."""
    extra = [os.environ.get("NLOHMANN_JSON_INCLUDE_DIR", ""),
             os.path.join(os.environ.get("CONDA_PREFIX", ""), "include")]
    for directory in ["/usr/include", "/usr/local/include"] + extra:
        if directory.strip(os.sep) and os.path.isfile(os.path.join(directory, "nlohmann", "json.hpp")):
            return [] if directory in ("/usr/include", "/usr/local/include") else [directory]
    raise SystemExit(
        "trinity_stream_saver needs the nlohmann_json headers (nlohmann/json.hpp) to build. "
        "Install them (Debian/Ubuntu: apt-get install nlohmann-json3-dev; conda: "
        "conda install -c conda-forge nlohmann_json), or point NLOHMANN_JSON_INCLUDE_DIR at "
        "the directory that holds nlohmann/json.hpp, then build again."
    )


ROOT = os.path.dirname(os.path.abspath(__file__))
SOURCES = sorted(
    os.path.relpath(path, ROOT)
    for path in glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True)
)

setup(
    ext_modules=[
        CppExtension(
            name="trinity_stream_saver._C",
            sources=SOURCES,
            include_dirs=[os.path.join(ROOT, "include"), os.path.join(ROOT, "csrc")]
            + _nlohmann_json_include_dirs(),
            define_macros=[("TSS_TORCH_VERSION", f'"{torch.__version__}"')],
            # C++20 (std::span, std::endian): older torch would otherwise add -std=c++17.
            extra_compile_args=["-O2", "-Wall", "-std=c++20"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
