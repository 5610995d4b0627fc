"""Detached jobs from the notebook side: submit, list, pull, cancel, delete.

A job is held by a mediator (or by a runner, for jobs submitted to it
directly). Everything the job needs travels at submission, and the holder
stores it before answering, so the notebook may close right after. Results
are pulled later, from any notebook that knows the holder (through the
runner list): ``%jobs pull ID`` shows the job's outputs as if the cell had
just run and binds its names, like ``%%remote`` would have.

Each submission carries a request id; a client that resubmits after a dropped
connection (:func:`submit_cell` does once) gets the existing job back instead
of a second one.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from didomagic import display, files, localcode, serialize
from didomagic.api import (
    CellSpec,
    SessionPool,
    apply_values,
    cell_packages,
    default_pool,
    plan_transfer,
    raise_for_status,
    report_failures,
)
from didomagic.callcode import RESULT_NAME, unwrap
from didomagic.client import RunnerConnection, dial, handshake, refusal
from didomagic.config import client_secret
from didomagic.errors import (
    ConfigurationError,
    ConnectError,
    DidomagicError,
    JobError,
    ProtocolError,
    RunnerUnreachable,
)
from didomagic.filebundle import FileOptions
from didomagic.inbound import Inbound
from didomagic.loop import background_loop
from didomagic.namespace import transform_cell
from didomagic.protocol import (
    CLIENT_HEADER,
    CancelJob,
    Channel,
    DeleteJob,
    Error,
    ErrorCode,
    JobData,
    JobList,
    ListJobs,
    Output,
    Pull,
    Result,
    State,
    Submit,
    expect,
)
from didomagic.urls import ConnectionURL

JOBS_PATH = "jobs"

# --------------------------------------------------------------------------- the wire


async def _open(url: ConnectionURL) -> RunnerConnection:
    ws = await dial(url, JOBS_PATH, {CLIENT_HEADER: client_secret()})
    return await handshake(ws, url, channel=Channel.JOBS)


def _job_error(error: Error) -> DidomagicError:
    if error.code in (ErrorCode.NOT_FOUND, ErrorCode.NOT_READY):
        return JobError(error.message)
    return refusal(error)


async def _request(url: ConnectionURL, message: Any) -> JobList:
    connection = await _open(url)
    try:
        await connection.ws.send(connection.session.send(message))
        reply = connection.session.receive(await connection.ws.recv())
    finally:
        await connection.close()
    if isinstance(reply, Error):
        raise _job_error(reply)
    return expect(reply, JobList)


async def submit_async(
    url: ConnectionURL, request: Submit, parts: Sequence[Sequence[memoryview]]
) -> dict[str, Any]:
    """Store a job at the holder; return its record once the holder has it on disk."""
    connection = await _open(url)
    try:
        await connection.ws.send(connection.session.send(request))
        for frame in connection.session.frames(parts):
            await connection.ws.send(frame)
        reply = connection.session.receive(await connection.ws.recv())
    finally:
        await connection.close()
    if isinstance(reply, Error):
        raise _job_error(reply)
    reply = expect(reply, JobList)
    if len(reply.jobs) != 1:
        raise ProtocolError(f"a submission was answered with {len(reply.jobs)} jobs, not one")
    return reply.jobs[0]


async def list_async(url: ConnectionURL, ids: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The holder's jobs (or those with these ids), oldest first."""
    return list((await _request(url, ListJobs(tuple(ids)))).jobs)


async def cancel_async(url: ConnectionURL, job_id: str) -> dict[str, Any]:
    """Cancel a job; return its record as it is now."""
    jobs = (await _request(url, CancelJob(job_id))).jobs
    if len(jobs) != 1:
        raise ProtocolError(f"a cancellation was answered with {len(jobs)} jobs, not one")
    return jobs[0]


async def delete_async(url: ConnectionURL, job_id: str) -> None:
    """Delete a job and its stored results."""
    await _request(url, DeleteJob(job_id))


async def pull_async(url: ConnectionURL, job_id: str) -> tuple[JobData, list[list[bytearray]]]:
    """A finished job's record, outputs, status and returned values."""
    connection = await _open(url)
    session = connection.session
    try:
        await connection.ws.send(session.send(Pull(job_id)))
        data: JobData | None = None
        inbound = Inbound()
        while data is None or session.state is not State.IDLE:
            frame = await connection.ws.recv()
            if isinstance(frame, bytes):
                for chunk in session.receive_binary(frame):
                    inbound.add(chunk)
                continue
            message = session.receive(frame)
            if isinstance(message, Error):
                raise _job_error(message)
            data = expect(message, JobData)
            inbound = Inbound(data.values)
        return data, inbound.parts
    finally:
        await connection.close()


