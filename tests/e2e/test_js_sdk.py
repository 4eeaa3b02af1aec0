"""A real client: matrix-js-sdk 43 makes MatrixRTC's delayed-event calls through nginx.

`js/rtc.mjs` registers its own user with the stack's registration shared secret, then schedules,
restarts, cancels, sends and looks up delayed `org.matrix.msc3401.call.member` leaves with the
SDK's own methods, checking the room's state after each step. It prints one line per check and
exits non-zero on any failure; that output is shown here when the test fails.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from pathlib import Path

import pytest
from devstack.stack import Stack

pytestmark = pytest.mark.e2e

JS_DIR = Path(__file__).resolve().parent / "js"
TIMEOUT_SECONDS = 180
SUMMARY = re.compile(r"^(\d+) passed, (\d+) failed$", re.M)


async def test_matrixrtc_calls_through_matrix_js_sdk(stack: Stack) -> None:
    node = shutil.which("node")
    assert node, "node is not installed (Debian's nodejs package)"
    assert (JS_DIR / "node_modules" / "matrix-js-sdk").is_dir(), (
        "matrix-js-sdk is not installed: run scripts/setup node"
    )

    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MATRIX_", "RTC_", "CLIENT_URL", "HOMESERVER_URL"))
    }
    env["CLIENT_URL"] = stack.client_url
    env["REGISTRATION_SHARED_SECRET"] = stack.registration_shared_secret
    # The public vhost does not route Synapse's admin API; registration goes to Synapse directly.
    env["HOMESERVER_URL"] = stack.homeserver_url

    process = await asyncio.create_subprocess_exec(
        node,
        "rtc.mjs",
        cwd=JS_DIR,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        raw, _ = await asyncio.wait_for(process.communicate(), TIMEOUT_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"node rtc.mjs did not finish within {TIMEOUT_SECONDS} s")
    output = raw.decode(errors="replace")

    summaries = SUMMARY.findall(output)
    assert summaries, f"node rtc.mjs printed no summary line:\n{output}"
    passed, failed = map(int, summaries[-1])
    assert process.returncode == 0, f"node rtc.mjs exited {process.returncode}:\n{output}"
    assert failed == 0, f"{failed} check(s) failed:\n{output}"
    assert passed >= 20, f"only {passed} checks ran:\n{output}"
