"""Crash safety: every acknowledged write survives kill -9, and the history stays gap-free.

A child process writes in a loop (creates, updates and deletes, single writes and batches) and
prints each acknowledged resourceVersion after the write returned. The test SIGKILLs it in the
middle of the burst, reopens the store and checks that every acknowledged write is there, that
the history holds every revision exactly once, and that a watcher resuming from any acknowledged
revision sees exactly the changes after it, in order.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from edgeweave.kube.resources import CONFIGMAPS
from edgeweave.kube.store import Store

WRITER = r"""
import sys
from edgeweave.kube.resources import CONFIGMAPS
from edgeweave.kube.store import Store

store = Store(sys.argv[1])
out = sys.stdout
i = 0
while True:
    name = f"cm-{i}"
    made = store.create(CONFIGMAPS, {"metadata": {"name": name}, "data": {"i": str(i)}},
                        namespace="default")
    out.write(f"ack ADDED {name} {made['metadata']['resourceVersion']}\n")
    if i % 3 == 2:
        prev = f"cm-{i - 1}"
        upd = store.update(CONFIGMAPS, {"metadata": {"name": prev}, "data": {"i": "updated"}},
                           namespace="default")
        out.write(f"ack MODIFIED {prev} {upd['metadata']['resourceVersion']}\n")
    if i % 5 == 4:
        gone = store.delete(CONFIGMAPS, f"cm-{i - 4}", namespace="default")
        out.write(f"ack DELETED cm-{i - 4} {gone.object['metadata']['resourceVersion']}\n")
    if i % 7 == 6:
        with store.transaction():
            a = store.create(CONFIGMAPS, {"metadata": {"name": f"batch-{i}-a"}},
                             namespace="default")
            b = store.create(CONFIGMAPS, {"metadata": {"name": f"batch-{i}-b"}},
                             namespace="default")
        out.write(f"ack ADDED batch-{i}-a {a['metadata']['resourceVersion']}\n")
        out.write(f"ack ADDED batch-{i}-b {b['metadata']['resourceVersion']}\n")
    out.flush()
    i += 1
"""


def _run_and_kill(path: Path, acks_wanted: int) -> list[tuple[str, str, int]]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[3]))
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert child.stdout is not None
    lines: list[bytes] = []
    deadline = time.monotonic() + 20
    try:
        while len(lines) < acks_wanted and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            lines.append(line)
        os.kill(child.pid, signal.SIGKILL)  # in the middle of the burst
        rest, err = child.communicate(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL, err.decode(errors="replace")
    lines += rest.splitlines(keepends=True)
    acks = []
    for raw in lines:
        text = raw.decode()
        if not text.endswith("\n"):
            continue  # torn last line: never fully acknowledged to us
        _, kind, name, rev = text.split()
        acks.append((kind, name, int(rev)))
    assert len(acks) >= acks_wanted
    return acks


def test_acknowledged_writes_survive_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "kube.db"
    acks = _run_and_kill(path, acks_wanted=1500)
    with Store(path) as store:
        assert store.revision >= max(rev for _, _, rev in acks)
        events = store.events_since(0, limit=1_000_000).events
        revs = [e.revision for e in events]
        assert revs == list(range(1, store.revision + 1))  # no gaps, no duplicates
        by_rev = {e.revision: e for e in events}
        last_ack: dict[str, tuple[str, int]] = {}
        for kind, name, rev in acks:
            event = by_rev[rev]
            assert (event.type, event.name) == (kind, name)
            last_ack[name] = (kind, rev)
        current = {o["metadata"]["name"]: o for o in store.list_objects(CONFIGMAPS).objects()}
        for name, (kind, rev) in last_ack.items():
            if kind == "DELETED":
                assert name not in current
            elif name in current:
                assert int(current[name]["metadata"]["resourceVersion"]) >= rev
            else:  # deleted by a later write that was durable before its ack line was printed
                assert any(e.type == "DELETED" and e.name == name and e.revision > rev
                           for e in events), f"{name} (acknowledged at {rev}) is gone"
        # a watcher that had seen up to any acknowledged revision resumes exactly after it
        for _, _, rev in acks[:: max(1, len(acks) // 20)]:
            cursor = store.watch(None, resource_version=rev)
            seen = []
            while batch := cursor.poll(limit=97):
                seen += [e.revision for e in batch]
            assert seen == list(range(rev + 1, store.revision + 1))
        # and the store keeps working where it stopped
        made = store.create(CONFIGMAPS, {"metadata": {"name": "after"}}, namespace="default")
        assert int(made["metadata"]["resourceVersion"]) == revs[-1] + 1
