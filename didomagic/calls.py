"""Remote function calls for plain Python code: :func:`run`, :func:`run_async`, :func:`map`.

``run`` sends a function and its arguments (by value, with cloudpickle) to a
runner chosen the same way as for ``%%remote`` (``runner=``, ``tags=``,
``os=``), calls it there in the notebook's remote session, and returns its
result. A remote exception is raised here as itself when it can travel,
with the remote traceback added as a note; otherwise as :class:`RemoteError`.

``map`` scatters calls over every matching runner: it opens as many sessions
as the runners have free slots (at least one per runner), each session takes
the next item as soon as it is done with one, and the results are gathered in
input order. The function travels once per session.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from didomagic import display, matching, serialize
from didomagic.api import (
    RemoteSession,
    SessionPool,
    default_pool,
    dispatch,
    raise_for_status,
)
from didomagic.callcode import CALL, CALL_CODE, MAP_CODE, RESULT_NAME, pack_call, unwrap
from didomagic.client import ANY_RUNNER, Requirements
from didomagic.detached import _holder_for, submit_request
from didomagic.errors import (
    ConfigurationError,
    ConnectError,
    ConnectionLost,
    ItemFailed,
    RemoteError,
    RunnerBusy,
)
from didomagic.loop import background_loop
from didomagic.packages import default_mode, requested
from didomagic.progress import NoProgress, Progress, make_progress
from didomagic.protocol import Execute, Output, Result, Submit

BUSY_WAIT = 30.0
"""Seconds a map's session waits for a busy runner while other sessions do the items."""


def _request(
    values: Sequence[serialize.Packed], timeout: float | None, pip: Sequence[str] = ()
) -> Execute:
    return Execute(
        cell=secrets.token_hex(8),
        code=CALL_CODE,
        values=tuple(p.header for p in values),
        fetch=(RESULT_NAME,),
        timeout=timeout,
        packages=tuple(pip),
    )


def _outcome(
    result: Result, buffers: list[list[bytearray]], runner: str, safe: bool = False
) -> Any:
    """The call's return value, or raise what it raised (with the remote traceback)."""
    values: dict[str, Any] = {}
    failures = serialize.unpack_into(
        values, [(v.name, parts) for v, parts in zip(result.values, buffers, strict=True)], safe
    )
    failures.update(result.failures)
    if RESULT_NAME not in values:
        raise_for_status(result, runner)  # timeout, kernel died, an exception that can't travel
        reason = failures.get(RESULT_NAME, "nothing came back")
        raise RemoteError(
            "ResultNotTransferable",
            f"the call finished but its result could not travel back: {reason}",
            [],
            runner,
        )
    return unwrap(values[RESULT_NAME], runner)


def _show(output: Output, safe: bool = False) -> None:
    display.show(output, safe)


# --------------------------------------------------------------------------- run


def run(
    fn: Callable[..., Any],
    /,
    *args: Any,
    tags: Sequence[str] = (),
    os: str = "",
    runner: str | None = None,
    timeout: float | None = None,
    pool: SessionPool | None = None,
    pip: Sequence[str] = (),
    packages: str = "",
    **kwargs: Any,
) -> Any:
    """Call ``fn(*args, **kwargs)`` on a runner and return its result.

    The runner is chosen as for ``%%remote``: ``runner`` (URL or name), else
    ``tags``/``os``, else the notebook's default. Output streams here; a remote
    exception is re-raised with the remote traceback attached as a note.
    ``pip`` and ``packages="match"`` ask for packages as ``%%remote --pip`` and
    ``--packages match`` do (the match looks at what the call's pickles need).
    """
    session = (pool or default_pool()).session(runner, tuple(tags), os)
    packed = pack_call(fn, args, kwargs)
    mode = packages or default_mode()
    pins = requested(pip, mode, "", (p.parts[0] for p in packed if p.parts))
    result, buffers = session.execute(
        _request(packed, timeout, pins),
        [p.parts for p in packed],
        lambda output: _show(output, session.url.safe_results),
        NoProgress(),
    )
    return _outcome(result, buffers, session.runner_name, session.url.safe_results)


def submit(
    fn: Callable[..., Any],
    /,
    *args: Any,
    tags: Sequence[str] = (),
    os: str = "",
    runner: str | None = None,
    name: str = "",
    retries: int = 0,
    timeout: float | None = None,
    pool: SessionPool | None = None,
    **kwargs: Any,
) -> Any:
    """Submit ``fn(*args, **kwargs)`` as a detached job; return its ``Job`` handle.

    The function and arguments travel now; ``job.result()`` later returns the
    value (or raises the remote exception), from this or any other notebook.
    """

    pool = pool or default_pool()
    holder = _holder_for(pool, runner, tags, os)
    packed = pack_call(fn, args, kwargs)
    request = Submit(
        request_id=secrets.token_urlsafe(16),
        code=CALL_CODE,
        values=tuple(p.header for p in packed),
        fetch=(RESULT_NAME,),
        name=name or getattr(fn, "__name__", ""),
        tags=tuple(tags),
        os=os,
        retries=retries,
        timeout=timeout,
    )
    return submit_request(holder, request, packed)


