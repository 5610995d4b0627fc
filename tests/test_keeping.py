"""The runner's registry of kept sessions and its output log, on their own (no sockets)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from runner.keeping import ENDED_KEPT, OutputLog, SessionGone, SessionRegistry


@dataclass
class Fake:
    id: str
    owner: str
    ticket: str


def test_the_log_drops_the_oldest_beyond_its_limit_and_replays_from_a_number():
    log = OutputLog(limit=10)
    for text in ("aaaa", "bbbb", "cccc", "dddd"):
        log.add(text)
    assert log.first == 2 and list(log.entries) == ["cccc", "dddd"]
    assert log.since(3) == (3, ["dddd"])
    assert log.since(0) == (2, ["cccc", "dddd"])  # 0 and 1 were dropped: resume at 2
    assert log.since(4) == (4, [])
    log.add("x" * 50)  # one output over the limit is still kept
    assert list(log.entries) == ["x" * 50]
    log.reset()
    assert log.since(0) == (0, [])


def test_only_the_right_ticket_and_identity_claim_a_session_and_all_else_reads_the_same():
    registry = SessionRegistry("r")
    session = Fake(registry.new_id(), "owner-a", "ticket-a")
    registry.add(session)
    assert registry.claim(session.id, "ticket-a", "owner-a") is session
    answers = set()
    for ticket, owner, sid in (
        ("ticket-a", "owner-b", session.id),
        ("wrong", "owner-a", session.id),
        ("ticket-a", "", session.id),
        ("ticket-a", "owner-a", registry.new_id()),
    ):
        with pytest.raises(SessionGone) as info:
            registry.claim(sid, ticket, owner)
        answers.add(str(info.value).replace(sid, "ID"))
    assert len(answers) == 1 and "holds no session" in answers.pop()
    assert registry.of("owner-a") == [session] and registry.of("owner-b") == []
    assert registry.of("") == []


def test_an_ended_session_says_when_and_why_to_its_own_client_only():
    registry = SessionRegistry("r")
    session = Fake(registry.new_id(), "o", "t")
    registry.add(session)
    registry.remove(session, "no client reattached within its grace period")
    with pytest.raises(SessionGone, match=r"ended at .* UTC \(no client reattached.*gone"):
        registry.claim(session.id, "t", "o")
    with pytest.raises(SessionGone, match="holds no session"):
        registry.claim(session.id, "t", "someone else")


def test_a_session_of_an_earlier_run_names_the_restart():
    earlier, now = SessionRegistry("r"), SessionRegistry("r")
    with pytest.raises(SessionGone, match=r"Runner r was restarted at .* UTC"):
        now.claim(earlier.new_id(), "t", "o")


def test_the_record_of_ended_sessions_is_bounded():
    registry = SessionRegistry("r")
    for _ in range(ENDED_KEPT + 5):
        session = Fake(registry.new_id(), "o", "t")
        registry.add(session)
        registry.remove(session, "closed")
    assert len(registry._ended) == ENDED_KEPT and not registry.open
