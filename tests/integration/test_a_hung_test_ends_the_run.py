"""A test that hangs ends the whole test run within its time limit, printing where it
hangs (tests/support/hang_watchdog.py): CI then fails with the trace, instead of waiting
out its own limit with nothing to show."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.hang_watchdog import HUNG_EXIT_CODE

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
HUNG_TEST = '''
import asyncio


async def wait_for_a_broker_that_never_answers():
    await asyncio.Event().wait()


async def test_hangs():
    await wait_for_a_broker_that_never_answers()
'''


def test_a_test_that_hangs_ends_the_run_naming_itself_and_the_task_it_waits_in(tmp_path: Path):
    (tmp_path / "test_hung.py").write_text(HUNG_TEST)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT), "-c",
         str(ROOT / "pyproject.toml"), "-p", "tests.support.hang_watchdog", str(tmp_path / "test_hung.py")],
        cwd=ROOT, env={**os.environ, "KABINET_TEST_TIME_MAX_S": "2"}, capture_output=True, text=True, timeout=120)
    said = run.stdout + run.stderr
    assert run.returncode == HUNG_EXIT_CODE, said
    assert "::test_hangs has run for over 2 s" in said
    tasks = said.split("asyncio tasks not done:")[1]
    assert "in test_hangs" in tasks and "in wait_for_a_broker_that_never_answers" in tasks and "in wait\n" in tasks
