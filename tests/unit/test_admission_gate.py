"""The admission gate (service/answer/admission.py) in one event loop: no servers, no sleeps.

Tasks hold their slot until an `asyncio.Event` lets them go, so every order below is decided
by the gate alone, never by timing.
"""

from __future__ import annotations

import asyncio

import pytest

from service.answer.admission import AdmissionGate
from service.errors import AdmissionRefused, Overloaded


async def until(condition: object) -> None:
    """Let other tasks run until `condition()` holds (they only need a few turns of the loop)."""
    for _ in range(1000):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


class Holder:
    """A request that takes a slot under `key`, notes its admission, and holds the slot until let go."""

    def __init__(self, gate: AdmissionGate, key: str, name: str, admitted: list[str]) -> None:
        self.go = asyncio.Event()
        self.task = asyncio.create_task(self._run(gate, key, name, admitted))

    async def _run(self, gate: AdmissionGate, key: str, name: str, admitted: list[str]) -> None:
        async with gate.slot(key):
            admitted.append(name)
            await self.go.wait()


async def test_at_most_slots_run_and_a_freed_slot_goes_to_the_next_waiter() -> None:
    gate = AdmissionGate(2, queue=10, wait_s=60)
    admitted: list[str] = []
    holders = [Holder(gate, "k", f"r{i}", admitted) for i in range(3)]
    await until(lambda: gate.waiting == 1)
    assert admitted == ["r0", "r1"] and gate.running == 2
    holders[0].go.set()
    await until(lambda: admitted == ["r0", "r1", "r2"])
    for holder in holders:
        holder.go.set()
    await asyncio.gather(*(h.task for h in holders))
    assert gate.running == 0 and gate.waiting == 0


async def test_a_victim_key_is_admitted_before_a_noisy_keys_backlog() -> None:
    gate = AdmissionGate(1, queue=100, wait_s=60)
    admitted: list[str] = []
    holders = [Holder(gate, "noisy", f"n{i}", admitted) for i in range(6)]
    await until(lambda: gate.waiting == 5)
    holders.append(Holder(gate, "victim", "v", admitted))
    await until(lambda: gate.waiting == 6)
    by_name = dict(zip([f"n{i}" for i in range(6)] + ["v"], holders, strict=True))
    for done in range(1, 8):  # let the running one finish, one at a time
        await until(lambda: len(admitted) == done)  # noqa: B023
        by_name[admitted[-1]].go.set()
    await asyncio.gather(*(h.task for h in holders))
    # The victim waits one turn of the noisy key (first in the rotation), not its whole backlog.
    assert admitted == ["n0", "n1", "v", "n2", "n3", "n4", "n5"]


async def test_past_the_wait_budget_the_request_is_refused_with_retry_after() -> None:
    waits: list[float] = []
    gate = AdmissionGate(1, queue=10, wait_s=0.01, on_wait=waits.append)
    admitted: list[str] = []
    holder = Holder(gate, "k", "r0", admitted)
    await until(lambda: admitted == ["r0"])
    with pytest.raises(AdmissionRefused) as refused:
        async with gate.slot("other"):
            pytest.fail("admitted without a free slot")
    assert refused.value.code == "overloaded" and refused.value.retry_after == 1
    assert gate.waiting == 0 and len(waits) == 2
    holder.go.set()
    await holder.task
    assert gate.running == 0


async def test_a_full_queue_displaces_the_longest_backlog_or_refuses_its_own_key() -> None:
    gate = AdmissionGate(1, queue=2, wait_s=60)
    admitted: list[str] = []
    first = Holder(gate, "noisy", "n0", admitted)
    queued = [Holder(gate, "noisy", f"n{i}", admitted) for i in (1, 2)]
    await until(lambda: gate.waiting == 2)
    with pytest.raises(Overloaded):  # its own key has the longest backlog: refused at once
        async with gate.slot("noisy"):
            pass
    victim = Holder(gate, "victim", "v", admitted)
    await until(lambda: queued[1].task.done())
    assert isinstance(queued[1].task.exception(), Overloaded)  # the newest noisy waiter made room
    for holder in (first, queued[0], victim):
        holder.go.set()
    await asyncio.gather(first.task, queued[0].task, victim.task)
    assert admitted == ["n0", "n1", "v"]
    assert gate.running == 0 and gate.waiting == 0


async def test_a_cancelled_waiter_leaves_the_queue_and_no_slot_leaks() -> None:
    gate = AdmissionGate(1, queue=10, wait_s=60)
    admitted: list[str] = []
    first = Holder(gate, "a", "a0", admitted)
    gone = Holder(gate, "b", "b0", admitted)
    await until(lambda: gate.waiting == 1)
    gone.task.cancel()
    await until(lambda: gate.waiting == 0)
    first.go.set()
    await first.task
    assert gate.running == 0
    late = Holder(gate, "c", "c0", admitted)
    await until(lambda: admitted == ["a0", "c0"])
    late.go.set()
    await late.task


async def test_zero_slots_is_off() -> None:
    gate = AdmissionGate(0, queue=0, wait_s=0)
    async with gate.slot("k") as waited, gate.slot("k"), gate.slot("k"):
        assert waited == 0.0
