"""Push latency of the real control plane: from `verity apply` returning to the ACK of every
affected proxy, with 1, 100 and 1,000 connected ADS clients; and the control plane's memory
per connected client.

    .venv/bin/python bench/push.py [--clients 1,100,1000] [--changes 10]

For each client count: a fresh control plane (a process, as `verity control-plane run`
starts it); N Dataplanes applied through the REST API in batches (namespace `bench`, ten
service accounts); one dataplane token per service account; then N simulated proxies in a
child process, each on its own TLS connection to the gRPC port (verifying `cp-ca.pem`),
authenticated by its identity's token, node id `bench/<name>`, behaving like Envoy on ADS:
CDS and LDS first, then EDS and RDS for the names those carry, every response ACKed.
The child reports each ACK (proxy, type, time, and for LDS the number of filter chains,
which tells STRICT (1) from PERMISSIVE (2)).

Two kinds of change, each applied `--changes` times through the REST API, one at a time:
- all:  the namespace's PeerAuthentication flips STRICT <-> PERMISSIVE: every proxy's
        inbound listener changes;
- one:  a PeerAuthentication selecting one Dataplane's `instance` label flips its mode:
        one proxy's listener changes (the control plane still re-translates every proxy).
Push latency is from the REST call returning to the last affected proxy's ACK of an LDS
response with the new mode (clock: CLOCK_MONOTONIC, shared by the processes); p50/p99 over
the changes, with the median proxy's ACK for scale. Also reported: how many proxies got a
listener push per change (the rest must get none), the control plane's CPU per change,
and its RSS growth from before the proxies connected to after, divided by N.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
import yaml
from _common import (  # the helpers beside this script (its folder is on sys.path)
    ControlPlane,
    command_line,
    cpu_seconds,
    dataplane_document,
    percentile,
    rss_kb,
    running_control_plane,
)
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

NAMESPACE = "bench"
STARTUP_GRACE_S = 10.0  # the control plane's grace for reconnecting proxies after a start
SERVICE_ACCOUNTS = 10
BATCH = 250
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SHORT = {CDS: "cds", EDS: "eds", LDS: "lds", RDS: "rds"}
CHAINS = {"STRICT": 1, "PERMISSIVE": 2}  # inbound filter chains per mode


def node_name(index: int) -> str:
    return f"dp-{index:05d}"


# =============================================================================================
# The simulated proxies (child process)


@dataclass
class Subscription:
    names: list[str]
    version: str = ""
    nonce: str = ""

    def request(self, type_url: str) -> Any:
        return discovery_pb2.DiscoveryRequest(
            type_url=type_url,
            resource_names=self.names,
            version_info=self.version,
            response_nonce=self.nonce,
        )


def eds_names(response: Any) -> list[str]:
    names = []
    for packed in response.resources:
        cluster = cluster_pb2.Cluster()
        packed.Unpack(cluster)
        if cluster.type == cluster_pb2.Cluster.EDS:
            names.append(cluster.eds_cluster_config.service_name or cluster.name)
    return sorted(names)


def listener_facts(response: Any) -> tuple[list[str], int]:
    """The RDS names the listeners use, and their filter chains in all."""
    names, chains = set(), 0
    for packed in response.resources:
        listener = listener_pb2.Listener()
        packed.Unpack(listener)
        chains += len(listener.filter_chains)
        for chain in listener.filter_chains:
            for network_filter in chain.filters:
                if network_filter.typed_config.type_url.endswith("HttpConnectionManager"):
                    manager = hcm_pb2.HttpConnectionManager()
                    network_filter.typed_config.Unpack(manager)
                    names.add(manager.rds.route_config_name)
    return sorted(names), chains


class SimulatedProxy:
    """One ADS stream that subscribes and ACKs like Envoy, and reports its ACKs."""

    def __init__(self, stub: Any, node: str, token: str) -> None:
        self.node = node
        self.call = stub.StreamAggregatedResources(metadata=(("authorization", f"Bearer {token}"),))
        self.subs: dict[str, Subscription] = {CDS: Subscription([]), LDS: Subscription([])}

    async def run(self) -> None:
        first = self.subs[CDS].request(CDS)
        first.node.id = self.node
        await self.call.write(first)
        await self.call.write(self.subs[LDS].request(LDS))
        async for response in self.call:
            await self.handle(response)

    async def handle(self, response: Any) -> None:
        sub = self.subs[response.type_url]
        sub.version, sub.nonce = response.version_info, response.nonce
        await self.call.write(sub.request(response.type_url))
        acked_at, detail = time.monotonic(), ""
        if response.type_url == CDS:
            await self.follow(EDS, eds_names(response))
        elif response.type_url == LDS:
            names, chains = listener_facts(response)
            detail = str(chains)
            await self.follow(RDS, names)
        print(f"{self.node}\t{SHORT[response.type_url]}\t{acked_at:.6f}\t{detail}", flush=True)

    async def follow(self, type_url: str, names: list[str]) -> None:
        """Subscribe to (or change) the EDS/RDS names the clusters/listeners use."""
        sub = self.subs.get(type_url)
        if sub is None and not names:
            return  # Envoy subscribes to a type only once something needs it
        if sub is not None and sub.names == names:
            return
        if sub is None:
            sub = self.subs[type_url] = Subscription(names)
        sub.names = names
        await self.call.write(sub.request(type_url))


async def run_proxies(spec: dict[str, Any]) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=Path(spec["ca"]).read_bytes())
    options = [("grpc.use_local_subchannel_pool", 1)]  # each proxy its own connection
    tasks = []
    for node, token in spec["clients"]:
        channel = grpc.aio.secure_channel(spec["target"], credentials, options=options)
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        tasks.append(asyncio.create_task(SimulatedProxy(stub, node, token).run()))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        print(f"error\t{len(failures)} streams failed: {failures[0]!r}", flush=True)


# =============================================================================================
# The benchmark (this process)


@dataclass
class AckLog:
    """The ACKs the child reports, read from its stdout by a thread."""

    lds: dict[str, list[tuple[float, int]]] = field(default_factory=dict)  # node: (t, chains)
    types: dict[str, set[str]] = field(default_factory=dict)  # node: types ACKed
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def follow(self, stream: IO[str]) -> None:
        for line in stream:
            parts = line.rstrip("\n").split("\t")
            with self.lock:
                if parts[0] == "error":
                    self.errors.append(parts[1])
                    continue
                node, kind, when, detail = parts
                self.types.setdefault(node, set()).add(kind)
                if kind == "lds":
                    self.lds.setdefault(node, []).append((float(when), int(detail)))

    def all_configured(self, nodes: Sequence[str]) -> bool:
        with self.lock:
            if self.errors:
                raise RuntimeError(f"simulated proxies failed: {self.errors[0]}")
            return all({"cds", "lds", "rds"} <= self.types.get(n, set()) for n in nodes)

    def first_acks(self, nodes: Sequence[str], since: float, chains: int) -> dict[str, float]:
        """Each node's first LDS ACK after `since` of a config with `chains` filter chains."""
        found = {}
        with self.lock:
            for node in nodes:
                for when, seen in self.lds.get(node, ()):
                    if when > since and seen == chains:
                        found[node] = when
                        break
        return found

    def pushed_since(self, since: float) -> int:
        with self.lock:
            return sum(1 for acks in self.lds.values() if any(t > since for t, _ in acks))


