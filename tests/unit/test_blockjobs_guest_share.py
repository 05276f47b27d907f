"""``blockjobs.GuestShare`` and ``follow(share=...)``: a live merge's job yields to the guest's
writes (held to ``GUEST_SHARE_SPEED`` while the guest writes, full speed once it has been quiet),
against a fake machine whose ``query-blockstats`` the test drives."""

from __future__ import annotations

import asyncio
from typing import Any

from waymark.qemu import blockjobs

MIB = 1024 * 1024


def test_a_quiet_guest_leaves_the_job_at_full_speed() -> None:
    share = blockjobs.GuestShare()
    assert not share.yields(10 * MIB, 0.0)  # the first reading is only a baseline
    assert not share.yields(10 * MIB, 0.05)
    assert not share.yields(10 * MIB + blockjobs.GUEST_BUSY_BYTES - 1, 0.1)  # a trickle


def test_the_job_yields_while_the_guest_writes_and_until_it_has_been_quiet() -> None:
    share = blockjobs.GuestShare()
    share.yields(0, 0.0)
    assert share.yields(4 * MIB, 0.05)
    assert share.yields(4 * MIB, 0.05 + blockjobs.GUEST_QUIET / 2)  # quiet, not long enough
    assert not share.yields(4 * MIB, 0.05 + blockjobs.GUEST_QUIET)
    assert share.yields(8 * MIB, 1.0 + blockjobs.GUEST_QUIET)  # writing again


class FakeMachine:
    """A job running for ``polls`` polls, then concluded; the guest's bytes written go up by
    ``writes[i]`` at poll i. Remembers the speeds set."""

    label = "fake"

    def __init__(self, writes: list[int]) -> None:
        self.writes = writes
        self.polls = 0
        self.written = 0
        self.speeds: list[int] = []

    async def command(self, name: str, /, **arguments: Any) -> Any:
        if name == "query-jobs":
            self.polls += 1
            status = "running" if self.polls <= len(self.writes) else "concluded"
            return [{"id": "j", "status": status, "current-progress": self.polls,
                     "total-progress": 100}]
        if name == "query-blockstats":
            self.written += self.writes[self.polls - 1]
            return [{"device": "", "qdev": "disk0", "stats": {"wr_bytes": self.written}},
                    {"device": "", "qdev": "cd0", "stats": {}}]
        if name == "block-job-set-speed":
            assert arguments["device"] == "j"
            self.speeds.append(arguments["speed"])
        return {}


def follow(machine: FakeMachine, speed: int | None) -> None:
    asyncio.run(blockjobs.follow(machine, "j", None,  # type: ignore[arg-type]
                                 share=blockjobs.GuestShare(), speed=speed))


def test_follow_throttles_the_job_while_the_guest_writes_and_lifts_it_after(
        monkeypatch: Any) -> None:
    monkeypatch.setattr(blockjobs, "POLL", 0.01)
    monkeypatch.setattr(blockjobs, "GUEST_QUIET", 0.05)
    machine = FakeMachine([0, 0, MIB, MIB, 0, *[0] * 20])
    follow(machine, speed=0)
    assert machine.speeds == [blockjobs.GUEST_SHARE_SPEED, 0]


def test_a_resumed_job_of_unknown_speed_gets_it_set() -> None:
    machine = FakeMachine([0, 0])
    follow(machine, speed=None)  # Waymark died while the job was held: lift it
    assert machine.speeds == [0]


def test_a_job_of_an_idle_guest_is_never_touched() -> None:
    machine = FakeMachine([0, 100, 0])
    follow(machine, speed=0)
    assert machine.speeds == []
