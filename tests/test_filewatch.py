"""pgproxy.filewatch: which changes of a file count, and when the callback runs."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from pgproxy.filewatch import FileWatch, identity
from tests.support.configmap import publish


class Calls:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def _watch(path: Path, calls: Calls) -> FileWatch:
    return FileWatch(path, lambda: 1.0, calls)


def test_a_configmap_swap_is_a_change_even_with_the_same_size_and_mtime(tmp_path: Path) -> None:
    publish(tmp_path, {"pgproxy.toml": "a = 1\n"})
    path = tmp_path / "pgproxy.toml"
    calls = Calls()
    watch = _watch(path, calls)
    before = identity(path)
    publish(tmp_path, {"pgproxy.toml": "a = 2\n"})  # the same size
    assert before is not None
    os.utime(path, ns=(before[4], before[4]))  # and the very same mtime, through the symlinks
    after = identity(path)
    assert after is not None and after[3:] == before[3:] and after != before
    watch.look()
    assert calls.count == 0  # seen once: it might be half written
    watch.look()
    assert calls.count == 1
    watch.look()
    assert calls.count == 1  # once per change


def test_an_in_place_rewrite_is_a_change(tmp_path: Path) -> None:
    path = tmp_path / "pgproxy.toml"
    path.write_text("a = 1\n")
    calls = Calls()
    watch = _watch(path, calls)
    with path.open("a") as f:
        f.write("b = 2\n")
    watch.look()
    watch.look()
    assert calls.count == 1


def test_a_file_still_changing_is_not_loaded_until_it_settles(tmp_path: Path) -> None:
    path = tmp_path / "pgproxy.toml"
    path.write_text("a = 1\n")
    calls = Calls()
    watch = _watch(path, calls)
    for n in range(3):
        with path.open("a") as f:
            f.write(f"b{n} = {n}\n")
        watch.look()
    assert calls.count == 0
    watch.look()
    assert calls.count == 1


def test_a_removed_file_is_a_change_and_so_is_its_return(tmp_path: Path) -> None:
    path = tmp_path / "pgproxy.toml"
    path.write_text("a = 1\n")
    calls = Calls()
    watch = _watch(path, calls)
    path.unlink()
    assert identity(path) is None
    watch.look()
    watch.look()
    assert calls.count == 1  # the reload reports the missing file and keeps running
    path.write_text("a = 2\n")
    watch.look()
    watch.look()
    assert calls.count == 2


def test_mark_absorbs_a_change_loaded_by_sighup(tmp_path: Path) -> None:
    path = tmp_path / "pgproxy.toml"
    path.write_text("a = 1\n")
    calls = Calls()
    watch = _watch(path, calls)
    path.write_text("a = 22\n")
    watch.mark()  # SIGHUP's reload read it
    watch.look()
    watch.look()
    assert calls.count == 0


async def test_the_task_looks_every_interval_and_zero_turns_it_off(tmp_path: Path) -> None:
    publish(tmp_path, {"pgproxy.toml": "a = 1\n"})
    calls = Calls()
    interval = [0.02]
    watch = FileWatch(tmp_path / "pgproxy.toml", lambda: interval[0], calls)
    watch.start()
    try:
        publish(tmp_path, {"pgproxy.toml": "a = 2\n"})
        for _ in range(200):
            if calls.count:
                break
            await asyncio.sleep(0.01)
        assert calls.count == 1
        interval[0] = 0
        await asyncio.sleep(0.05)  # the task is asleep for the off-recheck period now
        publish(tmp_path, {"pgproxy.toml": "a = 3\n"})
        await asyncio.sleep(0.1)
        assert calls.count == 1
    finally:
        task = watch.task
        watch.stop()
    assert watch.task is None
    await asyncio.sleep(0)
    assert task is not None and task.cancelled()