@dataclass
class ChangeFigures:
    latencies: list[float] = field(default_factory=list)  # apply returned -> last ACK
    median_proxy: list[float] = field(default_factory=list)
    pushed: list[int] = field(default_factory=list)  # proxies that got any LDS push
    cp_cpu: list[float] = field(default_factory=list)

    def line(self, label: str) -> str:
        ms = [x * 1000 for x in self.latencies]
        return (
            f"  {label:<5} p50 {percentile(ms, 0.5):8.1f} ms  p99 {percentile(ms, 0.99):8.1f} ms"
            f"  (median proxy {statistics.median(self.median_proxy) * 1000:7.1f} ms)"
            f"  proxies pushed per change {min(self.pushed)}-{max(self.pushed)}"
            f"  control-plane CPU {statistics.mean(self.cp_cpu) * 1000:6.0f} ms/change"
        )


def peer_authentication(name: str, mode: str, instance: str | None = None) -> str:
    spec: dict[str, Any] = {"mtls": {"mode": mode}}
    if instance is not None:
        spec["selector"] = {"matchLabels": {"instance": instance}}
    doc = {
        "apiVersion": "security.istio.io/v1beta1",
        "kind": "PeerAuthentication",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": spec,
    }
    return yaml.safe_dump(doc)


def register(cp: ControlPlane, count: int) -> list[list[str]]:
    """Apply `count` Dataplanes in batches; one token per service account. [[node, token]]"""
    accounts = min(SERVICE_ACCOUNTS, count)
    tokens = [cp.dataplane_token(NAMESPACE, f"svc-{k}") for k in range(accounts)]
    docs = []
    for i in range(count):
        labels = {"app": f"svc-{i % accounts}", "instance": node_name(i)}
        docs.append(
            dataplane_document(node_name(i), namespace=NAMESPACE, service=f"svc-{i % accounts}",
                               inbound=[(20000 + i, 40000 + i)], labels=labels)
        )  # fmt: skip
    for start in range(0, count, BATCH):
        cp.apply(docs[start : start + BATCH])
    return [[f"{NAMESPACE}/{node_name(i)}", tokens[i % accounts]] for i in range(count)]


