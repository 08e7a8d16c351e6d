"""What every scenario shares: its description (name, benign or attack,
tool), the run context (port, clock, profile) and pacing helpers."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable


@dataclass(frozen=True)
class Profile:
    name: str
    duration: float
    app_users: int
    office_users: int
    mobile_devices: int
    roaming_users: int
    partner_rps: float
    distributed_addresses: int
    attack_start: float  # seconds after the start: benign logins first set the login baseline
    flood_s: int
    browser_stuffing_addresses: int = 600
    disguised_addresses: int = 300
    returning_users: int = 60
    first_time_logins: int = 40
    cgnat_phones: int = 120
    account_owners: int = 30
    takeovers: int = 10
    coupon_shoppers: int = 40


PROFILES = {
    "default": Profile("default", 120, app_users=500, office_users=100, mobile_devices=150, roaming_users=20,
                       partner_rps=50, distributed_addresses=600, attack_start=20, flood_s=10,
                       browser_stuffing_addresses=600, disguised_addresses=300, returning_users=60, first_time_logins=40, cgnat_phones=120),
    "quick": Profile("quick", 35, app_users=80, office_users=100, mobile_devices=30, roaming_users=6,
                     partner_rps=50, distributed_addresses=300, attack_start=8, flood_s=10,
                     browser_stuffing_addresses=300, disguised_addresses=150, returning_users=20, first_time_logins=12, cgnat_phones=120,
                     account_owners=12, takeovers=6, coupon_shoppers=15),
}


@dataclass
class Ctx:
    port: int
    out_dir: Path
    profile: Profile
    duration: float
    seed: int
    t0: float = field(default_factory=time.monotonic)
    shared: dict = field(default_factory=dict)  # e.g. the stolen token, handed from owner to thief
    notes: dict = field(default_factory=dict)   # scenario -> free-text notes for the report

    @property
    def attack_start(self) -> float:
        return min(self.profile.attack_start, self.duration * 0.3)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.duration - self.now()

    async def at(self, t: float):
        """Sleeps until `t` seconds after the start."""
        await asyncio.sleep(max(0.0, t - self.now()))

    def rng(self, name: str) -> random.Random:
        return random.Random(f"{self.seed}/{name}")

    def future(self, key: str) -> asyncio.Future:
        if key not in self.shared:
            self.shared[key] = asyncio.get_running_loop().create_future()
        return self.shared[key]


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "benign" | "attack"
    tool: str
    what: str
    run: Callable[[Ctx], Awaitable[None]]
    single_source: bool = False  # one attacking address: the "blocked within 20 requests" target
    per_client: bool = False  # several attackers in one row, each with the "blocked within 20" target
    told_not_blocked: bool = False  # an attack the filter tells the application about (it decides), never blocks
    planned_clients: Callable[[Profile], int] = lambda p: 1
    # Stays under every rule on purpose: its target is to be flagged by the
    # anomaly model (tagged or blocked through the scorer), not blocked.
    model_target: bool = False
    # Only its login attempts are scored (its page views are the disguise:
    # counted apart, never "attempts").
    logins_only: bool = False


async def gather_bounded(ctx: Ctx, coros: list[Awaitable], slack: float = 20.0):
    """Runs the clients of one scenario; none outlives the run."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    done, pending = await asyncio.wait(tasks, timeout=max(1.0, ctx.left() + slack))
    for t in pending:
        t.cancel()
    for t in done:
        if t.exception() is not None:
            raise t.exception()
