"""The sessions a notebook holds, one per runner, and how a cell's runner is chosen.

Also the runner list's administration (:func:`add_runner`, :func:`remove_runner`,
:func:`use`, :func:`runners`), which reads and writes the user's config file.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from didomagic import display, matching
from didomagic.client import ANY_RUNNER, Requirements, query
from didomagic.config import Config, Entry
from didomagic.discovery import RunnerView, survey_async
from didomagic.embedded import EmbeddedRunner
from didomagic.errors import ConfigurationError, ConnectError, NoMatchingRunner, RunnerBusy
from didomagic.loop import background_loop
from didomagic.session import LocalSession, RemoteSession
from didomagic.tickets import Ticket
from didomagic.urls import ConnectionURL

RUNNER_ENV = "DIDOMAGIC_RUNNER"
"""Environment variable naming the default runner's connection URL."""


class SessionPool:
    """The sessions this notebook holds (one per runner), and how runners are chosen.

    Where a cell runs:

    1. ``runner=`` a connection URL, or the name of a configured runner or
       mediator, or of a runner in a configured mediator's pool;
    2. else ``tags=`` / ``os=``: an open session on a matching runner if there
       is one (so remote state carries over), else the least loaded matching
       runner among the configured runners and mediators;
    3. else the session taken back with ``%remote attach`` (:meth:`adopt`),
       else the notebook's default (:meth:`use`), else ``$DIDOMAGIC_RUNNER``,
       else an embedded runner on this machine.
    """

    def __init__(self, config: Config | None = None) -> None:
        self._sessions: list[RemoteSession] = []
        self._embedded: EmbeddedRunner | None = None
        self._lock = threading.RLock()
        self._config = config
        self.default: str | None = None
        """The notebook's default runner (a name or URL), set by ``%runners use``."""
        self.attached: RemoteSession | None = None
        """The session cells without --runner or --tags use, set by ``%remote attach``."""
        self.last: RemoteSession | None = None
        """The session the last cell used."""
        self.local = LocalSession()

    @property
    def config(self) -> Config:
        """The configured runners, read afresh (another notebook may have changed them)."""
        return self._config if self._config is not None else Config()

    def survey(self) -> list[RunnerView]:
        """Every configured runner (and every runner behind a configured mediator), queried now."""
        return background_loop().run(survey_async(self.entries()))

    def entries(self) -> list[Entry]:
        """The configured runners and mediators, plus ``$DIDOMAGIC_RUNNER`` if set."""
        entries = list(self.config.entries)
        env = _env_url()
        if env is not None and all(str(e.url) != str(env) for e in entries):
            entries.append(Entry(RUNNER_ENV, env))
        return entries

    def use(self, runner: str | None) -> None:
        """Make ``runner`` (a name or URL) the notebook's default; ``None`` clears it."""
        if runner is not None:
            self._target(runner)  # fail now, not at the next cell
        self.default = runner

    def session(
        self, runner: str | None = None, tags: Sequence[str] = (), os: str = ""
    ) -> RemoteSession:
        """The session for a cell (see the class docstring), opened on first use."""
        with self._lock:
            if runner:
                url, requirements = self._target(runner)
            elif tags or os:
                self.last = self._matching(tuple(tags), os)
                return self.last
            elif self.attached is not None:
                self.last = self.attached
                return self.last
            elif self.default:
                url, requirements = self._target(self.default)
            else:
                url, requirements = self._fallback(), ANY_RUNNER
            self.last = self._get(url, requirements)
            return self.last

    def hold(self, ticket: Ticket) -> RemoteSession:
        """The session a ticket names (taken back on its first use)."""
        with self._lock:
            session = self.find(ticket.session)
            if session is None:
                session = RemoteSession(ConnectionURL.parse(ticket.url), ticket=ticket)
                self._sessions.append(session)
            return session

    def adopt(self, ticket: Ticket) -> RemoteSession:
        """The session a ticket names, made the one cells without --runner or --tags use."""
        with self._lock:
            self.attached = self.last = self.hold(ticket)
            return self.attached

    def find(self, session_id: str) -> RemoteSession | None:
        """The session of this notebook with this remote id, if it holds one."""
        with self._lock:
            return next((s for s in self._sessions if s.session_id == session_id), None)

    def forget(self, session: RemoteSession) -> None:
        """Stop using a session (it was closed or detached)."""
        with self._lock:
            if session in self._sessions:
                self._sessions.remove(session)
            if self.attached is session:
                self.attached = None
            if self.last is session:
                self.last = None

    def holder(self, runner: str | None, tags: Sequence[str] = (), os: str = "") -> ConnectionURL:
        """Where a detached job goes: a runner or mediator that outlives this kernel.

        Like :meth:`session`, but a busy match is fine (jobs wait in the holder's
        queue), a mediator is preferred, the embedded runner is refused, and with
        nothing else given the first configured mediator (else runner) that is up
        holds the job.
        """
        if runner:
            return self._target(runner)[0]
        if tags or os:
            views = self.survey()
            up = [
                v for v in views if v.status == "up" and matching.matches(v.description, tags, os)
            ]
            if not up:
                descriptions = [v.description for v in views]
                raise NoMatchingRunner(matching.no_match_message(descriptions, tuple(tags), os))
            return next((v.url for v in up if v.mediator), up[0].url)
        if self.default:
            return self._target(self.default)[0]
        env = _env_url()
        if env is not None:
            return env
        views = [v for v in self.survey() if v.status == "up"]
        if views:  # a configured mediator first (it has the most runners), else a runner
            return next((v.url for v in views if v.mediator), views[0].url)
        raise ConfigurationError(
            "Detached jobs need a runner or mediator that outlives this kernel, and none is "
            "configured (the embedded runner stops with the kernel). Use --runner or --tags "
            f"with one from %runners, or set {RUNNER_ENV}."
        )

    def _get(self, url: ConnectionURL, requirements: Requirements) -> RemoteSession:
        for session in self._sessions:
            if str(session.url) == str(url) and session.requirements == requirements:
                return session
        session = RemoteSession(url, requirements)
        self._sessions.append(session)
        return session

    def _target(self, runner: str) -> tuple[ConnectionURL, Requirements]:
        if "://" in runner:
            return _parse_url(runner), ANY_RUNNER
        entry = self.config.get(runner)
        if entry is not None:
            return entry.url, ANY_RUNNER
        views = self.survey()
        for view in views:
            if view.mediator and view.name == runner:
                return view.url, Requirements(runner=runner)
            if view.name == runner and view.status == "up":
                return view.url, ANY_RUNNER
        known = ", ".join(dict.fromkeys(v.name for v in views)) or "none"
        raise ConfigurationError(
            f"No runner called {runner!r}: it is neither a configured name nor a runner in a "
            f"configured mediator's pool (known: {known}). Give a connection URL, or add it "
            "with %runners add URL --name NAME."
        )

    def _matching(self, tags: tuple[str, ...], os: str) -> RemoteSession:
        for session in self._sessions:
            if session.connected and matching.matches(session.description, tags, os):
                return session
        views = self.survey()
        chosen = matching.choose([v.description for v in views], tags, os)
        if chosen is None:
            descriptions = [v.description for v in views]
            error = RunnerBusy if matching.all_busy(descriptions, tags, os) else NoMatchingRunner
            raise error(matching.no_match_message(descriptions, tags, os))
        view = next(v for v in views if v.description is chosen)
        if view.mediator:
            return self._get(view.url, Requirements(tags=tags, os=os))
        return self._get(view.url, ANY_RUNNER)

    def _fallback(self) -> ConnectionURL:
        env = _env_url()
        if env is not None:
            return env
        restarted = False
        if self._embedded is not None and not self._embedded.alive:
            old, self._embedded = self._embedded, None
            self._forget(old.url)
            old.stop()  # removes what it left behind
            restarted = True
        if self._embedded is None:
            self._embedded = EmbeddedRunner()
            url = self._embedded.start()
            display.notice(
                f"the embedded runner had stopped, so started a new one on {url.address}; "
                "remote state from earlier cells is gone."
                if restarted
                else f"no runner configured, so started an embedded runner on {url.address} "
                f"(it stops with this kernel; use --runner, --tags or {RUNNER_ENV}=URL to "
                "run elsewhere)."
            )
        assert self._embedded.url is not None
        return self._embedded.url

    def _forget(self, url: ConnectionURL | None) -> None:
        """Drop the sessions with a runner that is gone."""
        for session in [s for s in self._sessions if str(s.url) == str(url)]:
            self._sessions.remove(session)
            with contextlib.suppress(Exception):
                session.close()

    def close(self) -> None:
        """Close every session and stop the embedded runner."""
        with self._lock:
            for session in self._sessions:
                # Best effort: the runner may already be gone.
                with contextlib.suppress(Exception):
                    session.close()
            self._sessions.clear()
            self.attached = self.last = None
            if self._embedded is not None:
                self._embedded.stop()
                self._embedded = None


