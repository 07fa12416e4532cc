"""A cluster on one machine: N copies of a command, each a worker with its own TF_CONFIG on
free loopback ports, their output prefixed by task index (`experiment.py --local_workers=N`).

This is how TensorFlow's multi-worker tutorials try a cluster set-up: one process per task
(https://www.tensorflow.org/tutorials/distribute/multi_worker_with_ctl).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO

# After a worker fails, how long the others get to stop on their own (a lost peer stops
# them within TensorFlow's 10 s heartbeat timeout) before they are killed.
GRACE_SECS = 30.0
PROXY_VARIABLES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy",
                   "ALL_PROXY")


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on the loopback interface now.

    The sockets stay bound until all ports are chosen, so the ports are distinct; another
    program may still take one before a worker binds it (the worker then fails to start
    its server, and a rerun picks new ports).
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("localhost", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def tf_configs(ports: Sequence[int]) -> list[str]:
    """The TF_CONFIG of each worker of a cluster with one worker task per loopback port."""
    cluster = {"worker": [f"localhost:{port}" for port in ports]}
    return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            for index in range(len(ports))]


def worker_environment(tf_config: str, base: dict | None = None) -> dict:
    """`base` (default os.environ) with TF_CONFIG set and loopback taken out of any proxy.

    A proxy in the environment can break gRPC even between local processes
    (tensorflow/tensorflow#24887).
    """
    env = {name: value for name, value in (os.environ if base is None else base).items()
           if name not in PROXY_VARIABLES}
    for name in ("no_proxy", "NO_PROXY"):
        env[name] = ",".join(filter(None, [env.get(name), "localhost", "127.0.0.1"]))
    env["TF_CONFIG"] = tf_config
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the prefixing thread as they are printed
    return env


def _copy_prefixed(stream: TextIO, prefix: str, out: TextIO, lock: threading.Lock) -> None:
    # Text mode reads '\r' (progress bars) as a line end too.
    for line in stream:
        with lock:
            out.write(f"{prefix}{line.rstrip(chr(10))}\n")
            out.flush()


def _exit_status(returncode: int) -> int:
    """A process's exit status as a shell reports it (128 + N when killed by signal N)."""
    return 128 - returncode if returncode < 0 else returncode


def run_workers(command: Sequence[str], num_workers: int, out: TextIO = sys.stdout,
                grace_secs: float = GRACE_SECS) -> int:
    """Runs `command` as workers 0..num_workers-1 of a loopback cluster until all stop.

    Each line a worker prints (stdout and stderr) is copied to `out` as '[worker I] LINE'.
    SIGTERM and SIGINT sent to this process are passed on to every worker. When a worker
    fails, the others get `grace_secs` to stop on their own, then are killed.

    Returns 0 when every worker succeeded, else the first failure's exit status
    (128 + N for a worker killed by signal N).
    """
    if num_workers < 1:
        raise ValueError(f"num_workers={num_workers}: expected >= 1")
    lock = threading.Lock()
    processes, threads = [], []
    for index, tf_config in enumerate(tf_configs(free_ports(num_workers))):
        process = subprocess.Popen(list(command), env=worker_environment(tf_config),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   errors="replace")
        thread = threading.Thread(target=_copy_prefixed, daemon=True,
                                  args=(process.stdout, f"[worker {index}] ", out, lock))
        thread.start()
        processes.append(process)
        threads.append(thread)

    def forward(signum, frame):
        del frame
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    status, kill_at = 0, None
    try:
        while [process.poll() for process in processes].count(None):  # polls every one
            if kill_at is not None and time.monotonic() >= kill_at:
                for process in processes:
                    if process.poll() is None:
                        process.kill()
                with lock:
                    out.write(f"[local_workers] killed the workers still running "
                              f"{grace_secs:g} s after a worker failed\n")
                kill_at = None
            time.sleep(0.1)
            if status == 0:
                failed = [p.returncode for p in processes if p.returncode not in (None, 0)]
                if failed:
                    status, kill_at = _exit_status(failed[0]), time.monotonic() + grace_secs
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        for thread in threads:
            thread.join()
    if status == 0:  # a failure in the last poll interval
        status = next((_exit_status(p.returncode) for p in processes if p.returncode), 0)
    return status
