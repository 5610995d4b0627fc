"""Real ipykernel kernels for runner sessions, driven through jupyter_client, and a warm pool.

Each kernel gets a directory of its own under the runner's work root::

    <root>/<kernel id>/            mode 0700
        scratch/                   the kernel's working directory, empty at start
    <private root>/<kernel id>/    mode 0700: connection file, IPC sockets, exchange files
    <private root>/<kernel id>-cache/   mode 0700: the large values its session holds

The private root is memory-backed where the system has one (``/dev/shm`` on
Linux), so values move between the runner and its kernel at memory speed;
otherwise the private and cache directories are ``<root>/<kernel id>/private``
and ``<root>/<kernel id>/cache``. Under ``--sandbox bwrap`` the kernel sees its
scratch and private directories writable and its cache read-only, and no
other kernel's.

The connection file (which holds the key that signs messages to the kernel)
is deleted as soon as the kernel is up: the runner keeps the key in memory.

Kernels talk to the runner over IPC sockets in ``private/`` (TCP on Windows),
so no port is opened that other local users could reach. Both directories are
removed when the kernel is shut down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import zmq
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from traitlets import Dict, List, Unicode

from didomagic.protocol import COMM_TYPES, OUTPUT_TYPES, Status
from runner.errortext import cell_error
from runner.limits import format_size
from runner.sandbox import QUOTA_POLL, Box, Sandbox, runner_pythonpath

logger = logging.getLogger("didomagic.runner")

START_TIMEOUT = 60.0
"""Seconds a kernel may take to start and load the agent."""

INTERRUPT_GRACE = 10.0
"""Seconds an interrupted cell may take to stop before its kernel is restarted."""

DEATH_POLL = 0.2
"""Seconds between checks that a busy kernel's process is still alive."""

OutputCallback = Callable[[str, dict[str, Any]], None]


class _SpecManager(KernelSpecManager):
    """Always the runner's own Python with ipykernel, whatever kernelspecs are installed."""

    extra_env = Dict(help="environment variables added for every kernel")
    prefix = List(Unicode(), help="the command the kernel's own command line is run under")
    interrupt_mode = Unicode("signal", help="signal, or message where signals do not reach")

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return KernelSpec(
            argv=[
                *self.prefix,
                sys.executable,
                "-m",
                "runner.kernel_main",  # ipykernel's, with an IOPub that never drops
                "-f",
                "{connection_file}",
                # Runner kernels must not write into the runner user's IPython history.
                "--HistoryManager.enabled=False",
                "--IPythonKernel._execute_sleep=0",
            ],
            display_name="didomagic runner kernel",
            language="python",
            interrupt_mode=self.interrupt_mode,
            env={
                **self.extra_env,
                "PYTHONPATH": runner_pythonpath(),
                "PYDEVD_DISABLE_FILE_VALIDATION": "1",
            },
        )


@dataclass(frozen=True)
class CellOutcome:
    """How a cell ended in the kernel, with the error details when it did not succeed."""

    status: Status
    error: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    """The metadata of the cell's ``execute_reply`` (what the agent reports; untrusted)."""


