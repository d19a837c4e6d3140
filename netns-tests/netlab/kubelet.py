"""The lab's stand-in for kubelet, run as a process inside the lab (never product code).

    python -m netlab.kubelet --kubeconfig admin.kubeconfig --slots slots.json --state state.json

`slots.json` maps each node to its pod namespaces: `{"node1": [["ewlab-…-node1-p0",
"10.244.1.2"], …], …}` and, under `"labels"`, each node's labels. The kubelet registers every
node Ready, then list/watches Pods: a pod scheduled to one of its nodes runs as
netlab/podserver.py in a free pod namespace of that node (`ip netns exec`), and is reported
Running and Ready with that namespace's IP once it listens; a pod marked for deletion is stopped
and deleted with grace 0, as kubelet does. It rewrites `state.json` after every change
(`{"ns/name": {"node", "slot", "ip", "pid", "readyAt"}}`) so tests can find, and kill, a
pod's process.
It runs inside a lab namespace so that all its API traffic stays in the lab.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes

K8S: Any = kubernetes  # typed only in parts; used dynamically here
PODSERVER = Path(__file__).with_name("podserver.py")


@dataclass
class Running:
    """A pod this kubelet runs."""

    node: str
    slot: str  # the pod namespace it runs in
    ip: str
    proc: subprocess.Popen[str] | None = None  # None while it starts
    ready_at: float | None = None  # wall-clock time it was reported Ready


def log(message: str) -> None:
    print(f"lab-kubelet: {message}", file=sys.stderr, flush=True)


class LabKubelet:
    def __init__(self, api: Any, slots: dict[str, list[tuple[str, str]]],
                 labels: dict[str, dict[str, str]], node_ips: dict[str, str],
                 state: Path) -> None:
        self.core = K8S.client.CoreV1Api(api)
        self.slots = slots
        self.labels = labels
        self.node_ips = node_ips
        self.state = state
        self.running: dict[tuple[str, str], Running] = {}
        self.pending: set[tuple[str, str]] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(8)

    def register_nodes(self) -> None:
        for node in self.slots:
            body = {"apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": node, "labels": self.labels.get(node, {})}}
            try:
                self.core.create_node(body)
            except K8S.client.ApiException as exc:
                if exc.status != 409:
                    raise
            self.core.patch_node_status(node, {"status": {
                "addresses": [{"type": "InternalIP", "address": self.node_ips[node]}],
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]}})

    def watch(self) -> None:
        while not self.stop.is_set():
            try:
                listed = self.core.list_pod_for_all_namespaces()
                for pod in listed.items:
                    self.seen(pod)
                watch = K8S.watch.Watch()
                for ev in watch.stream(self.core.list_pod_for_all_namespaces,
                                       resource_version=listed.metadata.resource_version,
                                       timeout_seconds=5):
                    if ev["type"] == "DELETED":
                        self.pool.submit(self.gone, ev["object"])
                    else:
                        self.seen(ev["object"])
                    if self.stop.is_set():
                        break
            except Exception as exc:  # the API is stopped in some tests: relist later
                if not self.stop.is_set():
                    log(f"watch: {type(exc).__name__}: {str(exc)[:200]}")
                    self.stop.wait(0.5)

    def seen(self, pod: Any) -> None:
        key = (pod.metadata.namespace, pod.metadata.name)
        if pod.spec.node_name not in self.slots:
            return
        with self.lock:
            if key in self.pending:
                return
            if pod.metadata.deletion_timestamp is not None:
                self.pending.add(key)
                self.pool.submit(self.terminate, pod)
            elif key not in self.running and pod.status.phase in (None, "Pending"):
                self.pending.add(key)
                self.pool.submit(self.run, pod)

    def run(self, pod: Any) -> None:
        key = (pod.metadata.namespace, pod.metadata.name)
        node = pod.spec.node_name
        try:
            with self.lock:
                used = {r.slot for r in self.running.values()}
                free = [s for s in self.slots[node] if s[0] not in used]
                if not free:
                    log(f"no free pod namespace on {node} for {key[0]}/{key[1]}")
                    return
                running = self.running[key] = Running(node, free[0][0], free[0][1])
            proc = subprocess.Popen(
                ["ip", "netns", "exec", running.slot, sys.executable, str(PODSERVER),
                 "--name", key[1], "--node", node], stdout=subprocess.PIPE, text=True)
            running.proc = proc
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 20)
            if not ready or proc.stdout.readline().strip() != "ready":
                log(f"pod {key[0]}/{key[1]} did not start")
                return
            self.core.patch_namespaced_pod_status(key[1], key[0], {"status": {
                "phase": "Running", "podIP": running.ip, "podIPs": [{"ip": running.ip}],
                "hostIP": self.node_ips[node], "startTime": _now(),
                "conditions": [{"type": "Ready", "status": "True"},
                               {"type": "ContainersReady", "status": "True"}]}})
            running.ready_at = time.time()
            self.save()
        except Exception as exc:
            log(f"running {key[0]}/{key[1]}: {type(exc).__name__}: {str(exc)[:200]}")
        finally:
            with self.lock:
                self.pending.discard(key)

    def terminate(self, pod: Any) -> None:
        key = (pod.metadata.namespace, pod.metadata.name)
        try:
            self.gone(pod)
            with contextlib.suppress(K8S.client.ApiException):
                self.core.delete_namespaced_pod(key[1], key[0], grace_period_seconds=0)
        except Exception as exc:
            log(f"stopping {key[0]}/{key[1]}: {type(exc).__name__}: {str(exc)[:200]}")
        finally:
            with self.lock:
                self.pending.discard(key)

    def gone(self, pod: Any) -> None:
        with self.lock:
            running = self.running.pop((pod.metadata.namespace, pod.metadata.name), None)
        if running is not None and running.proc is not None:
            stop_process(running.proc)
        self.save()

    def save(self) -> None:
        with self.lock:
            doc = {f"{k[0]}/{k[1]}": {"node": r.node, "slot": r.slot, "ip": r.ip,
                                      "pid": r.proc.pid if r.proc else None,
                                      "readyAt": r.ready_at}
                   for k, r in self.running.items()}
            tmp = self.state.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, self.state)

    def shutdown(self) -> None:
        self.stop.set()
        self.pool.shutdown(wait=True, cancel_futures=True)
        with self.lock:
            procs = [r.proc for r in self.running.values() if r.proc is not None]
            self.running.clear()
        for proc in procs:
            stop_process(proc)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def stop_process(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--slots", type=Path, required=True)
    parser.add_argument("--state", type=Path, required=True)
    args = parser.parse_args()
    spec = json.loads(args.slots.read_text())
    api = K8S.config.new_client_from_config(config_file=args.kubeconfig)
    kubelet = LabKubelet(api, {n: [tuple(s) for s in v] for n, v in spec["slots"].items()},
                         spec["labels"], spec["nodeIPs"], args.state)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    kubelet.register_nodes()
    kubelet.save()
    threading.Thread(target=kubelet.watch, daemon=True).start()
    print("ready", flush=True)
    done.wait()
    kubelet.shutdown()


if __name__ == "__main__":
    main()