class _LoopSink:
    """Hands events from the I/O loop to a queue of the caller's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[tuple[Any, ...] | None] = asyncio.Queue()

    def put(self, event: tuple[Any, ...] | None, /) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


async def run_async(
    fn: Callable[..., Any],
    /,
    *args: Any,
    tags: Sequence[str] = (),
    os: str = "",
    runner: str | None = None,
    timeout: float | None = None,
    pool: SessionPool | None = None,
    **kwargs: Any,
) -> Any:
    """The awaitable form of :func:`run` (for ``await`` in a notebook cell or asyncio code)."""
    pool = pool or default_pool()
    session = await asyncio.to_thread(pool.session, runner, tuple(tags), os)
    packed = pack_call(fn, args, kwargs)
    sink = _LoopSink(asyncio.get_running_loop())
    future = session.loop.submit(
        session.execute_async(_request(packed, timeout), [p.parts for p in packed], sink)
    )
    future.add_done_callback(lambda _: sink.put(None))
    progress = NoProgress()
    try:
        while (event := await sink.queue.get()) is not None:
            dispatch(event, lambda output: _show(output, session.url.safe_results), progress)
    except asyncio.CancelledError:
        session.cancel()
        raise
    result, buffers = await asyncio.wrap_future(future)
    return _outcome(result, buffers, session.runner_name, session.url.safe_results)


# --------------------------------------------------------------------------- map


@dataclass
class _Worker:
    """One session of a map: where it connects and what it has been given."""

    session: RemoteSession
    has_fn: bool = False
    items: int = 0


@dataclass
class _MapState:
    items: list[Any]
    results: list[Any]
    errors: dict[int, BaseException] = field(default_factory=dict)
    cancelled: set[int] = field(default_factory=set)
    unconnected: list[Exception] = field(default_factory=list)
    next_index: int = 0
    stop: bool = False


def _worker_targets(
    pool: SessionPool, tags: tuple[str, ...], os: str, runner: str | None, count: int
) -> list[tuple[Any, Requirements]]:
    """Where each worker session connects: one per free slot of every matching runner."""
    if runner is None and not tags and not os and pool.default is None:
        views = [v for v in pool.survey() if v.status == "up"]
        if not views:  # nothing configured: the embedded (or $DIDOMAGIC_RUNNER) runner
            session = pool.session()
            return [(session.url, ANY_RUNNER)] * max(1, min(count, _slots_of(session)))
    elif runner is not None or (pool.default and not tags and not os):
        session = pool.session(runner)
        return [(session.url, session.requirements)] * max(1, min(count, _slots_of(session)))
    else:
        views = [v for v in pool.survey() if matching.matches(v.description, tags, os)]
        views = [v for v in views if matching.can_take(v.description)]
        if not views:
            pool.session(None, tags, os)  # raises NoMatchingRunner with the listing
    targets: list[tuple[Any, Requirements]] = []
    for view in views:
        requirements = Requirements(tags=tags, os=os) if view.mediator else ANY_RUNNER
        slots = max(1, matching.free_slots(view.description))
        targets.extend([(view.url, requirements)] * slots)
    return targets[: max(1, count)]


def _slots_of(session: RemoteSession) -> int:
    from didomagic.client import query

    info, _ = background_loop().run(query(session.url))
    return sum(max(1, matching.free_slots(d)) for d in info.runners) or 1


def map(
    fn: Callable[..., Any],
    iterable: Iterable[Any],
    *,
    tags: Sequence[str] = (),
    os: str = "",
    runner: str | None = None,
    timeout: float | None = None,
    cancel_on_error: bool = False,
    progress: str | None = None,
    pool: SessionPool | None = None,
) -> list[Any]:
    """Call ``fn(item)`` for every item on all matching runners; results in input order.

    Sessions are opened on every matching runner (one per free slot) and each
    takes the next item as soon as it finishes one, so every runner stays
    busy. If an item fails, :class:`ItemFailed` (with the lowest failed
    ``index``, the error as its cause) is raised after the others finish, or,
    with ``cancel_on_error=True``, at once after stopping the others.
    """
    pool = pool or default_pool()
    items = list(iterable)
    if not items:
        return []
    targets = _worker_targets(pool, tuple(tags), os, runner, len(items))
    workers = [_Worker(RemoteSession(url, requirements)) for url, requirements in targets]
    state = _MapState(items, [None] * len(items))
    bar = make_map_progress(progress, len(items))
    done = failed = 0
    events: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
    loop = background_loop()
    future = loop.submit(_scatter(fn, workers, state, timeout, cancel_on_error, events))
    future.add_done_callback(lambda _: events.put(None))
    try:
        while True:
            try:
                event = events.get(timeout=0.25)
            except queue.Empty:
                bar.tick()
                continue
            if event is None:
                break
            if event[0] == "output":
                _show(event[1], any(w.session.url.safe_results for w in workers))
            elif event[0] == "item":
                done += 1
                failed += 0 if event[2] else 1
                bar.counted(done, len(items), failed)
    except KeyboardInterrupt:
        state.stop = True
        for worker in workers:
            worker.session.cancel()
        with contextlib.suppress(BaseException):
            future.result(timeout=30)
        bar.finish(False, "interrupted")
        raise
    future.result()
    used = {w.session.runner_name for w in workers if w.items}
    if state.errors:
        index = min(state.errors)
        bar.finish(False, f"item {index} failed")
        cancelled = sorted(
            state.cancelled | set(range(state.next_index, len(items))) - set(state.errors)
        )
        raise ItemFailed(index, state.errors[index], state.results, cancelled) from state.errors[
            index
        ]
    bar.finish(True, f"{len(items)} items on {len(used)} runner{'s' if len(used) != 1 else ''}")
    return state.results


async def _scatter(
    fn: Any,
    workers: list[_Worker],
    state: _MapState,
    timeout: float | None,
    cancel_on_error: bool,
    events: queue.SimpleQueue[tuple[Any, ...] | None],
) -> None:
    """Run every item on the workers' sessions; each worker takes the next item when free."""

    async def work(worker: _Worker) -> None:
        session = worker.session
        sink = _Forward(events)
        if not await _connect_worker(session, sink, state):
            return
        try:
            while not state.stop and state.next_index < len(state.items):
                index = state.next_index
                state.next_index += 1
                args = (state.items[index],)
                if worker.has_fn:  # the function is already there: send the arguments only
                    packed, code = _pack_named({CALL: (args, {})}), MAP_CODE
                else:  # the first call binds the function in the session for the next ones
                    packed, code = _pack_named({CALL: (fn, args, {})}), CALL_CODE
                request = Execute(
                    cell=secrets.token_hex(8),
                    code=code,
                    values=tuple(p.header for p in packed),
                    fetch=(RESULT_NAME,),
                    timeout=timeout,
                )
                if state.stop:  # another item failed while this one was being packed
                    state.cancelled.add(index)
                    break
                try:
                    result, buffers = await session.execute_async(
                        request, [p.parts for p in packed], sink
                    )
                    worker.has_fn = True
                    worker.items += 1
                    state.results[index] = _outcome(
                        result, buffers, session.runner_name, session.url.safe_results
                    )
                    events.put(("item", index, True))
                except (Exception, KeyboardInterrupt) as exc:
                    if state.stop:
                        state.cancelled.add(index)  # stopped because another item failed
                    else:
                        state.errors[index] = exc
                    events.put(("item", index, False))
                    if cancel_on_error and not state.stop:
                        state.stop = True
                        for other in workers:
                            if other is not worker:
                                other.session.cancel()
                    if not session.connected:
                        break
        finally:
            with contextlib.suppress(Exception):
                await session.close_async()

    await asyncio.gather(*(work(w) for w in workers))
    if len(state.unconnected) == len(workers):
        raise state.unconnected[0]
    missing = [i for i in range(len(state.items)) if i >= state.next_index]
    if missing and not state.stop and not state.errors:
        raise ConnectionLost(f"map lost every runner before items {missing} ran.")


