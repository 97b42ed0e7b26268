"""The fault schedule: kill -9 a random processor every few seconds and restart it; once each, a zombie
(SIGSTOP past the session timeout, then SIGCONT), a lost disk (kill -9, data dir deleted, restart)
and a broker kill -9 and restart. One fault at a time, so each can be told apart in the logs.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.chaos.cluster import Cluster, Processor, poll_until
from tests.chaos.workload import now_ms

SESSION_TIMEOUT_S = 10.0  # the processor's consumer session timeout (consumers/processor.py)
ZOMBIE_EXTRA_S = 4.0
# When the special faults happen, as fractions of the fault phase.
SPECIALS = ((0.2, "zombie"), (0.45, "lost_disk"), (0.65, "broker"))
AFTER_SPECIAL_S = 4.0


@dataclass
class FaultLog:
    """What was done, when (wall-clock ms), for the figures and for explaining failed sends."""

    kills: int = 0
    zombies: int = 0
    lost_disks: int = 0
    broker_kills: int = 0
    unexpected_exits: list[str] = field(default_factory=list)
    timeline: list[str] = field(default_factory=list)
    broker_outages: list[tuple[int, int]] = field(default_factory=list)
    zombie_logs: list[tuple[Processor, int]] = field(default_factory=list)
    wiped_logs: list[tuple[Processor, int]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.kills + self.zombies + self.lost_disks + self.broker_kills


class Faults:
    """Runs the schedule against a cluster; `say` prints a timeline line as each fault happens."""

    def __init__(
        self, cluster: Cluster, rng: random.Random, kill_every: tuple[float, float], say: Callable[[str], None]
    ) -> None:
        self.cluster = cluster
        self.rng = rng
        self.kill_every = kill_every
        self.say = say
        self.log = FaultLog()
        self.began = time.monotonic()

    def note(self, text: str) -> None:
        line = f"t={time.monotonic() - self.began:6.1f}s {text}"
        self.log.timeline.append(line)
        self.say(line)

    async def run(self, progress: Callable[[], float], stop: asyncio.Event) -> None:
        """Faults until the phase is 90 % done (`progress`: 0 to 1, by time or commands, or `stop`);
        the specials at fixed points of it, so a run cut short by its command limit still has them."""
        specials = list(SPECIALS)
        next_kill = self.began + self.rng.uniform(*self.kill_every)
        while not stop.is_set():
            self.watch()
            done = progress()
            if done > 0.9:
                break
            if specials and done >= specials[0][0]:
                await self.special(specials.pop(0)[1])
                # A few calm seconds, so the next fault lands on a group that absorbed this one.
                await asyncio.sleep(AFTER_SPECIAL_S)
                next_kill = time.monotonic() + self.rng.uniform(*self.kill_every)
            elif time.monotonic() >= next_kill:
                await self.kill()
                next_kill = time.monotonic() + self.rng.uniform(*self.kill_every)
            else:
                await asyncio.sleep(0.2)

    def watch(self) -> None:
        """A processor that exited on its own is a violation; restart it so the run goes on."""
        for processor in self.cluster.unexpected_exits():
            assert processor.process is not None
            detail = f"{processor.name} exited with {processor.process.returncode}:\n{processor.tail()}"
            self.log.unexpected_exits.append(detail)
            self.note(f"UNEXPECTED EXIT of {processor.name} (code {processor.process.returncode}); restarting")
            processor.start()

    def victim(self) -> Processor | None:
        live = self.cluster.live()
        return self.rng.choice(live) if live else None

    async def kill(self) -> None:
        victim = self.victim()
        if victim is None:
            return
        victim.kill9()
        self.log.kills += 1
        pause = self.rng.uniform(0.2, 2.0)
        self.note(
            f"kill -9 {victim.name} (pid {victim.process.pid if victim.process else '?'}); restart in {pause:.1f}s"
        )
        await asyncio.sleep(pause)
        victim.start()

    async def special(self, kind: str) -> None:
        await {"zombie": self.zombie, "lost_disk": self.lost_disk, "broker": self.broker}[kind]()

    async def zombie(self) -> None:
        """SIGSTOP past the session timeout: the group moves its partitions, the new owners fence it.

        The victim is taken from a settled group and owns partitions, so it is frozen with work in
        hand (a transaction open, most likely) rather than in the middle of a rebalance.
        """
        await poll_until(self.cluster.settled, 45)
        owners = [p for p in self.cluster.live() if p.owned()]
        if not owners or len(self.cluster.live()) < 2:
            self.note("zombie skipped: no processor owns partitions")
            return
        victim = self.rng.choice(owners)
        pause = SESSION_TIMEOUT_S + ZOMBIE_EXTRA_S
        log_size = victim.log.stat().st_size
        victim.freeze()
        self.log.zombies += 1
        partitions = sorted(victim.owned())
        self.note(f"SIGSTOP {victim.name} (owning partitions {partitions}) for {pause:.0f}s, past the session timeout")
        await asyncio.sleep(pause)
        victim.thaw()
        self.log.zombie_logs.append((victim, log_size))
        self.note(f"SIGCONT {victim.name}: a zombie whose open transactions must be fenced")

    async def lost_disk(self) -> None:
        victim = self.victim()
        if victim is None:
            return
        victim.kill9()
        victim.wipe()
        self.log.lost_disks += 1
        self.log.wiped_logs.append((victim, victim.log.stat().st_size))
        self.note(f"kill -9 {victim.name} and delete its data dir {victim.data_dir}; restart (restore from changelog)")
        await asyncio.sleep(self.rng.uniform(0.2, 1.0))
        victim.start()

    async def broker(self) -> None:
        began = now_ms()
        await self.cluster.broker.kill9()
        self.log.broker_kills += 1
        self.note("kill -9 the broker")
        await asyncio.sleep(self.rng.uniform(1.0, 3.0))
        took = await self.cluster.broker.start()
        self.log.broker_outages.append((began, now_ms()))
        self.note(
            f"broker restarted on the same data (ready after {took:.1f}s); outage {(now_ms() - began) / 1000:.1f}s"
        )