class Kernel:
    """One ipykernel process with its private and scratch directories."""

    def __init__(
        self,
        root: Path,
        env: dict[str, str] | None = None,
        private_root: Path | None = None,
        sandbox: Sandbox | None = None,
    ) -> None:
        self.id = secrets.token_hex(6)
        self.env = dict(env or {})
        self.sandbox = sandbox
        self.box: Box | None = None
        self.home = root / self.id
        self.private = (private_root / self.id) if private_root else self.home / "private"
        self.scratch = self.home / "scratch"
        self.exchange = self.private / "exchange"
        self.cache = (private_root / f"{self.id}-cache") if private_root else self.home / "cache"
        """Where the session's large values are kept, readable by the kernel only."""
        self._km: AsyncKernelManager | None = None
        self._kc: Any = None
        self._iopub_task: asyncio.Task[None] | None = None
        self._listeners: dict[str, tuple[OutputCallback, asyncio.Event]] = {}
        self.side: Callable[[dict[str, Any]], None] | None = None
        """Takes comm messages and the iopub messages no cell claims (runner.comms)."""

    async def start(self) -> None:
        """Start the kernel process in its scratch directory and load the agent."""
        self.home.mkdir(mode=0o700)
        self.private.mkdir(mode=0o700, parents=True)
        self.exchange.mkdir(mode=0o700)
        self.scratch.mkdir(mode=0o700)
        self.cache.mkdir(mode=0o700)
        ipc = os.name == "posix"
        specs = _SpecManager(extra_env=self.env)
        if self.sandbox is not None:
            self.box = self.sandbox.box(self.id, self.scratch, self.private, self.cache)
            specs.prefix = self.box.prefix
            specs.interrupt_mode = self.box.interrupt_mode
            specs.extra_env = {**self.env, **self.box.env}
        self._km = AsyncKernelManager(
            kernel_name="didomagic",
            kernel_spec_manager=specs,
            transport="ipc" if ipc else "tcp",
            ip=str(self.private / "k") if ipc else "127.0.0.1",
            connection_file=str(self.private / "kernel.json"),
        )
        await self._km.start_kernel(cwd=str(self.scratch))
        self._kc = self._km.client()
        self._kc.context.setsockopt(zmq.RCVHWM, 0)  # every IOPub message (runner.kernel_main)
        self._kc.start_channels()
        await self._kc.wait_for_ready(timeout=START_TIMEOUT)
        # The kernel has read it; its key stays in this process only (see the module docstring).
        Path(self._km.connection_file).unlink(missing_ok=True)
        self._iopub_task = asyncio.create_task(self._read_iopub())
        reply = await self._run(
            f"__import__('runner.agent').agent.install({str(self.exchange)!r})", silent=True
        )
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"agent did not load: {reply['content'].get('evalue')}")
        logger.debug("kernel %s ready in %s", self.id, self.scratch)

    async def _read_iopub(self) -> None:
        while True:
            msg = await self._kc.get_iopub_msg()
            parent = msg.get("parent_header", {}).get("msg_id")
            listener = self._listeners.get(parent)
            msg_type = msg["header"]["msg_type"]
            if listener is None or msg_type in COMM_TYPES:
                if self.side is not None:
                    self.side(msg)
                continue
            on_output, idle = listener
            if msg_type in OUTPUT_TYPES:
                on_output(msg_type, msg["content"])
            elif msg_type == "status" and msg["content"].get("execution_state") == "idle":
                idle.set()

    def send_shell(
        self,
        msg_type: str,
        content: dict[str, Any],
        metadata: dict[str, Any],
        buffers: list[bytes],
        msg_id: str,
    ) -> None:
        """Send one message (a client's comm message) on the shell channel under ``msg_id``."""
        msg = self._kc.session.msg(msg_type, content, metadata=metadata)
        msg["header"]["msg_id"] = msg["msg_id"] = msg_id
        self._kc.session.send(self._kc.shell_channel.socket, msg, buffers=buffers)

    async def _run(
        self,
        code: str,
        *,
        silent: bool = False,
        on_output: OutputCallback | None = None,
        msg_id: str = "",
        metadata: dict[str, Any] | None = None,
        buffers: list[bytes] | None = None,
    ) -> dict[str, Any]:
        """Execute ``code`` (as request ``msg_id`` if given); return its reply once idle.

        ``metadata`` and ``buffers`` go with the request (the agent reads the cell's
        description there).
        """
        content = {
            "code": code,
            "silent": silent,
            "store_history": not silent,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": False,
        }
        msg = self._kc.session.msg("execute_request", content, metadata=metadata)
        if msg_id:
            msg["header"]["msg_id"] = msg["msg_id"] = msg_id
        msg_id = msg["header"]["msg_id"]
        self._kc.session.send(self._kc.shell_channel.socket, msg, buffers=buffers)
        idle = asyncio.Event()
        self._listeners[msg_id] = (on_output or (lambda t, c: None), idle)
        try:
            while True:
                reply = await self._kc.get_shell_msg()
                if reply.get("parent_header", {}).get("msg_id") == msg_id:
                    break
            await idle.wait()
            return dict(reply)
        finally:
            self._listeners.pop(msg_id, None)

    def path_inside(self, path: Path) -> str:
        """Where this kernel sees a runner path (a sandbox may show it elsewhere)."""
        return self.box.path_inside(path) if self.box is not None else str(path)

    async def run_silently(self, code: str) -> dict[str, Any]:
        """Run ``code`` outside any cell (no history, no hooks); return the reply's content."""
        reply = await self._run(code, silent=True)
        return dict(reply["content"])

    async def _died(self) -> str | None:
        """Wait for the kernel process to end; return the limit that killed it, if one did."""
        assert self._km is not None
        while await self._km.is_alive():
            await asyncio.sleep(DEATH_POLL)
        if self.box is None:
            return None
        process = getattr(self._km.provisioner, "process", None)
        returncode = process.poll() if process is not None else None
        return self.box.death_reason(returncode)

    async def _over_quota(self) -> str:
        """Return once the scratch directory holds more than the disk quota."""
        assert self.box is not None and self.box.limits.disk_quota is not None
        quota = self.box.limits.disk_quota
        while True:
            used = await asyncio.to_thread(self.box.scratch_bytes)
            if used > quota:
                return (
                    f"kernel stopped: disk quota {format_size(quota)} exceeded (its scratch "
                    f"directory held {format_size(used)}); the next cell starts in a fresh "
                    "kernel with an empty scratch directory"
                )
            await asyncio.sleep(QUOTA_POLL)

    async def execute(
        self,
        code: str,
        on_output: OutputCallback,
        timeout: float | None = None,
        limit_name: str = "its timeout",
        msg_id: str = "",
        metadata: dict[str, Any] | None = None,
        buffers: list[bytes] | None = None,
    ) -> CellOutcome:
        """Run a cell, streaming its outputs; enforce ``timeout`` and the session's limits.

        ``msg_id`` (the notebook's request id) is the cell's request id in the kernel;
        ``metadata`` and ``buffers`` go with its request.
        """
        published: list[dict[str, Any]] = []  # the errors the kernel showed, to name a failure

        def forward(msg_type: str, content: dict[str, Any]) -> None:
            if msg_type == "error":
                published.append(content)
            on_output(msg_type, content)

        run = asyncio.ensure_future(
            self._run(code, on_output=forward, msg_id=msg_id, metadata=metadata, buffers=buffers)
        )
        death = asyncio.ensure_future(self._died())
        watched = {run, death}
        quota: asyncio.Future[str] | None = None
        if self.box is not None and self.box.limits.disk_quota is not None:
            quota = asyncio.ensure_future(self._over_quota())
            watched.add(quota)
        try:
            done, _ = await asyncio.wait(
                watched, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if quota is not None and quota in done and run not in done:
                logger.info("kernel %s: over its disk quota; stopping it", self.id)
                await self.kill()
                return CellOutcome(Status.KERNEL_DIED, {"message": quota.result()})
            timed_out = not done
            if timed_out:
                logger.info(
                    "kernel %s: cell exceeded its %ss timeout; interrupting", self.id, timeout
                )
                await self.interrupt()
                done, _ = await asyncio.wait(
                    {run, death}, timeout=INTERRUPT_GRACE, return_when=asyncio.FIRST_COMPLETED
                )
            if run in done:
                reply = run.result()
                outcome = self._outcome(
                    reply["content"],
                    timed_out,
                    timeout,
                    limit_name,
                    published[-1] if published else None,
                )
                return replace(outcome, metadata=dict(reply.get("metadata") or {}))
            if timed_out and death not in done:
                return CellOutcome(
                    Status.KERNEL_DIED,
                    {
                        "message": f"the cell ran longer than {limit_name} of {timeout:g} s "
                        f"and did not stop within {INTERRUPT_GRACE:g} s of an interrupt, so its "
                        "kernel was stopped; the session's state is lost"
                    },
                )
            reason = death.result() if death.done() else None
            if reason is not None:
                logger.info("kernel %s: %s", self.id, reason)
            return CellOutcome(
                Status.KERNEL_DIED,
                {
                    "message": (
                        reason + "; "
                        if reason
                        else "the runner's kernel died while "
                        "running the cell (for example os._exit, a crash in native code, or "
                        "running out of memory); "
                    )
                    + "the next cell starts in a fresh kernel, so earlier remote state is lost"
                },
            )
        finally:
            for task in watched:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    def _outcome(
        self,
        content: dict[str, Any],
        timed_out: bool,
        timeout: float | None,
        limit_name: str,
        published: dict[str, Any] | None = None,
    ) -> CellOutcome:
        if timed_out:
            return CellOutcome(
                Status.TIMEOUT,
                {
                    "message": f"the cell ran longer than {limit_name} of {timeout:g} s "
                    "and was interrupted; the session's state is kept"
                },
            )
        if content["status"] == "ok":
            return CellOutcome(Status.OK)
        error = cell_error(content, published)
        ename, evalue, traceback = error["ename"], error["evalue"], error["traceback"]
        note = self.box.error_note(ename, evalue) if self.box is not None else None
        if note is not None:
            evalue = f"{evalue} ({note})"
            traceback.append(f"didomagic: {note}")
        return CellOutcome(Status.ERROR, {"ename": ename, "evalue": evalue, "traceback": traceback})

    async def kill(self) -> None:
        """Stop the kernel process at once (its directories stay until :meth:`shutdown`)."""
        if self._km is not None and await self._km.is_alive():
            await self._km.shutdown_kernel(now=True)

    async def interrupt(self) -> None:
        """Interrupt the running cell (SIGINT, like the notebook's stop button)."""
        if self._km is not None and await self._km.is_alive():
            await self._km.interrupt_kernel()

    async def shutdown(self) -> None:
        """Stop the kernel process and remove both of its directories."""
        if self._iopub_task is not None:
            self._iopub_task.cancel()
            with contextlib.suppress(BaseException):
                await self._iopub_task
        if self._kc is not None:
            self._kc.stop_channels()
        if self._km is not None:
            with contextlib.suppress(Exception):
                await self._km.shutdown_kernel(now=True)
        if self.box is not None:
            self.box.remove()
        shutil.rmtree(self.home, ignore_errors=True)
        shutil.rmtree(self.private, ignore_errors=True)
        shutil.rmtree(self.cache, ignore_errors=True)
        logger.debug("kernel %s shut down", self.id)


class KernelPool:
    """Keeps ``size`` kernels started ahead, so a new session does not wait for one."""

    def __init__(
        self,
        root: Path,
        size: int,
        env: dict[str, str] | None = None,
        private_root: Path | None = None,
        sandbox: Sandbox | None = None,
    ) -> None:
        self.root = root
        self.sandbox = sandbox
        """The limits every kernel starts under (None: unconfined)."""
        self.private_root = private_root
        """Where kernels' IPC sockets and exchange files go (memory-backed when possible)."""
        self.size = size
        self.env = dict(env or {})
        self._warm: list[Kernel] = []
        self._starting: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def ready(self) -> int:
        """Kernels started and waiting for a session."""
        return len(self._warm)

    def fill(self) -> None:
        """Start kernels in the background until ``size`` are warm or starting."""
        while not self._closed and len(self._warm) + len(self._starting) < self.size:
            task = asyncio.create_task(self._start_one())
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    async def _start_one(self) -> None:
        kernel = Kernel(self.root, self.env, self.private_root, self.sandbox)
        try:
            await kernel.start()
        except asyncio.CancelledError:
            await kernel.shutdown()
            raise
        except Exception:
            logger.exception("a warm kernel failed to start")
            await kernel.shutdown()
            return
        if self._closed:
            await kernel.shutdown()
        else:
            self._warm.append(kernel)

    async def take(self) -> Kernel:
        """A started kernel: a warm one if there is one, else one started now."""
        if self._warm:
            kernel = self._warm.pop(0)
        else:
            kernel = Kernel(self.root, self.env, self.private_root, self.sandbox)
            try:
                await kernel.start()
            except BaseException:
                await kernel.shutdown()
                raise
        self.fill()
        return kernel

    async def close(self) -> None:
        """Stop every warm kernel and any still starting."""
        self._closed = True
        for task in list(self._starting):
            task.cancel()
        await asyncio.gather(*self._starting, return_exceptions=True)
        await asyncio.gather(*(k.shutdown() for k in self._warm))
        self._warm.clear()
