"""Loads the compiled core, with a clear error where it was built against
another torch: torch's C++ ABI changes between releases, and a mismatch
otherwise shows up as an undefined symbol or a crash."""

import torch

_REBUILD = (
    "Rebuild trinity_stream_saver against the torch you run: "
    "`pip install --no-build-isolation --no-deps --force-reinstall <source of trinity_stream_saver>`."
)

try:
    from . import _C as _C
except ImportError as error:
    raise ImportError(
        f"trinity_stream_saver's C++ extension could not be loaded with torch {torch.__version__} "
        f"({error}). It was probably built against another torch. {_REBUILD}"
    ) from error


def _release(version: str) -> str:
    # "2.13.0+cpu" and "2.13.0a0+git..." are both release 2.13.0.
    return version.split("+")[0].split("a")[0].split("rc")[0]


if _release(_C.BUILT_WITH_TORCH) != _release(torch.__version__):
    raise ImportError(
        f"trinity_stream_saver was built against torch {_C.BUILT_WITH_TORCH}, but torch "
        f"{torch.__version__} is imported. {_REBUILD}"
    )
