"""Shards on Ray: each shard a Ray task in its own worker process, holding one ONNX Runtime session
and one gradient source with `threads` threads (`sharded.run_shard`, as in one process).

Ray is optional (`pip install "onnx-gdws[ray]"`) and imported only inside these functions.
`connect(address)` joins a cluster: None starts or finds a local instance the way `ray.init()`
does (RAY_ADDRESS first), "auto" joins a running `ray start` instance, "HOST:PORT" that
cluster's GCS. An address that does not answer fails within `CONNECT_TIMEOUT_S` seconds with one
GDWSError, before `ray.init` could hang on it. A worker that dies, or a shard that raises an
unexpected error, is re-run up to `max_retries` times; results come back to the driver, which
alone writes the work directory, so no sample is lost or counted twice. Nothing is timed here
for latency: workers share machines.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

from gdws_onnx.errors import GDWSError
from gdws_onnx.eval.results import EvalSettings
from gdws_onnx.eval.sharded import ShardFailure, ShardJob, ShardResult, run_shard

RAY_EXTRA = 'pip install "onnx-gdws[ray]"'
CONNECT_TIMEOUT_S = 3.0
DEFAULT_GCS_PORT = 6379
RAY_CLIENT_PORT = 10001


def import_ray():
    """The ray module; GDWSError naming the install when it is missing."""
    try:
        import ray
    except ImportError:
        raise GDWSError(f"Ray is not installed: {RAY_EXTRA}") from None
    return ray


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """GDWSError unless something accepts a TCP connection at a Ray `address` ("HOST[:PORT]", or
    "ray://HOST[:PORT]" for Ray Client) within `timeout` seconds. "auto" and "local" are not
    checked here (ray.init finds out quickly)."""
    if address in ("auto", "local"):
        return
    client = address.startswith("ray://")
    hostport = address[len("ray://"):] if client else address
    host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "")
    try:
        port_n = int(port) if port else (RAY_CLIENT_PORT if client else DEFAULT_GCS_PORT)
    except ValueError:
        raise GDWSError(f"the Ray address {address!r} is not HOST:PORT") from None
    try:
        with socket.create_connection((host or "127.0.0.1", port_n), timeout=timeout):
            pass
    except OSError as e:
        raise GDWSError(f"cannot reach the Ray cluster at {address} ({e}); start one with `ray start --head` "
                        "or give another address (RAY_ADDRESS is read when no address is given)") from None


def connect(address: str | None = None, num_cpus: int | None = None):
    """Join (or start) a Ray instance and return the ray module. None: RAY_ADDRESS when set, else
    a running local instance or a new one (`num_cpus` caps a new one). Already connected: kept."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    target = address or os.environ.get("RAY_ADDRESS") or None
    if target:
        check_reachable(target)
    try:
        if target:
            ray.init(address=target, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise GDWSError(f"cannot connect to Ray at {target or 'a local instance'}: {e}") from None
    return ray


def _ray_error_text(err: Exception) -> str:
    """The worker's own error of a RayTaskError (its cause), else the error itself, on one line."""
    cause = getattr(err, "cause", None)
    text = f"{type(cause).__name__}: {cause}" if cause is not None else f"{type(err).__name__}: {err}"
    return text.strip().splitlines()[-1] if text.strip() else type(err).__name__


@dataclass
class RayRunner:
    """Shards as Ray tasks: `threads` ONNX Runtime / gradient threads and as many CPUs per task,
    `max_retries` re-runs of a shard whose worker died or which raised unexpectedly.
    `shard_fn` is the function each task runs (`run_shard`'s signature)."""

    address: str | None = None
    threads: int = 1
    max_retries: int = 3
    num_cpus: int | None = None  # of a local instance this runner starts
    shard_fn: Callable = run_shard
    name: str = "ray"

    def run(self, model_blob: bytes, model_path: str, settings: EvalSettings, jobs: list[ShardJob],
            done: Callable[[ShardResult], None]) -> None:
        ray = connect(self.address, self.num_cpus)
        task = ray.remote(num_cpus=self.threads, max_retries=self.max_retries,
                          retry_exceptions=True)(self.shard_fn)
        blob = ray.put(model_blob)
        pending = {task.remote(blob, model_path, settings, job.shard, job.x, job.y, self.threads): job
                   for job in jobs}
        failures: list[ShardFailure] = []
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready[0])
            try:
                out = ray.get(ready[0])
            except Exception as e:  # retries spent: the task's error, or the worker's death
                out = ShardFailure(job.shard, False, _ray_error_text(e))
            if isinstance(out, ShardFailure):
                failures.append(out)
            else:
                done(out)
        if failures:  # every other shard has finished and been handed to `done`
            first = min(failures, key=lambda f: f.shard.index)
            if len(failures) > 1:
                first.message += f" (and {len(failures) - 1} more shard(s) failed)"
            first.raise_it()
