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
            include_dirs=[os.path.join(ROOT, "include"), os.path.join(ROOT, "csrc")],
            # C++20 (std::span, std::endian): older torch would otherwise add -std=c++17.
            extra_compile_args=["-O2", "-Wall", "-std=c++20"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
