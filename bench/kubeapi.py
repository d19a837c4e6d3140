"""`python -m bench kubeapi`: the embedded API against etcd, the store Kubernetes itself uses.

Both run as their own processes on loopback with TLS and client certificates from one CA, and
one aiohttp client in this process drives both through their own HTTP APIs: Kubernetes REST for
edgeweave (`cloudcore`'s embedded API), etcd's v3 JSON gateway (`/v3/kv/put`, `/v3/kv/range`,
`/v3/watch`) for etcd. The same objects (ConfigMaps of ~1 KiB) are written to both:

- `writes_per_s`: creates with 16 in flight;
- `list_*_ms`: listing all N objects (N = 10,000; 2,000 with --quick), p50/p99 of 10 lists;
- `watch_fanout_*_us`: 100 watchers on the collection, one write at a time: time from the
  write's start to each watcher's receipt, p50/p99 over all deliveries;
- `rss_mb`: the server's resident memory at the end.

etcd stores raw bytes and does no validation, defaulting, selectors or JSON work, so it is the
upper bound a Kubernetes API's storage can reach, not a like-for-like API server.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import yaml

from bench.harness import Results, have, log, missing, percentile, summary_us
from edgeweave.pki import ADMIN, CertificateAuthority, IssuedCert

NAMESPACE = "default"
PAYLOAD = "x" * 900  # with metadata a ConfigMap of about 1 KiB
WATCHERS = 100
CONCURRENCY = 16


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def rss_mb(pid: int) -> float:
    """Resident memory of `pid` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def configmap(name: str) -> dict[str, Any]:
    """The object both systems store."""
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"bench": "kubeapi"}},
            "data": {"payload": PAYLOAD}}


class System(Protocol):
    """One store under test, reached over HTTP."""

    base: str

    async def put(self, http: aiohttp.ClientSession, name: str) -> None:
        """Store the object `name`."""

    async def list_count(self, http: aiohttp.ClientSession) -> int:
        """List every object; return how many there were."""

    def watch(self, http: aiohttp.ClientSession) -> AsyncIterator[str]:
        """Names of objects as change notifications arrive (after a first empty yield)."""


@dataclass
class Edgeweave:
    """cloudcore's embedded Kubernetes API."""

    base: str

    def _coll(self) -> str:
        return f"{self.base}/api/v1/namespaces/{NAMESPACE}/configmaps"

    async def put(self, http: aiohttp.ClientSession, name: str) -> None:
        async with http.post(self._coll(), json=configmap(name)) as resp:
            if resp.status != 201:
                raise RuntimeError(f"edgeweave create {name}: {resp.status} {await resp.text()}")
            await resp.read()

    async def list_count(self, http: aiohttp.ClientSession) -> int:
        async with http.get(self._coll()) as resp:
            doc = json.loads(await resp.read())
            return len(doc["items"])

    async def watch(self, http: aiohttp.ClientSession) -> AsyncIterator[str]:
        async with http.get(f"{self._coll()}?limit=1") as resp:  # just the current revision
            rv = json.loads(await resp.read())["metadata"]["resourceVersion"]
        url = f"{self._coll()}?watch=1&resourceVersion={rv}"
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=None)) as resp:
            yield ""
            async for line in resp.content:
                event = json.loads(line)
                yield event["object"]["metadata"]["name"]


