"""A test that hangs ends the run with a trace of where, instead of leaving CI to its own
time limit with nothing printed. pytest-timeout would show the threads only: every hang of
these tests is an asyncio task waiting, so this shows the tasks as well."""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import os
import sys
import threading
from collections.abc import Iterator

import pytest

# The slowest test takes about 70 s on 2 cores, when it fails. The setting is for the watchdog's own test.
TEST_TIME_MAX_S = float(os.environ.get("KABINET_TEST_TIME_MAX_S", "300"))
TASKS_SHOWN_MAX = 200
FRAMES_SHOWN_PER_TASK = 20
HUNG_EXIT_CODE = 3


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    watchdog = threading.Timer(TEST_TIME_MAX_S, _end_hung_run, args=(item,))
    watchdog.daemon = True
    watchdog.start()
    try:
        yield
    finally:
        watchdog.cancel()


def _end_hung_run(item: pytest.Item) -> None:
    try:
        _print_where_it_hangs(item)
    finally:  # whatever the printing met (a closed pipe), the run ends
        os._exit(HUNG_EXIT_CODE)


def _print_where_it_hangs(item: pytest.Item) -> None:
    capture = item.config.pluginmanager.getplugin("capturemanager")
    if capture is not None:  # else what follows goes to the test's captured output, never shown
        capture.suspend_global_capture(in_=True)
    out = sys.__stderr__
    print(f"\n{item.nodeid} has run for over {TEST_TIME_MAX_S:g} s, setup and teardown included: ending the test"
          " run.\nThreads:", file=out, flush=True)
    faulthandler.dump_traceback(out, all_threads=True)
    # Read from this thread while the loop is stuck: good enough for a post-mortem.
    tasks = [task for task in gc.get_objects() if isinstance(task, asyncio.Task) and not task.done()]
    print(f"asyncio tasks not done: {len(tasks)}", file=out, flush=True)
    for task in tasks[:TASKS_SHOWN_MAX]:
        print(f"{task!r} waits in:", *_awaiting(task), sep="\n", file=out)
    out.flush()


def _awaiting(task: asyncio.Task) -> list[str]:
    """Where a task waits, outermost first: each coroutine it awaits, down to the future.
    (Task.print_stack shows a suspended task's outermost frame only.)"""
    lines, awaited = [], task.get_coro()
    for _ in range(FRAMES_SHOWN_PER_TASK):
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is None:
            lines.append(f"  on {awaited!r}")
            break
        lines.append(f'  File "{frame.f_code.co_filename}", line {frame.f_lineno}, in {frame.f_code.co_name}')
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
        if awaited is None:
            break
    return lines
