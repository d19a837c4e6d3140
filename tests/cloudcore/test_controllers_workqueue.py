"""The runner's work queue (client-go workqueue semantics) and condition helpers."""

from __future__ import annotations

import asyncio

from cloudcore.controllers.conditions import parse_time, set_condition
from cloudcore.controllers.runner import WorkQueue
from edgeweave.kube.client import RetryPolicy
from edgeweave.kube.objects import rfc3339

NOW = 1_700_000_000.0


def test_workqueue_dedupes_and_requeues_dirty_keys() -> None:
    async def main() -> None:
        q = WorkQueue(RetryPolicy(initial_s=0.01, max_s=1.0, jitter=0))
        q.add(("ns", "a"))
        q.add(("ns", "a"))
        q.add(("ns", "b"))
        assert len(q) == 2
        key = await q.get()
        assert key == ("ns", "a")
        q.add(("ns", "a"))  # changed while being processed: not handed out twice ...
        assert await q.get() == ("ns", "b")
        assert len(q) == 0
        q.done(("ns", "a"))  # ... but queued again once done
        assert await asyncio.wait_for(q.get(), 1) == ("ns", "a")
        q.done(("ns", "a"))
        q.done(("ns", "b"))

    asyncio.run(main())


def test_workqueue_delays_and_backoff() -> None:
    async def main() -> None:
        q = WorkQueue(RetryPolicy(initial_s=0.01, factor=2, max_s=0.03, jitter=0))
        assert [q.add_rate_limited(("", "k")) for _ in range(4)] == [0.01, 0.02, 0.03, 0.03]
        q.forget(("", "k"))
        assert q.add_rate_limited(("", "k")) == 0.01
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await asyncio.wait_for(q.get(), 1) == ("", "k")
        assert loop.time() - start < 0.5
        q.done(("", "k"))
        q.add_after(("", "late"), 10)
        q.add_after(("", "late"), 0.01)  # the earlier time wins
        assert await asyncio.wait_for(q.get(), 1) == ("", "late")
        q.close()

    asyncio.run(main())


def test_conditions_keep_transition_time_unless_status_changes() -> None:
    first = set_condition(None, "Ready", "True", "Ok", "fine", now=NOW)
    assert first == [
        {
            "type": "Ready",
            "status": "True",
            "reason": "Ok",
            "message": "fine",
            "lastTransitionTime": rfc3339(NOW),
        }
    ]
    assert set_condition(first, "Ready", "True", "Ok", "fine", now=NOW + 5) == first
    reworded = set_condition(first, "Ready", "True", "Ok", "better", now=NOW + 5)
    assert reworded[0]["lastTransitionTime"] == rfc3339(NOW)
    flipped = set_condition(first, "Ready", "False", "Bad", "down", now=NOW + 9)
    assert flipped[0]["lastTransitionTime"] == rfc3339(NOW + 9)
    touched = set_condition(
        first, "Ready", "True", "Ok", "fine", now=NOW + 7, update_time=True, touch=True
    )
    assert touched[0]["lastUpdateTime"] == rfc3339(NOW + 7)
    assert touched[0]["lastTransitionTime"] == rfc3339(NOW)
    assert parse_time(rfc3339(NOW)) == NOW
    assert parse_time("2024-01-01T00:00:00.5+00:00") == 1704067200.5
    assert parse_time("not a time") is None and parse_time(None) is None
