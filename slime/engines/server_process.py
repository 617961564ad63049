"""A server in a child process: start it, wait until it answers, call it over HTTP, stop it.

SGLang's ``launch_server`` and sglang-router's ``launch_router`` are separate programs we start
and watch, not libraries we import (they own CUDA, their own worker processes and event
loops). `ServerProcess` starts one in its own session (so stopping it stops every process it
spawned: SGLang forks a scheduler and detokenizer per TP rank), writes its output to a log
file whose tail goes into every error, and waits on a health route while checking that the
process is still alive, so a crash at start-up fails in seconds instead of at the timeout.
Only the standard library is used, so a plain driver process can run it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

logger = logging.getLogger(__name__)

__all__ = ["HTTPCallError", "ServerProcess", "free_port", "http_call", "url_for"]


class HTTPCallError(RuntimeError):
    """A server answered with an error status (or not at all); the message names the route."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` right now (the server binds it moments later)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def url_for(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def http_call(method: str, url: str, body: dict | None = None, timeout: float = 60.0):
    """``method`` ``url`` with a JSON body; the decoded JSON answer (or its text, or None when empty).

    Raises `HTTPCallError` with the status and the server's message on a non-2xx answer.
    """
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:2000]
        raise HTTPCallError(f"{method} {url}: HTTP {e.code}: {detail}", status=e.code) from None
    except (urllib.error.URLError, OSError) as e:
        raise HTTPCallError(f"{method} {url}: {getattr(e, 'reason', e)}") from None
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


class ServerProcess:
    """One server program (``argv``) in its own session, its output in ``log_path``."""

    def __init__(self, name: str, argv: list[str], env: dict | None = None, log_path: str | None = None):
        self.name, self.argv = name, list(argv)
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix=f"slime-{name}-", suffix=".log")
            os.close(fd)
        self.log_path = log_path
        with open(log_path, "ab") as log:
            # start_new_session: the server and every process it forks form one process group.
            self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        logger.info("%s: started pid %d (log %s): %s", name, self.proc.pid, log_path, " ".join(argv))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - chars))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def wait_healthy(self, url: str, timeout: float, poll_s: float = 1.0) -> None:
        """Poll ``GET url`` until it answers 200; fail early (with the log) if the process exits."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while True:
            if not self.alive():
                raise RuntimeError(
                    f"{self.name} exited with code {self.proc.returncode} before {url} answered; "
                    f"last output ({self.log_path}):\n{self.log_tail()}"
                )
            try:
                http_call("GET", url, timeout=max(poll_s, 5.0))
                return
            except HTTPCallError as e:
                last = str(e)
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(
                    f"{self.name}: {url} not healthy after {timeout:.0f} s ({last}); log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(poll_s)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after ``timeout``."""
        if self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                logger.warning("%s (pid %d) still running after %s; escalating", self.name, self.proc.pid, sig.name)
        # Children that outlived the leader are in the same group: clean them up too.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        logger.info("%s: stopped (exit code %s)", self.name, self.proc.returncode)
