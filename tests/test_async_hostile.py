"""save_model_streaming_async against what training code does to it: a
storage freed or shrunk (as FSDP frees parameters between uses) before or
while the save copies it, and a process forked while a save runs (a
DataLoader worker, multiprocessing with the fork start method).

A crash here would end the training run, so each case runs in a child
interpreter, and the test reads how it ended."""

from __future__ import annotations

import os
import signal
import textwrap

import pytest

from conftest import run_python

MODES = {"full": "None", "bounded": "64 << 10"}

# A model whose tensors are larger than the bounded ring (64 KiB, so the
# ring holds one tensor at a time), and a writer held at its first tensor
# until the test lets it go.
PRELUDE = textwrap.dedent("""
    import os, sys, threading
    import torch
    from trinity_stream_saver import save_model_streaming_async
    from trinity_stream_saver import _async_work

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
    folder = sys.argv[1]
    gate = threading.Event()

    def held(items):
        for index, item in enumerate(items):
            if index == 0:
                assert gate.wait(60)
            yield item

    _async_work._feed_writer = held
""")


def run_child(tmp_path, body: str, timeout: float = 120):
    result = run_python(PRELUDE + textwrap.dedent(body), str(tmp_path / "ckpt"), timeout=timeout)
    assert result.returncode >= 0, (
        f"the child was killed by {signal.Signals(-result.returncode).name}: {result.stderr}")
    return result


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("damage", ["resize_(0)", "resize_(100)"])
def test_a_storage_freed_before_the_call_fails_the_future_naming_the_tensor(tmp_path, mode, damage):
    result = run_child(tmp_path, f"""
        model[2].weight.untyped_storage().{damage}
        gate.set()
        future = save_model_streaming_async(model, folder, max_staging_bytes={MODES[mode]})
        try:
            future.result(60)
        except ValueError as error:
            print("VALUE_ERROR", error)
        print("EXISTS", os.path.exists(folder) and sorted(os.listdir(folder)))
    """)
    assert result.returncode == 0, result.stderr
    assert "VALUE_ERROR tensor '2.weight' has lost its memory" in result.stdout, result.stdout
    assert "EXISTS False" in result.stdout or "EXISTS []" in result.stdout, result.stdout


def test_a_storage_freed_after_the_call_before_its_copy_fails_the_future(tmp_path):
    # Bounded staging: the writer is held at the first tensor, so the ring
    # (one tensor) is full and the last weight is not yet copied when its
    # storage goes.
    result = run_child(tmp_path, f"""
        future = save_model_streaming_async(model, folder, max_staging_bytes={MODES["bounded"]})
        assert not future.snapshot_taken()
        model[3].weight.untyped_storage().resize_(0)
        gate.set()
        try:
            future.result(60)
        except ValueError as error:
            print("VALUE_ERROR", error)
        print("EXISTS", os.path.exists(folder) and sorted(os.listdir(folder)))
    """)
    assert result.returncode == 0, result.stderr
    assert "VALUE_ERROR tensor '3.weight' has lost its memory" in result.stdout, result.stdout
    assert "EXISTS False" in result.stdout or "EXISTS []" in result.stdout, result.stdout


FORKED = """
    future = save_model_streaming_async(model, folder, max_staging_bytes={ring})
    pid = os.fork()
    if pid == 0:
        {child}
        sys.exit(0)  # a normal exit: the atexit handlers run
    gate.set()
    print("PARENT", future.result(60) == os.path.join(folder, "model.safetensors"))
    _, status = os.waitpid(pid, 0)
    print("CHILD_EXIT", os.waitstatus_to_exitcode(status))
"""


@pytest.mark.parametrize("mode", MODES)
def test_a_child_forked_during_a_save_exits_at_once(tmp_path, mode):
    result = run_child(tmp_path, FORKED.format(ring=MODES[mode], child="pass"), timeout=60)
    assert result.returncode == 0, result.stderr
    assert "PARENT True" in result.stdout and "CHILD_EXIT 0" in result.stdout, result.stdout


@pytest.mark.parametrize("mode", MODES)
def test_a_child_forked_during_a_save_can_save_on_its_own(tmp_path, mode):
    child = ("gate.set(); assert save_model_streaming_async(model, folder + '-child', "
             f"max_staging_bytes={MODES[mode]}).result(30).startswith(folder + '-child')")
    result = run_child(tmp_path, FORKED.format(ring=MODES[mode], child=child), timeout=60)
    assert result.returncode == 0, result.stderr
    assert "PARENT True" in result.stdout and "CHILD_EXIT 0" in result.stdout, result.stdout
    assert sorted(os.listdir(tmp_path / "ckpt-child")) == ["model.safetensors"]


def test_a_child_forked_during_a_finalize_async_can_finalize_on_its_own(tmp_path):
    result = run_python(textwrap.dedent("""
        import os, sys, torch
        from trinity_stream_saver import finalize_async, save_safetensors_streaming
        folder = sys.argv[1]
        os.makedirs(folder)
        def temp(name):
            return save_safetensors_streaming([("a", torch.ones(4))], os.path.join(folder, name),
                                              [("a", "F32", [4])], rename=False)
        first = finalize_async(temp("parent.safetensors"), os.path.join(folder, "parent.safetensors"))
        pid = os.fork()
        if pid == 0:
            done = finalize_async(temp("child.safetensors"), os.path.join(folder, "child.safetensors"))
            done.result(20)
            sys.exit(0)
        first.result(20)
        _, status = os.waitpid(pid, 0)
        print("CHILD_EXIT", os.waitstatus_to_exitcode(status))
    """), str(tmp_path / "f"), timeout=60)
    assert result.returncode == 0, result.stderr
    assert "CHILD_EXIT 0" in result.stdout
    assert sorted(os.listdir(tmp_path / "f")) == ["child.safetensors", "parent.safetensors"]
