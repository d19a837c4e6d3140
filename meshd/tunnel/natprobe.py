"""The agent's background NAT classification: `meshd netcheck` (RFC 5780 §4) against the tunnel's
STUN server, whose result the control channel publishes (`nat`), so peers and metrics know
every node's NAT class.

`NatProbeSchedule` decides when to run (sans-I/O, `now` in, next deadline out):

    start --first_delay_s--> run --ok--> idle --reflexive address changed--> run (at most one
                               \\                                             per min_interval_s)
                                \\--failed--> retry after retry_s, doubling to max_retry_s

The first run starts `first_delay_s` after the tunnel, from sockets of its own: the tunnel's
first byte never waits for it. A change of the tunnel's server-reflexive address (a new NAT, a
lost mapping, a moved node) asks for a new run; changes while a run is under way or within
`min_interval_s` of the last start are merged into one run at the end of that interval.

`NatProber` is its asyncio adapter: one timer, one task running `run_netcheck`, and
`on_result(summary)` with what was learnt. A server without an RFC 5780 alternate address
(one `stun.addresses` entry) cannot show mapping or filtering behaviour: the summary then says
`unknown` with `mapping`/`filtering` absent, and is still published (the node did run it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from edgeweave.log import event
from meshd.control.wire import NatSummary
from meshd.netcheck.classify import NetcheckReport
from meshd.netcheck.machine import NetcheckFailed
from meshd.netcheck.runner import run_netcheck
from meshd.stun.transaction import RetransmitPolicy
from meshd.udp import Address, BindError, format_address

log = logging.getLogger("meshd.tunnel")


@dataclass(frozen=True)
class NatProbeConfig:
    """When the agent classifies its NAT."""

    first_delay_s: float = 0.5
    """After the tunnel starts (its own STUN query and allocation go first)."""
    min_interval_s: float = 60.0
    """Between two runs' starts, whatever the reflexive address does."""
    retry_s: float = 30.0
    """After a failed run (the STUN server did not answer test I)."""
    max_retry_s: float = 600.0
    """Longest delay between failed runs."""
    policy: RetransmitPolicy = field(default_factory=RetransmitPolicy)
    """STUN retransmissions of each probe (a run lasts about `policy.give_up_s`)."""

    def __post_init__(self) -> None:
        if self.first_delay_s < 0 or min(self.min_interval_s, self.retry_s) <= 0:
            raise ValueError("firstDelayS >= 0, minIntervalS and retryS > 0")
        if self.max_retry_s < self.retry_s:
            raise ValueError("maxRetryS must be at least retryS")


def summary_of(report: NetcheckReport) -> NatSummary:
    """What the control channel publishes of a netcheck report: what was learnt, nothing more
    (behaviours it could not test stay absent)."""
    return NatSummary(report.nat_type.value,
                      report.mapping.value if report.mapping is not None else None,
                      report.filtering.value if report.filtering is not None else None)


class NatProbeSchedule:
    """When to run the NAT classification; see the module doc."""

    def __init__(self, config: NatProbeConfig, now: float) -> None:
        self.config = config
        self.running = False
        """A run is under way."""
        self.runs = 0
        """Runs started."""
        self.failures = 0
        """Consecutive failed runs."""
        self.reflexive: Address | None = None
        """The tunnel's server-reflexive address as last told."""
        self._due: float | None = now + config.first_delay_s
        self._last_start: float | None = None
        self._again = False  # a change arrived while running

    def get_timer(self) -> float | None:
        """When the next run should start (None: none is due, or one is running)."""
        return None if self.running else self._due

    def due(self, now: float) -> bool:
        """A run should start now."""
        return not self.running and self._due is not None and now >= self._due

    def started(self, now: float) -> None:
        """The adapter started a run."""
        self.running, self._due, self._again = True, None, False
        self._last_start = now
        self.runs += 1

    def finished(self, ok: bool, now: float) -> None:
        """The run ended (ok: classified, even partly; else test I got no answer)."""
        self.running = False
        if not ok:
            cfg = self.config
            self.failures += 1
            delay = min(cfg.max_retry_s, cfg.retry_s * 2 ** (self.failures - 1))
            self._due = now + delay
            return
        self.failures = 0
        self._due = self._after_interval(now) if self._again else None

    def reflexive_changed(self, address: Address, now: float) -> bool:
        """The tunnel learnt its server-reflexive address; True when this asks for a run (the
        first address is the one the first run sees anyway)."""
        first, changed = self.reflexive is None, address != self.reflexive
        self.reflexive = address
        if first or not changed:
            return False
        if self.running:
            self._again = True
        elif self._due is None or self.failures:
            self._due = self._after_interval(now)
        return True

    def _after_interval(self, now: float) -> float:
        if self._last_start is None:
            return now
        return max(now, self._last_start + self.config.min_interval_s)


class NatProber:
    """Runs `NatProbeSchedule` on the event loop: netcheck from `bind_ip` against `server`,
    results to `on_result`."""

    def __init__(self, server: Address, bind_ip: str, on_result: Callable[[NatSummary], None],
                 config: NatProbeConfig | None = None) -> None:
        self.server, self.bind_ip = server, bind_ip
        self.config = config or NatProbeConfig()
        self.last: NatSummary | None = None
        """The latest classification."""
        self.last_error: str | None = None
        """Why the latest run failed (None after a success)."""
        self._on_result = on_result
        self._loop = asyncio.get_running_loop()
        self.schedule = NatProbeSchedule(self.config, self._loop.time())
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._rearm()

    def reflexive_changed(self, address: Address) -> None:
        """The tunnel's server-reflexive address is now `address`."""
        if self._closed:
            return
        if self.schedule.reflexive_changed(address, self._loop.time()):
            event(log, logging.INFO, "tunnel.nat_recheck", reflexive=format_address(address),
                  at=f"{(self.schedule.get_timer() or self._loop.time()) - self._loop.time():.1f}")
        self._rearm()

    async def close(self) -> None:
        """Stop: no more runs; a run under way is cancelled."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _rearm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.schedule.get_timer()
        if deadline is not None and not self._closed:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed or not self.schedule.due(self._loop.time()):
            self._rearm()
            return
        self.schedule.started(self._loop.time())
        self._task = self._loop.create_task(self._run())

    async def _run(self) -> None:
        ok = False
        try:
            report = await run_netcheck(self.server, bind_ip=self.bind_ip,
                                        policy=self.config.policy)
        except (NetcheckFailed, BindError, OSError) as exc:
            self.last_error = str(exc)
            event(log, logging.WARNING, "tunnel.nat_failed", server=format_address(self.server),
                  error=exc, failures=self.schedule.failures + 1)
        else:
            ok, self.last_error = True, None
            summary = self.last = summary_of(report)
            event(log, logging.INFO, "tunnel.nat", nat_type=summary.nat_type,
                  mapping=summary.mapping or "-", filtering=summary.filtering or "-",
                  public=format_address(report.public), notes="; ".join(report.notes) or "-")
            try:
                self._on_result(summary)
            except Exception as exc:  # the application's bug must not stop the schedule
                event(log, logging.ERROR, "tunnel.nat_handler_failed", error=repr(exc))
        finally:
            if not self._closed:
                self.schedule.finished(ok, self._loop.time())
                self._task = None
                self._rearm()
