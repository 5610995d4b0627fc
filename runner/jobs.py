"""Detached jobs: the ``/jobs`` endpoint and the scheduler that runs stored jobs.

A job holder (a mediator, or a runner for its own jobs) accepts submissions on
the jobs channel, stores them (:mod:`runner.jobstore`) before it answers, and
runs queued jobs, oldest first, whenever a matching runner has a free slot. To
run one it opens an ordinary session with that runner as a client — through a
relay for a mediator, on its own port for a runner — sends the stored code
and values, and stores every output and returned value as they come.

The run of a job is tied to the holder's connection: if the runner is lost
(killed, unreachable) while the job runs, the job is queued again while it has
``retries`` left, else it fails with reason "runner lost". A holder that
restarts finds jobs it was running in state ``running``: it treats them the
same way, so no job silently disappears and none is run twice unasked.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, TypeVar

from websockets.exceptions import ConnectionClosed

from didomagic import matching, serialize
from didomagic.client import RunnerConnection
from didomagic.errors import ConnectError, ConnectionLost, ProtocolError, VersionMismatch
from didomagic.protocol import (
    CLIENT_HEADER,
    PROTOCOL_VERSION,
    CancelJob,
    Channel,
    DeleteJob,
    ErrorCode,
    Execute,
    Hello,
    JobData,
    JobList,
    ListJobs,
    Output,
    Pull,
    Role,
    Session,
    State,
    Status,
    Submit,
    ValueHeader,
    Welcome,
    check_compatible,
    cloudpickle_version,
    expect,
    python_version,
)
from runner import admission, jobstore, safefiles
from runner.admission import RequestLimits
from runner.jobstore import JobRecord, JobStore
from runner.wire import IDLE_CLOSE_REASON, refuse, wait_set

T = TypeVar("T")

logger = logging.getLogger("didomagic.detached")

Opener = Callable[[JobRecord], Awaitable[RunnerConnection | None]]
"""Opens a session for a job on a matching runner with a free slot, or returns None."""

SCHEDULE_EVERY = 1.0
"""Seconds between looks at the queue when nothing wakes the scheduler."""

HELLO_TIMEOUT = 10.0
"""Seconds a client has to say hello on the jobs endpoint."""

JOBS_PATH = "jobs"
"""The endpoint of the jobs channel, on runners and mediators."""

MAX_LIST_IDS = 1000
"""The most job ids one list-jobs request may name."""


def _in_file(directory: Path, i: int) -> Path:
    return directory / f"in-{i}.bin"


def _out_file(directory: Path, i: int) -> Path:
    return directory / f"out-{i}.bin"


class JobService:
    """Stores, runs and serves the jobs of one holder.

    Every use of the store (SQLite and the blob files) runs on one worker
    thread, in order, so the event loop never waits on the disk or a lock.
    Submissions are held to ``limits`` as cells are; a jobs connection with no
    request for ``idle_timeout`` seconds is closed.
    """

    def __init__(
        self,
        store: JobStore,
        opener: Opener,
        holder: str,
        ttl: float | None = None,
        limits: RequestLimits | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        self.store = store
        self.opener = opener
        self.holder = holder
        self.ttl = ttl
        self.limits = limits or RequestLimits()
        self.idle_timeout = idle_timeout
        self.wake = asyncio.Event()
        self._running: dict[str, tuple[asyncio.Task[None], RunnerConnection]] = {}
        self._scheduler: asyncio.Task[None] | None = None
        self._stopping = False
        self._disk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="didomagic-jobstore")

    async def _db(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``call`` (a store method or other disk work) on the store's thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._disk, functools.partial(call, *args, **kwargs))

    # -- life cycle

    async def records(self) -> list[JobRecord]:
        """Every job's record (read on the store's worker thread), for the status page."""
        return await self._db(self.store.all)

    async def recover(self) -> None:
        """Settle jobs a previous run of this holder left running (it stopped meanwhile)."""
        for job in await self._db(self.store.all, jobstore.RUNNING):
            await self._runner_lost(job, f"{self.holder} stopped while the job ran on {job.runner}")

    def start(self) -> None:
        """Recover, then run queued jobs in the background."""
        self._scheduler = asyncio.create_task(self._schedule())

    async def stop(self) -> None:
        """Stop scheduling and stop running jobs (they are settled at the next start)."""
        self._stopping = True
        if self._scheduler is not None:
            self.wake.set()
            self._scheduler.cancel()
            await asyncio.gather(self._scheduler, return_exceptions=True)
        tasks = [task for task, _ in self._running.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._db(self.store.close)
        self._disk.shutdown()

    # -- scheduling

    async def _schedule(self) -> None:
        await self.recover()
        while not self._stopping:
            await wait_set(self.wake, SCHEDULE_EVERY)
            self.wake.clear()
            if self._stopping:
                return
            if self.ttl is not None:
                for job_id in await self._db(self.store.expire, self.ttl):
                    logger.info("job %s expired (--job-ttl %gs)", job_id, self.ttl)
            for job in await self._db(self.store.all, jobstore.QUEUED):
                if job.id in self._running:
                    continue
                try:
                    connection = await self.opener(job)
                except ConnectError as exc:
                    logger.info("job %s waits: %s", job.id, exc)
                    connection = None
                except Exception:
                    logger.exception("job %s: could not open a session", job.id)
                    connection = None
                if connection is None:
                    waiting = "waiting for a free " + (
                        f"runner with {matching.requirement_text(job.tags, job.os)}"
                        if job.tags or job.os
                        else "runner"
                    )
                    if job.reason != waiting and not job.reason.startswith("runner lost"):
                        await self._db(self.store.update, job.id, reason=waiting)
                    continue
                task = asyncio.create_task(self._run_safely(job, connection))
                self._running[job.id] = (task, connection)
                task.add_done_callback(lambda _, i=job.id: self._done(i))

    def _done(self, job_id: str) -> None:
        self._running.pop(job_id, None)
        self.wake.set()

    async def _run_safely(self, job: JobRecord, connection: RunnerConnection) -> None:
        try:
            await self._run(job, connection)
        except Exception as exc:
            logger.exception("job %s: internal error", job.id)
            reason = f"internal error in {self.holder}: {exc}"
            await self._db(self.store.finish, job.id, jobstore.FAILED, reason)

    async def _run(self, job: JobRecord, connection: RunnerConnection) -> None:
        runner = connection.runner_name
        record = await self._db(self.store.start, job.id, runner)
        if record is None or record.state != jobstore.RUNNING:
            await connection.close()
            return
        logger.info("job %s (%s) running on %s", job.id, job.name or "unnamed", runner)
        directory = self.store.blob_dir(job.id)
        request = await self._db(_read_request, directory)
        values = _headers(request["values"])
        outputs: list[dict[str, Any]] = []

        def collect(output: Output) -> None:
            outputs.append({"msg_type": output.msg_type, "content": output.content})

        try:
            parts = [
                serialize.read_file(_in_file(directory, i), v.sizes) for i, v in enumerate(values)
            ]
            result, buffers = await connection.execute(
                Execute(
                    cell=job.id,
                    code=request["code"],
                    values=values,
                    fetch=tuple(request["fetch"]),
                    deletes=tuple(request["deletes"]),
                    timeout=job.timeout,
                    packages=tuple(request.get("packages", ())),
                ),
                parts,
                collect,
            )
        except (ConnectionLost, ProtocolError) as exc:
            current = await self._db(self.store.get, job.id)
            if current is not None and current.state == jobstore.RUNNING:
                await self._runner_lost(current, f"{runner} went away while the job ran ({exc})")
            return
        finally:
            with contextlib.suppress(Exception):
                await connection.close()
        for i, parts_of_value in enumerate(buffers):
            await self._db(
                serialize.write_values,
                _out_file(directory, i),
                [[memoryview(p) for p in parts_of_value]],
            )
        await self._db(
            self.store.save_result,
            job.id,
            outputs,
            {
                "status": result.status.value,
                "values": _described(result.values),
                "deleted": list(result.deleted),
                "failures": result.failures,
                "error": result.error,
            },
        )
        state, reason = _final_state(result.status, result.error)
        finished = await self._db(self.store.finish, job.id, state, reason)
        logger.info(
            "job %s %s on %s%s",
            job.id,
            finished.state if finished else state,
            runner,
            f": {reason}" if reason else "",
        )

    async def _runner_lost(self, job: JobRecord, why: str) -> None:
        if job.attempts <= job.retries:
            await self._db(
                self.store.update,
                job.id,
                state=jobstore.QUEUED,
                reason=f"runner lost: {why}; queued again (retry {job.attempts} of {job.retries})",
            )
            logger.warning("job %s: runner lost (%s); queued again", job.id, why)
            self.wake.set()
        else:
            await self._db(self.store.finish, job.id, jobstore.FAILED, f"runner lost: {why}")
            logger.warning("job %s failed: runner lost (%s)", job.id, why)

    # -- requests

    async def cancel(self, job_id: str) -> JobRecord | None:
        """Cancel a queued or running job (a running one's session is closed at once)."""
        job = await self._db(self.store.get, job_id)
        if job is None or job.state in jobstore.FINISHED:
            return job
        job = await self._db(self.store.finish, job_id, jobstore.CANCELLED, "cancelled on request")
        running = self._running.get(job_id)
        if running is not None:
            # Closing the session makes the runner interrupt the cell and stop its kernel.
            await running[1].close()
        logger.info("job %s cancelled", job_id)
        return job

    async def serve(self, ws: Any, peer: str) -> None:
        """Serve one client connection on the jobs endpoint until it closes."""
        session = Session(Role.RUNNER, Channel.JOBS)
        owner = owner_of(ws)
        try:
            text = await asyncio.wait_for(ws.recv(), HELLO_TIMEOUT)
            hello = expect(session.receive(text), Hello)
            check_compatible(
                protocol=hello.protocol,
                python=hello.python,
                cloudpickle=hello.cloudpickle,
                side="client",
            )
            await ws.send(
                session.send(
                    Welcome(
                        PROTOCOL_VERSION,
                        python_version(),
                        cloudpickle_version(),
                        session="",
                        runner={"name": self.holder},
                    )
                )
            )
            await self._requests(ws, session, owner)
        except VersionMismatch as exc:
            await refuse(ws, ErrorCode.VERSION, str(exc))
        except _NotFound as exc:
            await refuse(ws, ErrorCode.NOT_FOUND, str(exc))
        except _NotReady as exc:
            await refuse(ws, ErrorCode.NOT_READY, str(exc))
        except _BadRequest as exc:
            logger.warning("jobs connection from %s: refused: %s", peer, exc)
            await refuse(ws, ErrorCode.BAD_REQUEST, str(exc))
        except ProtocolError as exc:
            logger.warning("jobs connection from %s: protocol error: %s", peer, exc)
            await refuse(ws, ErrorCode.PROTOCOL, f"Protocol error: {exc}")
        except (ConnectionClosed, TimeoutError):
            pass

    async def _requests(self, ws: Any, session: Session, owner: str) -> None:
        upload: _Upload | None = None
        try:
            while True:
                frame = await self._next_frame(ws, upload)
                if frame is None:
                    return
                if isinstance(frame, bytes):
                    chunks = session.receive_binary(frame)  # refuses one not expected now
                    if upload is None:
                        raise ProtocolError("binary frame outside a submission")
                    for chunk in chunks:
                        upload.write(chunk.value, chunk.data)
                    if session.state is State.WAIT:
                        await self._submitted(ws, session, upload, owner)
                        upload = None
                    continue
                message = session.receive(frame)
                if isinstance(message, Submit):
                    upload = await self._accept_submission(message)
                    if session.state is State.WAIT:
                        await self._submitted(ws, session, upload, owner)
                        upload = None
                elif isinstance(message, ListJobs):
                    await ws.send(session.send(JobList(await self._listed(message, owner))))
                elif isinstance(message, CancelJob):
                    job = await self._known(message.job, owner)
                    cancelled = await self.cancel(job.id) or job
                    await ws.send(session.send(JobList((cancelled.public(),))))
                elif isinstance(message, DeleteJob):
                    job = await self._known(message.job, owner)
                    await self.cancel(job.id)
                    await self._db(self.store.delete, job.id)
                    logger.info("job %s deleted", job.id)
                    await ws.send(session.send(JobList(())))
                elif isinstance(message, Pull):
                    await self._pull(ws, session, await self._known(message.job, owner))
        finally:
            if upload is not None:  # the submission never completed: nothing of it stays
                upload.discard()

    async def _next_frame(self, ws: Any, upload: _Upload | None) -> str | bytes | None:
        """The next frame; None once the connection idled past its timeout (then closed).

        While a submission's values arrive, the wait is ``--upload-timeout``;
        between requests, ``--idle-timeout`` (if set).
        """
        limit = self.limits.upload_timeout if upload is not None else self.idle_timeout
        try:
            async with asyncio.timeout(limit):
                return await ws.recv()  # type: ignore[no-any-return]
        except TimeoutError:
            if upload is not None:
                raise _BadRequest(admission.stalled(self.limits, "submission")) from None
            await ws.close(1000, IDLE_CLOSE_REASON)
            return None

    async def _accept_submission(self, message: Submit) -> _Upload:
        if message.retries < 0:
            raise ProtocolError("submit.retries must be 0 or more")
        why = admission.refusal(message.values, self.limits, "submission")
        if why is not None:
            raise _BadRequest(why)
        if any(v.cached for v in message.values):
            raise ProtocolError(
                "a submission cannot declare values cached: a job holder keeps no values "
                "between submissions; send every value"
            )
        return _Upload(message, await self._db(self.store.new_upload))

    async def _listed(self, message: ListJobs, owner: str) -> tuple[dict[str, Any], ...]:
        if len(message.ids) > MAX_LIST_IDS:
            raise _BadRequest(
                f"The request names {len(message.ids)} job ids; at most {MAX_LIST_IDS} ids "
                "may be listed at once. Ask in batches, or with no ids for all your jobs."
            )
        if message.ids:
            jobs = await self._db(self.store.get_many, message.ids)
        else:
            jobs = await self._db(self.store.all, owner=owner)
        return tuple(j.public() for j in jobs if j.owner == owner)

    async def _known(self, job_id: str, owner: str) -> JobRecord:
        """The job, if it exists and is ``owner``'s (another's reads exactly as a missing one)."""
        job = await self._db(self.store.get, job_id)
        if job is None or job.owner != owner:
            raise _NotFound(job_id)
        return job

    async def _submitted(self, ws: Any, session: Session, upload: _Upload, owner: str) -> None:
        upload.close()
        request = upload.request
        job, new = await self._db(
            self.store.submit,
            upload.directory,
            {
                "code": request.code,
                "values": _described(request.values),
                "fetch": list(request.fetch),
                "deletes": list(request.deletes),
                "packages": list(request.packages),
            },
            request_id=request.request_id,
            name=request.name,
            tags=request.tags,
            os_name=request.os,
            retries=request.retries,
            timeout=request.timeout,
            owner=owner,
        )
        if not new and job.owner != owner:  # the store kept the other client's job
            raise ProtocolError("that request id is already in use; submit with a fresh one")
        if new:
            logger.info("job %s (%s) submitted", job.id, job.name or "unnamed")
            self.wake.set()
        else:
            logger.info("job %s submitted again with the same request id", job.id)
        await ws.send(session.send(JobList((job.public(),))))

    async def _pull(self, ws: Any, session: Session, job: JobRecord) -> None:
        stored = await self._db(self.store.load_result, job.id)
        if stored is None:
            raise _NotReady(job)
        outputs, result = stored
        values = _headers(result["values"])
        directory = self.store.blob_dir(job.id)
        parts = [
            serialize.read_file(_out_file(directory, i), v.sizes) for i, v in enumerate(values)
        ]
        data = JobData(
            job=job.public(),
            status=Status(result["status"]),
            outputs=tuple(outputs),
            values=values,
            deleted=tuple(result["deleted"]),
            failures=result["failures"],
            error=result["error"],
        )
        await ws.send(session.send(data))
        for frame in session.frames(parts):
            await ws.send(frame)


def owner_of(ws: Any) -> str:
    """The owner a jobs connection acts as: a hash of its client secret ('' without one)."""
    request = getattr(ws, "request", None)
    secret = request.headers.get(CLIENT_HEADER, "") if request is not None else ""
    return hashlib.sha256(secret.encode()).hexdigest()[:32] if secret else ""


def _described(values: Sequence[ValueHeader]) -> list[dict[str, Any]]:
    """Value headers as stored in a job's JSON files."""
    return [{"name": v.name, "sizes": list(v.sizes)} for v in values]


def _headers(stored: Sequence[dict[str, Any]]) -> tuple[ValueHeader, ...]:
    """Value headers back from a job's JSON files."""
    return tuple(ValueHeader(v["name"], tuple(v["sizes"])) for v in stored)


def _read_request(directory: Path) -> dict[str, Any]:
    return dict(json.loads((directory / "request.json").read_text()))


def _final_state(status: Status, error: dict[str, Any] | None) -> tuple[str, str]:
    error = error or {}
    if status is Status.OK:
        return jobstore.DONE, ""
    if status is Status.ERROR:
        return jobstore.FAILED, f"{error.get('ename', 'Error')}: {error.get('evalue', '')}"
    if status is Status.INTERRUPTED:
        return jobstore.CANCELLED, "interrupted"
    return jobstore.FAILED, f"{status.value}: {error.get('message', '')}"


class _NotFound(Exception):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"No job {job_id!r} here; %jobs lists the jobs there are.")


