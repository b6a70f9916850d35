"""The admission queue's order and bounds (service/policy/fair_queue.py; pure, no servers)."""

from __future__ import annotations

import pytest

from service.policy.fair_queue import FairQueue


def drain(queue: FairQueue[str]) -> list[str]:
    out = []
    while (item := queue.pop()) is not None:
        out.append(item)
    return out


def test_keys_are_served_in_turn_not_in_arrival_order() -> None:
    queue: FairQueue[str] = FairQueue(100)
    for i in range(5):
        queue.push("noisy", f"n{i}")
    queue.push("victim", "v0")
    queue.push("other", "o0")
    assert drain(queue) == ["n0", "v0", "o0", "n1", "n2", "n3", "n4"]
    assert len(queue) == 0


def test_a_key_behind_a_backlog_waits_one_turn_per_key() -> None:
    queue: FairQueue[str] = FairQueue(100)
    for i in range(40):
        queue.push("noisy", f"n{i}")
    assert queue.pop() == "n0"
    queue.push("victim", "v0")
    assert [queue.pop(), queue.pop()] == ["n1", "v0"]


def test_one_key_alone_is_first_in_first_out() -> None:
    queue: FairQueue[int] = FairQueue(10)
    for i in range(5):
        assert queue.push("k", i) is None
    assert [queue.pop() for _ in range(5)] == [0, 1, 2, 3, 4]
    assert queue.pop() is None


def test_full_queue_displaces_the_newest_waiter_of_the_longest_backlog() -> None:
    queue: FairQueue[str] = FairQueue(4)
    for item in ("n0", "n1", "n2"):
        queue.push("noisy", item)
    queue.push("quiet", "q0")
    assert queue.push("victim", "v0") == "n2"
    assert len(queue) == 4
    assert drain(queue) == ["n0", "q0", "v0", "n1"]


def test_full_queue_refuses_a_newcomer_whose_key_has_the_longest_backlog() -> None:
    queue: FairQueue[str] = FairQueue(3)
    for item in ("n0", "n1"):
        queue.push("noisy", item)
    queue.push("quiet", "q0")
    assert queue.push("noisy", "n2") == "n2"
    assert queue.backlog("noisy") == 2
    queue.pop()  # n0: now noisy and quiet have one each
    queue.push("victim", "v0")
    assert queue.push("quiet", "q1") == "q1"  # tied with the longest: the newcomer is refused
    assert drain(queue) == ["q0", "n1", "v0"]


def test_zero_capacity_refuses_everything() -> None:
    queue: FairQueue[str] = FairQueue(0)
    assert queue.push("k", "a") == "a"
    assert len(queue) == 0
    with pytest.raises(ValueError):
        FairQueue(-1)


def test_remove_takes_out_a_waiter_that_gave_up() -> None:
    queue: FairQueue[str] = FairQueue(10)
    queue.push("a", "a0")
    queue.push("b", "b0")
    queue.push("a", "a1")
    assert queue.remove("a", "a0")
    assert not queue.remove("a", "a0")
    assert not queue.remove("c", "x")
    assert queue.backlog("a") == 1
    assert drain(queue) == ["a1", "b0"]  # "a" keeps its turn: it was not served
    queue.push("b", "b1")
    assert queue.remove("b", "b1") and len(queue) == 0 and queue.pop() is None
