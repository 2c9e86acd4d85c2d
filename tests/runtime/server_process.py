"""`inferforge serve` in a subprocess for tests: start on a free port, wait for /health, stop with Ctrl-C."""

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

DEADLINE_S = 180        # for polling only: generous on 2 shared CPU cores; nothing asserts a duration
NAME = "tiny-llama"


def start_server(model, out_dir, *args, interpret_kernels: bool = True):
    """`inferforge serve` on a free port (--port 0), output to files (a full pipe would block the server).
    `interpret_kernels=False` drops TRITON_INTERPRET: the server then runs the PyTorch reference ops, as on
    a user's CPU, tens of times faster than Triton's interpreter."""
    stdout, stderr = out_dir / "serve.out", out_dir / "serve.err"
    env = dict(os.environ)
    if not interpret_kernels:
        env.pop("TRITON_INTERPRET", None)
    proc = subprocess.Popen([sys.executable, "-m", "inferforge", "serve", str(model), "--port", "0", *args],
                            stdout=stdout.open("w"), stderr=stderr.open("w"), env=env)
    deadline = time.monotonic() + DEADLINE_S
    while True:
        match = re.search(r"(http://127\.0\.0\.1:\d+)/v1", stdout.read_text())
        if match:
            url = match.group(1)
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, url
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start (exit {proc.poll()}):\n{stderr.read_text()[-3000:]}")
        time.sleep(0.2)


def stop_server(proc) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