def _env_url() -> ConnectionURL | None:
    """The runner named by ``$DIDOMAGIC_RUNNER``, if it is set."""
    text = os.environ.get(RUNNER_ENV)
    return _parse_url(text) if text else None


def _parse_url(text: str) -> ConnectionURL:
    if "://" not in text:
        raise ConfigurationError(
            f"{text!r} is not a connection URL. Give the wss://… URL that didomagic-runner "
            "printed when it started, or the name of a configured runner."
        )
    return ConnectionURL.parse(text)


_pool: SessionPool | None = None


def default_pool() -> SessionPool:
    """The process-wide :class:`SessionPool` the magics use.

    It is closed when the process exits normally (a kernel shut down on
    purpose), which ends its remote sessions at once rather than leaving them
    to wait out their grace period.
    """
    global _pool
    if _pool is None:
        _pool = SessionPool()
        atexit.register(_pool.close)
    return _pool


def runners(pool: SessionPool | None = None) -> list[RunnerView]:
    """Every configured runner, and every runner behind a configured mediator, queried now."""
    return (pool or default_pool()).survey()


def add_runner(
    url: str,
    name: str | None = None,
    *,
    client_cert: str | None = None,
    client_key: str | None = None,
    safe_results: bool = False,
) -> Entry:
    """Remember a runner's or mediator's connection URL in the config file (mode 0600).

    Without ``name`` the runner (or mediator) is asked for its own name.
    ``client_cert``/``client_key`` are presented to runners started with
    ``--client-ca``; ``safe_results`` accepts only plain data back from it.
    """
    parsed = _parse_url(url)
    if client_key is not None and client_cert is None:
        raise ConfigurationError("--client-key needs --client-cert (the certificate it goes with).")
    if client_cert is not None:
        for given in (client_cert, client_key):
            if given is not None and not Path(given).expanduser().is_file():
                raise ConfigurationError(
                    f"No such file: {given}. Give the client certificate and key files the "
                    "runner's owner issued (didomagic-runner gen-client-cert writes them)."
                )
        client_cert = str(Path(client_cert).expanduser().resolve())
        client_key = str(Path(client_key).expanduser().resolve()) if client_key else None
        parsed = replace(parsed, client_cert=client_cert, client_key=client_key)
    if safe_results:
        parsed = replace(parsed, safe_results=True)
    if name is None:
        try:
            info, _ = background_loop().run(query(parsed))
            name = info.name or (info.runners[0].get("name") if info.runners else None)
        except ConnectError as exc:
            raise ConfigurationError(
                f"Could not ask {parsed.address} for its name ({exc}). Give one with --name "
                "NAME to add it anyway."
            ) from None
    config = Config()
    return config.add(str(name), parsed)


def remove_runner(name: str) -> Entry:
    """Forget a configured runner or mediator."""
    return Config().remove(name)


def use(runner: str | None, pool: SessionPool | None = None) -> None:
    """Make ``runner`` (a name or URL) where cells without --runner or --tags run."""
    (pool or default_pool()).use(runner)