# --------------------------------------------------------------------------- the API


@dataclass
class JobResult:
    """A pulled job: its record, outputs, the values it bound and how it ended."""

    record: dict[str, Any]
    outputs: list[Output]
    values: dict[str, Any]
    result: Result
    failures: dict[str, str] = field(default_factory=dict)


@dataclass
class Job:
    """A handle on a detached job: its id and where it is held."""

    id: str
    holder: ConnectionURL
    holder_name: str = ""

    def status(self) -> dict[str, Any]:
        """The job's record now: state, reason, runner, times, attempts."""
        found = background_loop().run(list_async(self.holder, [self.id]))
        if not found:
            raise JobError(f"Job {self.id} is gone from {self.holder_name or self.holder.address}.")
        return found[0]

    def pull(self) -> tuple[JobData, list[list[bytearray]]]:
        """The finished job as it travels: its data and the raw parts of its values."""
        return background_loop().run(pull_async(self.holder, self.id))

    def fetch(self) -> JobResult:
        """Pull the job's outputs and values (it must be finished)."""
        data, buffers = self.pull()
        values: dict[str, Any] = {}
        failures = serialize.unpack_into(
            values,
            [(v.name, parts) for v, parts in zip(data.values, buffers, strict=True)],
            self.holder.safe_results,
        )
        failures.update(data.failures)
        result = Result(self.id, data.status, data.values, data.deleted, data.failures, data.error)
        outputs = [Output(self.id, o["msg_type"], o["content"]) for o in data.outputs]
        return JobResult(dict(data.job), outputs, values, result, failures)

    def result(self) -> Any:
        """The job's value: a submitted function's return value (or its exception raised
        here), or, for a cell, the dict of names it bound. Raises if the cell failed."""
        pulled = self.fetch()
        runner = str(pulled.record.get("runner") or "")
        if RESULT_NAME in pulled.values:
            return unwrap(pulled.values[RESULT_NAME], runner)
        raise_for_status(pulled.result, runner)
        return pulled.values

    def wait(self, timeout: float | None = None, poll: float = 0.5) -> dict[str, Any]:
        """Block until the job is finished; return its record."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            record = self.status()
            if record["state"] in ("done", "failed", "cancelled"):
                return record
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.id} is still {record['state']}")
            time.sleep(poll)

    def cancel(self) -> dict[str, Any]:
        """Stop the job if it is queued or running."""
        return background_loop().run(cancel_async(self.holder, self.id))

    def delete(self) -> None:
        """Forget the job and its stored results."""
        background_loop().run(delete_async(self.holder, self.id))


def _holders(pool: SessionPool) -> list[tuple[str, ConnectionURL]]:
    """Every place jobs may be held: configured runners and mediators, $DIDOMAGIC_RUNNER."""
    seen: dict[str, tuple[str, ConnectionURL]] = {}
    for entry in pool.entries():
        seen.setdefault(str(entry.url), (entry.name, entry.url))
    return list(seen.values())


def jobs(pool: SessionPool | None = None) -> list[dict[str, Any]]:
    """Every job of every holder the notebook knows, oldest first, each with its ``holder``.

    A holder that cannot be reached is listed as one entry with ``state`` "unreachable".
    """
    holders = _holders(pool or default_pool())

    async def gather() -> list[Any]:
        return await asyncio.gather(
            *(list_async(url) for _, url in holders), return_exceptions=True
        )

    found: list[dict[str, Any]] = []
    for (name, _), answer in zip(holders, background_loop().run(gather()), strict=True):
        if isinstance(answer, BaseException):
            found.append({"holder": name, "state": "unreachable", "reason": str(answer)})
            continue
        found.extend({**job, "holder": name} for job in answer)
    return sorted(found, key=lambda j: j.get("submitted_at") or 0)


def job(job_id: str, pool: SessionPool | None = None) -> Job:
    """The job with this id (or, failing that, the latest job with this name), at any holder."""
    holders = _holders(pool or default_pool())

    async def look() -> list[Any]:
        return await asyncio.gather(
            *(list_async(url) for _, url in holders), return_exceptions=True
        )

    named: list[tuple[float, Job]] = []
    for (name, url), answer in zip(holders, background_loop().run(look()), strict=True):
        if not isinstance(answer, list):
            continue
        for record in answer:
            if record["id"] == job_id:
                return Job(job_id, url, name)
            if record.get("name") == job_id:
                named.append((record["submitted_at"], Job(record["id"], url, name)))
    if named:
        return max(named, key=lambda pair: pair[0])[1]
    where = ", ".join(name for name, _ in holders) or "no runners configured"
    raise JobError(
        f"No job {job_id!r} (by id or name) at any known runner or mediator ({where}). %jobs "
        "lists the jobs there are; a job submitted elsewhere needs that runner or mediator "
        "in %runners."
    )


def _holder_for(
    pool: SessionPool, runner: str | None, tags: Sequence[str], os: str
) -> tuple[str, ConnectionURL]:
    """Where a submission goes: a mediator or runner that outlives this kernel."""
    url = pool.holder(runner, tuple(tags), os)
    name = next((n for n, u in _holders(pool) if str(u) == str(url)), url.address)
    return name, url


def submit_request(
    holder: tuple[str, ConnectionURL],
    request: Submit,
    packed: Sequence[serialize.Packed],
) -> Job:
    """Send a submission, retrying once with the same request id if the connection drops."""
    name, url = holder
    parts = [p.parts for p in packed]
    bundle = localcode.bundle_for(localcode.CodeState(), localcode.imports_of(request.code))
    if bundle is not None:  # the job may run when this notebook is gone: its modules go now
        request = replace(request, values=(bundle.header, *request.values))
        parts = [bundle.parts, *parts]
    try:
        record = background_loop().run(submit_async(url, request, parts))
    except (RunnerUnreachable, ConnectError) as first:
        if not isinstance(first, RunnerUnreachable):
            raise
        record = background_loop().run(submit_async(url, request, parts))  # same request id
    return Job(str(record["id"]), url, name)


def submit_cell(
    spec: CellSpec,
    namespace: MutableMapping[str, Any],
    *,
    name: str = "",
    runner: str | None = None,
    retries: int = 0,
    transform: Callable[[str], str] = transform_cell,
    hidden: Iterable[str] = (),
    pool: SessionPool | None = None,
) -> Job:
    """Submit a cell as a detached job: its code and the values it reads go now."""
    if retries < 0:
        raise ConfigurationError(f"retries must be 0 or more, got {retries}")
    pool = pool or default_pool()
    holder = _holder_for(pool, runner, spec.tags, spec.os)
    transfer = plan_transfer(spec, namespace, transform, hidden)
    packed, failures = serialize.pack_names(namespace, transfer.send)
    report_failures(failures, "sent")
    # the job's files go with it: no notebook may be there to serve them when it runs
    packed.append(files.bundle_value({}, spec.files, safe=holder[1].safe_results, lazy=False))
    request = Submit(
        request_id=secrets.token_urlsafe(16),
        code=spec.code,
        values=tuple(p.header for p in packed),
        fetch=tuple(transfer.fetch),
        deletes=tuple(transfer.deletes),
        name=name,
        tags=spec.tags,
        os=spec.os,
        retries=retries,
        timeout=spec.timeout,
        packages=cell_packages(spec, packed, transform),
    )
    return submit_request(holder, request, packed)


def pull_into(
    job_id: str, namespace: MutableMapping[str, Any], pool: SessionPool | None = None
) -> Any:
    """Show a finished job's outputs as if its cell had just run, and bind its names here.

    A failed job raises its remote error after its names are bound (like a cell).
    """
    handle = job(job_id, pool)
    data, buffers = handle.pull()
    shown = None
    for output in data.outputs:
        result = display.show(
            Output(job_id, output["msg_type"], output["content"]), handle.holder.safe_results
        )
        if result is not None:
            shown = result
    failures = dict(data.failures)
    returned = [(v.name, parts) for v, parts in zip(data.values, buffers, strict=True)]
    safe = handle.holder.safe_results
    returned = files.take_back(returned, None, FileOptions(), safe=safe)
    failures.update(apply_values(namespace, returned, data.deleted, safe))
    report_failures(failures, "synced")
    result = Result(job_id, data.status, data.values, data.deleted, data.failures, data.error)
    raise_for_status(result, str(data.job.get("runner") or handle.holder_name))
    return shown


def cancel(job_id: str, pool: SessionPool | None = None) -> dict[str, Any]:
    """Cancel a job by id (found at any known holder)."""
    return job(job_id, pool).cancel()


def delete(job_id: str, pool: SessionPool | None = None) -> None:
    """Delete a job and its results by id."""
    job(job_id, pool).delete()
