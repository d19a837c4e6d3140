"""Crash safety over the API, and cloudcore against another cluster through `--kubeconfig`.

kill -9 during a burst of HTTPS writes: after a restart every write that got a 2xx is there, and
a watch resumed from before the burst sees every acknowledged write exactly once, in order.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cloudcore_daemon import Cloudcore, free_port, wait_for

from edgeweave.kube.client import KubeClient
from edgeweave.kube.resources import CONFIGMAPS, NODEGROUPS, NODES


async def burst(client: KubeClient, acked: list[str], stop_after: float) -> None:
    """Create ConfigMaps 8 at a time until the server dies; record each acknowledged name."""
    counter = iter(range(1_000_000))
    deadline = time.monotonic() + stop_after

    async def writer() -> None:
        while time.monotonic() < deadline:
            name = f"burst-{next(counter)}"
            try:
                await client.create(CONFIGMAPS, {"metadata": {"name": name}, "data": {"k": name}},
                                    namespace="default")
            except Exception:
                return  # the server is gone
            acked.append(name)

    await asyncio.gather(*(writer() for _ in range(8)))


def test_kill_9_during_write_burst(tmp_path: Path) -> None:
    cc = Cloudcore(tmp_path / "cc")
    try:
        cc.start()

        async def before() -> str:
            client = KubeClient.from_kubeconfig(cc.data / "admin.kubeconfig")
            try:
                listed = await client.list(CONFIGMAPS, namespace="default")
                return listed.resource_version
            finally:
                await client.close()

        start_rv = asyncio.run(before())
        acked: list[str] = []

        async def write_then_kill() -> None:
            client = KubeClient.from_kubeconfig(cc.data / "admin.kubeconfig")
            try:
                task = asyncio.create_task(burst(client, acked, stop_after=20))
                await asyncio.sleep(1.5)
                assert cc.proc is not None
                os.kill(cc.proc.pid, signal.SIGKILL)
                await task
            finally:
                await client.close()

        asyncio.run(write_then_kill())
        assert cc.proc is not None
        cc.proc.wait()
        print(f"{len(acked)} writes acknowledged before kill -9")
        assert len(acked) > 20
        cc.start()

        async def check() -> None:
            client = KubeClient.from_kubeconfig(cc.data / "admin.kubeconfig")
            try:
                stored = {o["metadata"]["name"] for o in
                          (await client.list(CONFIGMAPS, namespace="default")).items}
                missing = set(acked) - stored
                assert not missing, f"acknowledged but lost: {sorted(missing)[:5]}"
                burst_names = {n for n in stored if n.startswith("burst-")}
                seen: list[str] = []
                revisions: list[int] = []
                async with asyncio.timeout(30):
                    watch = client.watch(CONFIGMAPS, namespace="default",
                                         resource_version=start_rv, reconnect=False)
                    async for ev in watch:
                        if ev.type == "BOOKMARK":
                            continue
                        name = ev.object["metadata"]["name"]
                        if name.startswith("burst-"):
                            seen.append(name)
                            revisions.append(int(ev.object["metadata"]["resourceVersion"]))
                        if set(seen) >= burst_names:
                            break
                assert len(seen) == len(set(seen)), "a write was delivered twice"
                assert revisions == sorted(revisions)
                assert set(acked) <= set(seen)
            finally:
                await client.close()

        asyncio.run(check())
    finally:
        cc.stop()


def test_cloudcore_against_another_cluster(tmp_path: Path) -> None:
    """`--kubeconfig`: no embedded API; our NodeGroup controller works on the given cluster."""
    upstream = Cloudcore(tmp_path / "upstream")
    proc: subprocess.Popen[str] | None = None
    try:
        # The "real cluster": an API without our controllers.
        upstream.proc = subprocess.Popen(
            [sys.executable, "-m", "cloudcore", "--data-dir", str(upstream.data),
             "--api-bind", "127.0.0.1", "--api-port", str(upstream.port), "--no-controllers"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
        wait_for(lambda: (upstream.data / "admin.kubeconfig").exists(), what="upstream API")
        kubeconfig = upstream.data / "admin.kubeconfig"
        proc = subprocess.Popen(
            [sys.executable, "-m", "cloudcore", "--data-dir", str(tmp_path / "own"),
             "--kubeconfig", str(kubeconfig), "--api-port", str(free_port())],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

        async def scenario() -> None:
            client = KubeClient.from_kubeconfig(kubeconfig)
            try:
                await client.create(NODES, {"metadata": {"name": "edge-a",
                                                         "labels": {"site": "a"}}})
                await client.create(NODEGROUPS, {"metadata": {"name": "site-a"},
                                                 "spec": {"matchLabels": {"site": "a"}}})
                deadline = time.monotonic() + 20
                while True:
                    node = await client.get(NODES, "edge-a")
                    labels = node["metadata"].get("labels", {})
                    if labels.get("apps.kubeedge.io/belonging-to") == "site-a":
                        return
                    assert proc is not None and proc.poll() is None, proc.communicate()[1]
                    assert time.monotonic() < deadline, "node never labelled by cloudcore"
                    await asyncio.sleep(0.1)
            finally:
                await client.close()

        asyncio.run(scenario())
        assert not (tmp_path / "own" / "store.db").exists(), "an embedded store was created"
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=15)
        upstream.stop()


@pytest.fixture(autouse=True)
def _no_leftover_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
