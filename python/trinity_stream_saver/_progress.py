"""progress=True: a tqdm bar in bytes over the items a save pulls."""

from __future__ import annotations

from collections.abc import Iterable, Iterator


def _progress_bar(total: int, description: str):
    # tqdm is needed only for progress=True, so it is not a dependency of
    # the package (pip install tqdm, or the "progress" extra).
    try:
        from tqdm.auto import tqdm
    except ImportError as error:
        raise ImportError(
            "progress=True shows a tqdm progress bar, but tqdm is not installed; "
            "install it (pip install tqdm) or pass progress=False."
        ) from error
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=description)

def _item_bytes(item: object) -> int:
    try:
        return int(item[1].nbytes)  # type: ignore[index]
    except Exception:
        return 0  # not a (name, tensor) pair: the saver raises the real error

def _counted(items: Iterable, bar) -> Iterator:
    """`items`, advancing `bar` by each tensor's bytes once the saver asks for
    the next item (the tensor is then written, or being written with
    overlap). The item is dropped before the next is pulled, so the wrapper
    never keeps a tensor alive."""
    for item in items:
        size = _item_bytes(item)
        yield item
        del item
        bar.update(size)
