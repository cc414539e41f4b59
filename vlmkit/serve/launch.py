"""Start `vlmkit serve` as a child process and return once it answers /health: for scripts, benchmarks and
tests that drive a real server.

    proc = start_serve(["--model", "demo"], port=8000, log="serve.log")
    ...
    proc.terminate(); proc.wait()

The server's output goes to a file, not a pipe: a pipe that nobody reads fills up and then stalls the
server at its next log line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx


class ServerStartError(RuntimeError):
    """The server exited, or did not answer /health in time; the message holds the end of its log."""


def start_serve(
    args: Sequence[str],
    *,
    port: int,
    log: str | Path,
    launcher: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    append: bool = False,
    new_session: bool = False,
) -> subprocess.Popen:
    """Run `[*launcher, "serve", "--port", port, *args]` with its output written to `log` (appended with
    `append`), and return the process once GET /health on 127.0.0.1:port answers 200.

    launcher: the command before `serve` (default: this Python's `-m vlmkit`; e.g. torchrun's for `--tp`);
    env: the child's environment (default: this process's); new_session: start it in a process group of
    its own, so that a signal to the group reaches every process (torchrun's ranks).

    Raises ServerStartError, with the end of the log, when the process exits first or `timeout` seconds pass.
    Whatever ends the wait (that, or an interrupt), the process (and with new_session its group) is killed
    first."""
    launcher = list(launcher) if launcher is not None else [sys.executable, "-m", "vlmkit"]
    log = Path(log)
    # unbuffered, so that its last lines reach the log even when it is killed
    child_env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    with log.open("a" if append else "w") as out:
        proc = subprocess.Popen(
            [*launcher, "serve", "--port", str(port), *args],
            env=child_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
        )
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}/health", timeout, log)
    except BaseException:  # exited, timed out, or interrupted while waiting: nothing is left running
        if proc.poll() is None or new_session:
            stop_now(proc, new_session)
        raise
    return proc


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(
                f"`vlmkit serve` exited with status {proc.returncode} before it answered /health; the end of "
                f"its log ({log}):\n{tail(log)}"
            )
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise ServerStartError(
        f"`vlmkit serve` did not answer /health within {timeout:g} s; the end of its log ({log}):\n{tail(log)}"
    )


def stop_now(proc: subprocess.Popen, group: bool) -> None:
    """SIGKILL the process (and with `group`, every process of its group: torchrun's ranks) and reap it."""
    try:
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except ProcessLookupError:  # already gone
        pass
    proc.wait()


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as e:
        return f"(unreadable: {e})"