async def _connect_worker(session: RemoteSession, sink: _Forward, state: _MapState) -> bool:
    """Open a worker's session; a busy runner is tried again while items are left.

    A runner stays busy for a moment after sessions close (its kernels shut
    down first), so a map right after another waits for it instead of failing.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BUSY_WAIT
    delay = 0.1
    while True:
        try:
            await session.connect_async(sink)
            return True
        except RunnerBusy as exc:
            if state.stop or state.next_index >= len(state.items) or loop.time() > deadline:
                state.unconnected.append(exc)
                return False
        except ConnectError as exc:  # gone: the other sessions take the items
            state.unconnected.append(exc)
            return False
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


def _pack_named(values: dict[str, Any]) -> list[serialize.Packed]:
    packed, failures = serialize.pack_names(values, list(values))
    if failures:
        raise ConfigurationError(
            f"The function or its arguments cannot be sent: {'; '.join(failures.values())}."
        )
    return packed


class _Forward:
    """Forwards a worker's outputs (only) to the notebook thread."""

    def __init__(self, events: queue.SimpleQueue[tuple[Any, ...] | None]) -> None:
        self.events = events

    def put(self, event: tuple[Any, ...], /) -> None:
        if event[0] == "output":
            self.events.put(event)


def make_map_progress(kind: str | None, total: int) -> Progress:
    """The map's one progress display: items done of ``total`` (widget bar or text lines)."""
    progress = make_progress(kind)
    progress.counted(0, total, 0)
    return progress
