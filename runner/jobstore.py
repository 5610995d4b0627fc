"""Where detached jobs live: an SQLite database (WAL) and a directory of blobs beside it.

::

    <state dir>/jobs/
        jobs.sqlite3            one row per job (WAL mode: a crash loses no committed row)
        blobs/<job id>/
            request.json        code, names to fetch and delete, value headers
            in-<i>.bin          the values sent with the submission
            outputs.jsonl       the cell's outputs, one per line, in order
            result.json         how the cell ended, and the value headers returned
            out-<i>.bin         the values it bound

A job's blobs are complete on disk (written to a temporary directory, flushed,
then renamed into place) before its row is committed, so a row never points at
half-written files. States: ``queued`` → ``running`` → ``done`` / ``failed`` /
``cancelled``.

The store is not thread-safe, but may be used from any one thread at a time
(the job service runs it on a worker thread, off the event loop).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    tags TEXT NOT NULL,
    os TEXT NOT NULL,
    retries INTEGER NOT NULL,
    timeout REAL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    runner TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    submitted_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    owner TEXT NOT NULL DEFAULT ''
)
"""

_COLUMNS = (
    "id",
    "request_id",
    "name",
    "tags",
    "os",
    "retries",
    "timeout",
    "state",
    "reason",
    "runner",
    "attempts",
    "submitted_at",
    "started_at",
    "finished_at",
    "owner",
)


_JOB_ID = re.compile(r"[A-Za-z0-9_-]{16}")
"""What :meth:`JobStore.submit` makes a job id (``secrets.token_urlsafe(12)``)."""

_PRIVATE = ("request_id", "owner")
"""Columns clients are never shown."""


@dataclass(frozen=True)
class JobRecord:
    """One job's row."""

    id: str
    request_id: str
    name: str
    tags: tuple[str, ...]
    os: str
    retries: int
    timeout: float | None
    state: str
    reason: str
    runner: str
    attempts: int
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    owner: str = ""
    """Who submitted it (a hash of the client's identity); only they may see or touch it."""

    def public(self) -> dict[str, Any]:
        """What clients see of the job (everything but the request id)."""
        body = {name: getattr(self, name) for name in _COLUMNS if name not in _PRIVATE}
        body["tags"] = list(self.tags)
        return body


def _write_json(path: Path, body: Any) -> None:
    with open(path, "w") as f:
        json.dump(body, f)
        f.flush()
        os.fsync(f.fileno())