class _NotReady(Exception):
    def __init__(self, job: JobRecord) -> None:
        if job.state in jobstore.FINISHED:
            why = f" ({job.reason})" if job.reason else ""
            message = f"Job {job.id} is {job.state}{why} and has no results to pull."
        else:
            message = (
                f"Job {job.id} is {job.state} (submitted {time.ctime(job.submitted_at)}); "
                "pull it once it is done."
            )
        super().__init__(message)


class _BadRequest(Exception):
    """A request over a limit (the message names it)."""


class _Upload:
    """Writes a submission's values into files of a private temporary directory.

    Like a cell's upload (:class:`runner.uploads.Upload`): each file is created
    when the first byte of its value arrives and closed when the next value
    starts, so a submission holds at most one descriptor.
    """

    def __init__(self, request: Submit, directory: Path) -> None:
        self.request = request
        self.directory = directory
        self._current: tuple[int, IO[bytes]] | None = None

    def write(self, value: int, data: memoryview) -> None:
        """Write the next bytes of value ``value`` (values arrive in order)."""
        if self._current is None or self._current[0] != value:
            self.close()
            try:
                created = safefiles.create_new(_in_file(self.directory, value))
            except safefiles.UnsafeFile as exc:
                raise ProtocolError(
                    f"cannot store value {value} of the submission: {exc}"
                ) from None
            self._current = (value, created)
        self._current[1].write(data)

    def close(self) -> None:
        """Close the file being written."""
        if self._current is not None:
            self._current[1].close()
            self._current = None

    def discard(self) -> None:
        """Close and remove everything written (the submission did not complete)."""
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)