@dataclass
class Etcd:
    """etcd v3 through its JSON gateway, keys laid out as kube-apiserver does."""

    base: str
    prefix: str = f"/registry/configmaps/{NAMESPACE}/"

    @staticmethod
    def _b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    def _range_end(self) -> str:
        return self.prefix[:-1] + chr(ord(self.prefix[-1]) + 1)

    async def put(self, http: aiohttp.ClientSession, name: str) -> None:
        value = json.dumps(configmap(name))
        body = {"key": self._b64(self.prefix + name), "value": self._b64(value)}
        async with http.post(f"{self.base}/v3/kv/put", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"etcd put {name}: {resp.status} {await resp.text()}")
            await resp.read()

    async def list_count(self, http: aiohttp.ClientSession) -> int:
        body = {"key": self._b64(self.prefix), "range_end": self._b64(self._range_end())}
        async with http.post(f"{self.base}/v3/kv/range", json=body) as resp:
            doc = json.loads(await resp.read())
            return len(doc.get("kvs", []))

    async def watch(self, http: aiohttp.ClientSession) -> AsyncIterator[str]:
        body = {"create_request": {"key": self._b64(self.prefix),
                                   "range_end": self._b64(self._range_end())}}
        async with http.post(f"{self.base}/v3/watch", json=body,
                             timeout=aiohttp.ClientTimeout(total=None)) as resp:
            async for line in resp.content:
                result = json.loads(line).get("result", {})
                if result.get("created"):
                    yield ""
                for ev in result.get("events", []):
                    key = base64.b64decode(ev["kv"]["key"]).decode()
                    yield key[len(self.prefix):]


async def measure(system: System, ssl_ctx: ssl.SSLContext, n_objects: int,
                  fanout_writes: int) -> dict[str, float]:
    """The three measurements against one system."""
    conn = aiohttp.TCPConnector(ssl=ssl_ctx, limit=0)
    async with aiohttp.ClientSession(connector=conn) as http:
        # Writes: n_objects creates, CONCURRENCY in flight.
        names = iter(range(n_objects))

        async def writer() -> None:
            for i in names:
                await system.put(http, f"bench-{i}")

        start = time.perf_counter()
        await asyncio.gather(*(writer() for _ in range(CONCURRENCY)))
        writes_per_s = n_objects / (time.perf_counter() - start)
        # Lists of everything.
        lists = []
        for _ in range(10):
            t0 = time.perf_counter()
            count = await system.list_count(http)
            lists.append(time.perf_counter() - t0)
            if count != n_objects:
                raise RuntimeError(f"{type(system).__name__}: listed {count} of {n_objects}")
        # Watch fan-out.
        sent: dict[str, float] = {}
        delays: list[float] = []
        pending: dict[str, int] = {}
        all_seen = asyncio.Event()

        async def watcher(ready: asyncio.Event) -> None:
            stream = system.watch(http)
            async for name in stream:
                if not name:
                    ready.set()
                    continue
                if name in sent:
                    delays.append(time.perf_counter() - sent[name])
                    pending[name] -= 1
                    if pending[name] == 0:
                        all_seen.set()

        readies = [asyncio.Event() for _ in range(WATCHERS)]
        tasks = [asyncio.create_task(watcher(r)) for r in readies]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 60)
        for j in range(fanout_writes):
            name = f"watch-{j}"
            all_seen.clear()
            pending[name] = WATCHERS
            sent[name] = time.perf_counter()
            await system.put(http, name)
            await asyncio.wait_for(all_seen.wait(), 30)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    result: dict[str, float] = {"writes_per_s": round(writes_per_s, 1),
                                "objects": n_objects,
                                "list_p50_ms": round(percentile(lists, 50) * 1000, 2),
                                "list_p99_ms": round(percentile(lists, 99) * 1000, 2)}
    result.update(summary_us(delays, "watch_fanout"))
    return result


@dataclass
class Pki:
    """One CA for both systems: a server certificate for 127.0.0.1 and the admin client."""

    dir: Path
    ca: CertificateAuthority
    server: IssuedCert
    client: IssuedCert

    @classmethod
    def make(cls, directory: Path) -> Pki:
        ca = CertificateAuthority.generate()
        server = ca.issue_server_cert("127.0.0.1", ips=("127.0.0.1",), dns_names=("localhost",))
        client = ca.issue_client_cert(ADMIN)
        (directory / "ca.crt").write_bytes(ca.cert_pem())
        server.write(directory / "server.crt", directory / "server.key")
        client.write(directory / "client.crt", directory / "client.key")
        return cls(directory, ca, server, client)

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.dir / "ca.crt"))
        ctx.load_cert_chain(str(self.dir / "client.crt"), str(self.dir / "client.key"))
        return ctx