def measure_change(
    cp: ControlPlane, acks: AckLog, document: str, affected: Sequence[str], chains: int
) -> tuple[float, float, int, float]:
    """Apply one change; (latency to the last ACK, to the median ACK, proxies pushed, CP CPU)."""
    cpu_before, sent = cpu_seconds(cp.pid), time.monotonic()
    cp.apply(document)
    returned = time.monotonic()
    deadline = returned + 60
    while len(found := acks.first_acks(affected, sent, chains)) < len(affected):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(affected) - len(found)} proxies did not ACK the change")
        time.sleep(0.002)
    cpu = cpu_seconds(cp.pid) - cpu_before
    time.sleep(0.3)  # let any push to an unaffected proxy show up (debounce is 50 ms)
    times = sorted(found.values())
    return times[-1] - returned, statistics.median(times) - returned, acks.pushed_since(sent), cpu


def run_changes(cp: ControlPlane, acks: AckLog, nodes: list[str], changes: int) -> list[str]:
    every, one = ChangeFigures(), ChangeFigures()
    for k in range(changes):
        mode = "PERMISSIVE" if k % 2 == 0 else "STRICT"
        doc = peer_authentication("default", mode)
        record(every, measure_change(cp, acks, doc, nodes, CHAINS[mode]))
    # The namespace is STRICT again if `changes` is even; the workload policy overrides it.
    for k in range(changes):
        mode = "PERMISSIVE" if k % 2 == 0 else "STRICT"
        doc = peer_authentication("one", mode, instance=node_name(0))
        record(one, measure_change(cp, acks, doc, nodes[:1], CHAINS[mode]))
    return [every.line("all"), one.line("one")]


def record(figures: ChangeFigures, result: tuple[float, float, int, float]) -> None:
    last, median, pushed, cpu = result
    figures.latencies.append(last)
    figures.median_proxy.append(median)
    figures.pushed.append(pushed)
    figures.cp_cpu.append(cpu)


def start_proxies(cp: ControlPlane, clients: list[list[str]], workdir: Path) -> Any:
    spec = {"target": cp.grpc_target, "ca": str(cp.ca_file), "clients": clients}
    spec_file = workdir / "proxies.json"
    spec_file.write_text(json.dumps(spec))
    argv = [sys.executable, str(Path(__file__).resolve()), "--proxies", str(spec_file)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


def measure(count: int, changes: int) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="verity-bench-") as tmp:
        workdir = Path(tmp)
        with running_control_plane(workdir) as cp:
            cp.apply(peer_authentication("default", "STRICT"))
            clients = register(cp, count)
            nodes = [node for node, _ in clients]
            time.sleep(1.0)
            rss_before = rss_kb(cp.pid)
            started = time.monotonic()
            child = start_proxies(cp, clients, workdir)
            try:
                return connected_and_changes(cp, child, nodes, changes, rss_before, started)
            finally:
                child.terminate()
                child.wait(30)


def connected_and_changes(
    cp: ControlPlane, child: Any, nodes: list[str], changes: int, rss_before: int, started: float
) -> list[str]:
    acks = AckLog()
    threading.Thread(target=acks.follow, args=(child.stdout,), daemon=True).start()
    deadline = started + 120
    while not acks.all_configured(nodes):
        if time.monotonic() > deadline or child.poll() is not None:
            raise TimeoutError("the simulated proxies did not all get their configuration")
        time.sleep(0.05)
    connected = time.monotonic() - started
    time.sleep(1.0)
    per_client = (rss_kb(cp.pid) - rss_before) / len(nodes)
    # The control plane recomputes every proxy's config when its grace period for proxies
    # reconnecting after a start ends: wait for that, so that no change races it.
    time.sleep(max(0.0, cp.started_at + STARTUP_GRACE_S + 1.0 - time.monotonic()))
    lines = [
        f"{len(nodes)} proxies (one TLS connection each): connected and configured in "
        f"{connected:.2f} s; control-plane RSS +{per_client:.0f} KB per connected proxy"
    ]
    return lines + run_changes(cp, acks, nodes, changes)


def main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    print("command:", command_line("push.py", argv))
    print(f"{args.changes} changes of each kind per count (p99 of so few is about the slowest);"
          " latency from the apply call returning to the last affected proxy's ACK")  # fmt: skip
    begun = time.monotonic()
    for count in (int(c) for c in args.clients.split(",")):
        for line in measure(count, args.changes):
            print(line, flush=True)
    print(f"took {time.monotonic() - begun:.0f} s")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--clients", default="1,100,1000", help="comma-separated proxy counts")
    parser.add_argument("--changes", type=int, default=10, help="changes of each kind")
    parser.add_argument("--proxies", help=argparse.SUPPRESS)  # child process: the spec file
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args(sys.argv[1:])
    if arguments.proxies:
        asyncio.run(run_proxies(json.loads(Path(arguments.proxies).read_text())))
    else:
        main(sys.argv[1:])