class JobStore:
    """The job database and blobs of one mediator (or stand-alone runner)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.blobs = directory / "blobs"
        self.incoming = directory / "incoming"
        for d in (directory, self.blobs, self.incoming):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        shutil.rmtree(self.incoming, ignore_errors=True)  # uploads a crash interrupted
        self.incoming.mkdir(mode=0o700)
        self.db = sqlite3.connect(
            directory / "jobs.sqlite3", isolation_level=None, check_same_thread=False
        )
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute(_SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(jobs)")}
        if "owner" not in columns:  # a store from before jobs had owners
            self.db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT ''")

    def close(self) -> None:
        """Close the database."""
        self.db.close()

    # -- reading

    def _record(self, row: tuple[Any, ...]) -> JobRecord:
        body = dict(zip(_COLUMNS, row, strict=True))
        body["tags"] = tuple(json.loads(body["tags"]))
        return JobRecord(**body)

    def get(self, job_id: str) -> JobRecord | None:
        """The job with this id, if it exists."""
        row = self.db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
        return self._record(row) if row else None

    def get_many(self, job_ids: tuple[str, ...]) -> list[JobRecord]:
        """The jobs with these ids that exist, oldest first (one statement for any number)."""
        rows = self.db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id IN (SELECT value FROM json_each(?)) "
            "ORDER BY submitted_at",
            (json.dumps(list(job_ids)),),
        ).fetchall()
        return [self._record(r) for r in rows]

    def all(self, state: str | None = None, owner: str | None = None) -> list[JobRecord]:
        """Every job (or those in ``state``, or ``owner``'s), oldest first."""
        conditions = [(c, v) for c, v in (("state", state), ("owner", owner)) if v is not None]
        where = ("WHERE " + " AND ".join(f"{c} = ?" for c, _ in conditions)) if conditions else ""
        args = tuple(v for _, v in conditions)
        rows = self.db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM jobs {where} ORDER BY submitted_at", args
        ).fetchall()
        return [self._record(r) for r in rows]

    def by_request(self, request_id: str) -> JobRecord | None:
        """The job submitted with this request id, if any."""
        row = self.db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE request_id = ?", (request_id,)
        ).fetchone()
        return self._record(row) if row else None

    def blob_dir(self, job_id: str) -> Path:
        """Where a job's files are (``job_id`` must have the form this store gives ids)."""
        if not _JOB_ID.fullmatch(job_id):
            raise ValueError(f"not a job id: {job_id!r:.40}")
        return self.blobs / job_id

    # -- writing

    def new_upload(self) -> Path:
        """A private temporary directory for a submission's files."""
        path = self.incoming / secrets.token_hex(8)
        path.mkdir(mode=0o700)
        return path

    def submit(
        self,
        upload: Path,
        request: dict[str, Any],
        *,
        request_id: str,
        name: str,
        tags: tuple[str, ...],
        os_name: str,
        retries: int,
        timeout: float | None,
        owner: str = "",
    ) -> tuple[JobRecord, bool]:
        """Store a submission whose values are in ``upload``; return the job and if it is new.

        A request id seen before returns the existing job and discards ``upload``.
        """
        existing = self.by_request(request_id)
        if existing is not None:
            shutil.rmtree(upload, ignore_errors=True)
            return existing, False
        job_id = secrets.token_urlsafe(12)
        _write_json(upload / "request.json", request)
        for path in upload.glob("in-*.bin"):
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(upload, self.blob_dir(job_id))
        self.db.execute(
            "INSERT INTO jobs (id, request_id, name, tags, os, retries, timeout, state, "
            "submitted_at, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                job_id,
                request_id,
                name,
                json.dumps(list(tags)),
                os_name,
                retries,
                timeout,
                QUEUED,
                time.time(),
                owner,
            ),
        )
        record = self.get(job_id)
        assert record is not None
        return record, True

    def update(self, job_id: str, **fields: Any) -> JobRecord | None:
        """Change some columns of a job; return it as it is now."""
        if fields:
            assignments = ", ".join(f"{name} = ?" for name in fields)
            self.db.execute(
                f"UPDATE jobs SET {assignments} WHERE id = ?", (*fields.values(), job_id)
            )
        return self.get(job_id)

    def start(self, job_id: str, runner: str) -> JobRecord | None:
        """Mark a queued job running on ``runner`` (one more attempt)."""
        self.db.execute(
            "UPDATE jobs SET state = ?, runner = ?, started_at = ?, attempts = attempts + 1, "
            "reason = '' WHERE id = ? AND state = ?",
            (RUNNING, runner, time.time(), job_id, QUEUED),
        )
        return self.get(job_id)

    def finish(self, job_id: str, state: str, reason: str = "") -> JobRecord | None:
        """Mark a job finished (a cancelled job stays cancelled)."""
        self.db.execute(
            "UPDATE jobs SET state = ?, reason = ?, finished_at = ? WHERE id = ? AND state != ?",
            (state, reason, time.time(), job_id, CANCELLED),
        )
        return self.get(job_id)

    def save_result(
        self, job_id: str, outputs: list[dict[str, Any]], result: dict[str, Any]
    ) -> None:
        """Write a job's outputs and result description (its value files are already there)."""
        directory = self.blob_dir(job_id)
        with open(directory / "outputs.jsonl.tmp", "w") as f:
            for output in outputs:
                f.write(json.dumps(output) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(directory / "outputs.jsonl.tmp", directory / "outputs.jsonl")
        for path in directory.glob("out-*.bin"):
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
        _write_json(directory / "result.json.tmp", result)
        os.replace(directory / "result.json.tmp", directory / "result.json")

    def load_result(self, job_id: str) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
        """A finished job's outputs and result description, if it has them."""
        directory = self.blob_dir(job_id)
        try:
            result = json.loads((directory / "result.json").read_text())
            lines = (directory / "outputs.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return None
        return [json.loads(line) for line in lines if line], result

    def delete(self, job_id: str) -> bool:
        """Remove a job's row and files; False if there was no such job."""
        found = self.db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount > 0
        shutil.rmtree(self.blob_dir(job_id), ignore_errors=True)
        return found

    def expire(self, ttl: float) -> list[str]:
        """Delete jobs that finished more than ``ttl`` seconds ago; return their ids."""
        cutoff = time.time() - ttl
        ids = [
            row[0]
            for row in self.db.execute(
                "SELECT id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?",
                (cutoff,),
            ).fetchall()
        ]
        for job_id in ids:
            self.delete(job_id)
        return ids