def wait_tcp(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    """Wait until something accepts on 127.0.0.1:`port`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


def start_etcd(pki: Pki, data: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Debian's etcd on loopback with TLS; fsync on (its default).

    Without client-certificate auth: etcd 3.4's JSON gateway dials etcd's own gRPC port without
    a client certificate, so with `--client-cert-auth` every gateway request fails (503).
    """
    client, peer = free_port(), free_port()
    argv = ["etcd", "--name", "bench", "--data-dir", str(data),
            "--listen-client-urls", f"https://127.0.0.1:{client}",
            "--advertise-client-urls", f"https://127.0.0.1:{client}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"bench=http://127.0.0.1:{peer}",
            "--cert-file", str(pki.dir / "server.crt"), "--key-file", str(pki.dir / "server.key"),
            "--log-level", "error"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_tcp(client, proc, "etcd")
    return proc, f"https://127.0.0.1:{client}"


def start_edgeweave(data: Path) -> tuple[subprocess.Popen[bytes], str, ssl.SSLContext]:
    """`cloudcore` with its embedded API on loopback; the admin kubeconfig gives the client."""
    port = free_port()
    argv = [sys.executable, "-m", "cloudcore", "--data-dir", str(data), "--api-bind",
            "127.0.0.1", "--api-port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    wait_tcp(port, proc, "cloudcore")
    # cloudcore writes the kubeconfig just after its listener is up: wait for it too.
    kubeconfig = data / "admin.kubeconfig"
    deadline = time.monotonic() + 30
    while not kubeconfig.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"cloudcore wrote no {kubeconfig} (exit code {proc.poll()})")
        time.sleep(0.05)
    return proc, f"https://127.0.0.1:{port}", kubeconfig_context(kubeconfig)


def kubeconfig_context(path: Path) -> ssl.SSLContext:
    """The TLS context of a kubeconfig's current user and cluster (embedded data only)."""
    doc = yaml.safe_load(path.read_text())
    cluster = doc["clusters"][0]["cluster"]
    user = doc["users"][0]["user"]
    ctx = ssl.create_default_context(
        cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = Path(tmp) / "c.crt", Path(tmp) / "c.key"
        cert.write_bytes(base64.b64decode(user["client-certificate-data"]))
        key.write_bytes(base64.b64decode(user["client-key-data"]))
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process this suite started."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(quick: bool) -> Results:
    """Measure edgeweave and etcd, one after the other, in this run."""
    n_objects = 2_000 if quick else 10_000
    fanout_writes = 30 if quick else 200
    results: Results = {}
    with tempfile.TemporaryDirectory(prefix="bench-kubeapi-") as tmp:
        root = Path(tmp)
        pki = Pki.make(root)
        log(f"kubeapi: {n_objects} objects, {WATCHERS} watchers, {fanout_writes} fan-out writes")
        proc, url, ctx = start_edgeweave(root / "edgeweave")
        try:
            results["edgeweave"] = asyncio.run(measure(Edgeweave(url), ctx, n_objects,
                                                       fanout_writes))
            results["edgeweave"]["rss_mb"] = rss_mb(proc.pid)
        finally:
            stop(proc)
        log(f"edgeweave: {results['edgeweave']}")
        if not have("etcd"):
            results["etcd"] = missing("etcd", "etcd-server")
        else:
            proc_e, url_e = start_etcd(pki, root / "etcd")
            try:
                results["etcd"] = asyncio.run(measure(Etcd(url_e), pki.client_context(),
                                                      n_objects, fanout_writes))
                results["etcd"]["rss_mb"] = rss_mb(proc_e.pid)
            finally:
                stop(proc_e)
            log(f"etcd: {results['etcd']}")
    if "writes_per_s" in results.get("etcd", {}):
        e, w = results["edgeweave"], results["etcd"]
        results["ratio_edgeweave_to_etcd"] = {
            "writes": round(e["writes_per_s"] / w["writes_per_s"], 2),
            "list_p50": round(e["list_p50_ms"] / w["list_p50_ms"], 2),
            "watch_fanout_p50": round(e["watch_fanout_p50_us"] / w["watch_fanout_p50_us"], 2),
        }
    return results
