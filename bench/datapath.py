"""Data-path latency and cost: direct vs two bare Envoy hops vs Verity's two sidecars.

    .venv/bin/python bench/datapath.py [--rates 500,1000] [--seconds 2] [--repeats 5]

One run, three setups, the same open-loop load for each (interleaved, the order rotated
each repetition), 1 KB responses:

- direct: client -> app;
- bare:   client -> Envoy -> Envoy -> app (plaintext, no RBAC, static config);
- verity: client -> web's outbound listener -> mTLS -> api's inbound (HTTP RBAC) -> app;
  a real control plane, two `verity dataplane run` agents, and an AuthorizationPolicy
  allowing web -> api applied first. The run prints the RBAC rule sets api's sidecar
  really has (from its config dump), and whether the policy is named in them.

Every Envoy (the app too) runs with `--concurrency 1`. The app is an Envoy answering every
request with a fixed 1 KB body (direct_response): a fast, steady responder, measured on its
own as "direct".

Load: h2load over HTTP/1.1 with many connections, each at a low fixed rate (rate /
connections), connections opened 1/rate apart so that requests arrive evenly spaced rather
than in bursts (h2load's event loop uses select(), whose timers have microsecond
resolution). A request waits for its connection's previous one only if that took longer
than the connection's period (50 ms at 1,000 rps over 50 connections): "slow" counts such
requests, so with 0 slow, latencies are free of coordinated omission. The first second is
dropped. Latency is h2load's, from sending the request to the end of the response.

Reported per setup and rate: achieved throughput; p50/p90/p99, each the median over the
repetitions of that repetition's percentile (robust to a neighbour's burst on a shared
machine), with the range of p50 over repetitions; latency added over direct; proxy CPU per
request (utime + stime of the proxies' Envoys from /proc/PID/stat before and after each run,
over the requests sent); and "others' CPU", what the rest of the machine used during the
runs (busy time from /proc/stat less the app, the proxies and h2load; the control plane and
the agents count as others), to judge the noise.
Then the ratios verity/bare, and the memory (USS, PSS) of every process involved.

As root, every process of the benchmark runs at nice -10 (`--nice`), so that other work on a
shared machine disturbs the latencies less; it uses under one core at 1,000 rps.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from _common import (  # the helpers beside this script (its folder is on sys.path)
    ALLOW_WEB_TO_API,
    CLK_TCK,
    Agent,
    ControlPlane,
    command_line,
    cpu_seconds,
    dataplane_document,
    envoy_child,
    forwarding_envoy,
    free_port,
    memory,
    percentile,
    responder_envoy,
    running_control_plane,
    wait_until,
)

BODY = b"v" * 1024
SETUPS = ("direct", "bare", "verity")
POLICY_NAME = "api-from-web"


# --- the load ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    rate: int
    seconds: float
    warmup: float
    connections: int

    @property
    def per_connection(self) -> float:
        return self.rate / self.connections

    def h2load_argv(self, url: str, log_file: Path) -> list[str]:
        total = round(self.rate * (self.warmup + self.seconds))
        # Open the connections 1/rate apart: their request timers then interleave evenly.
        per_ms = max(1, round(self.rate / 1000))
        period_ms = max(1, round(1000 * per_ms / self.rate))
        return [
            "h2load", "--h1", "-t", "1", "-c", str(self.connections),
            "--rps", f"{self.per_connection:g}", "-n", str(total),
            "-r", str(per_ms), "--rate-period", f"{period_ms}ms",
            "--log-file", str(log_file), url,
        ]  # fmt: skip


@dataclass(frozen=True)
class Sample:
    """One request from h2load's log: start (us since epoch), status, latency (us)."""

    start_us: int
    status: int
    latency_us: int


def read_log(path: Path) -> list[Sample]:
    samples = []
    for line in path.read_text().splitlines():
        start, status, latency = line.split("\t")[:3]
        samples.append(Sample(int(start), int(status), int(latency)))
    return samples


@dataclass
class Figures:
    """Everything measured for one setup at one rate, over all repetitions."""

    reps: list[tuple[float, float, float]] = field(default_factory=list)  # p50, p90, p99 (us)
    ok_in_window: int = 0
    window_s: float = 0.0
    errors: int = 0
    slow: int = 0
    sent: int = 0
    proxy_cpu_s: float = 0.0
    others_cpu_s: float = 0.0
    run_s: float = 0.0

    def add(self, samples: Sequence[Sample], load: Load) -> None:
        begin = min(s.start_us for s in samples) + load.warmup * 1e6
        end = begin + load.seconds * 1e6
        kept = [s for s in samples if begin <= s.start_us < end]
        ok = [s.latency_us for s in kept if s.status == 200]
        if ok:
            self.reps.append((percentile(ok, 0.5), percentile(ok, 0.9), percentile(ok, 0.99)))
        self.ok_in_window += len(ok)
        self.window_s += load.seconds
        self.errors += len(kept) - len(ok)
        self.slow += sum(1 for s in kept if s.latency_us > 1e6 / load.per_connection)
        self.sent += len(samples)

    def p(self, fraction: float) -> float:
        """The median over repetitions of a latency percentile (0.5, 0.9, 0.99), in ms."""
        column = {0.5: 0, 0.9: 1, 0.99: 2}[fraction]
        return statistics.median(rep[column] for rep in self.reps) / 1000

    def p50_range(self) -> str:
        p50s = [rep[0] / 1000 for rep in self.reps]
        return f"{min(p50s):.3f}-{max(p50s):.3f}"

    @property
    def cpu_us_per_request(self) -> float:
        return self.proxy_cpu_s / max(1, self.sent) * 1e6

    @property
    def others_cores(self) -> float:
        return self.others_cpu_s / max(1e-9, self.run_s)


# --- the setups -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    proxy_pids: tuple[int, ...]


def check_answers(target: Target) -> None:
    def ok() -> bool:
        try:
            reply = httpx.get(target.url, timeout=2)
        except httpx.HTTPError:
            return False
        return reply.status_code == 200 and reply.content == BODY

    wait_until(f"{target.name}: a 200 with the 1 KB body", ok, timeout=30, interval=0.2)


def start_bare(app_port: int, workdir: Path, stack: ExitStack) -> Target:
    second_port, first_port = free_port(), free_port()
    second = forwarding_envoy("bare-2", second_port, app_port, workdir)
    first = forwarding_envoy("bare-1", first_port, second_port, workdir)
    for envoy in (second, first):
        envoy.start()
        stack.callback(envoy.stop)
    url = f"http://127.0.0.1:{first_port}/"
    return Target("bare", url, (first.pid, second.pid))


@dataclass
class VerityMesh:
    cp: ControlPlane
    web: Agent
    api: Agent
    url: str

    def target(self) -> Target:
        pids = (envoy_child(self.web.pid), envoy_child(self.api.pid))
        return Target("verity", self.url, pids)


def start_verity(cp: ControlPlane, app_port: int, workdir: Path, stack: ExitStack) -> VerityMesh:
    cp.apply(ALLOW_WEB_TO_API)
    inbound, local = free_port(), free_port()
    api_doc = dataplane_document("api-1", service="api", inbound=[(inbound, app_port)])
    web_doc = dataplane_document("web-1", service="web", outbound=[("api", inbound, local)])
    api, web = Agent("api-1", workdir), Agent("web-1", workdir)
    for agent, doc, service in ((api, api_doc, "api"), (web, web_doc, "web")):
        agent.launch(cp, doc, cp.dataplane_token("default", service))
        stack.callback(agent.stop)
        agent.wait_ready()
    return VerityMesh(cp, web, api, f"http://127.0.0.1:{local}/")


def rbac_rules(agent: Agent) -> list[str]:
    """The HTTP RBAC rule sets in the sidecar's live config: "ACTION [policy names]"."""
    dump = httpx.get(f"http://127.0.0.1:{agent.admin_port}/config_dump", timeout=10).json()
    found: list[str] = []
    _collect_rbac(dump, found)
    return found


def _collect_rbac(node: object, found: list[str]) -> None:
    if isinstance(node, dict):
        if str(node.get("@type", "")).endswith("filters.http.rbac.v3.RBAC"):
            rules = node.get("rules", {})
            names = ", ".join(sorted(rules.get("policies", {})))
            found.append(f"{rules.get('action', 'ALLOW')} [{names}]")
            return
        for value in node.values():
            _collect_rbac(value, found)
    elif isinstance(node, list):
        for value in node:
            _collect_rbac(value, found)


# --- running ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    samples: list[Sample]
    proxy_cpu_s: float
    others_cpu_s: float  # CPU the rest of the machine used meanwhile (not app, proxies, load)
    seconds: float


def machine_busy_s() -> float:
    """CPU seconds all CPUs have been busy since boot (/proc/stat)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / CLK_TCK  # all but idle and iowait


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(target: Target, load: Load, workdir: Path, app_pid: int) -> Run:
    """One h2load run: its samples, the proxies' CPU over it, and everyone else's."""
    log_file = workdir / "h2load.tsv"
    log_file.unlink(missing_ok=True)  # h2load appends
    ours = (*target.proxy_pids, app_pid)
    proxy_before = sum(cpu_seconds(pid) for pid in target.proxy_pids)
    ours_before = sum(cpu_seconds(pid) for pid in ours) + children_cpu_s()
    busy_before, started = machine_busy_s(), time.monotonic()
    env = {**os.environ, "LIBEV_FLAGS": "1"}  # select(): microsecond timers, no bursts
    argv = load.h2load_argv(target.url, log_file)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"h2load failed: {done.stdout[-1000:]} {done.stderr[-1000:]}")
    seconds, busy = time.monotonic() - started, machine_busy_s() - busy_before
    ours_cpu = sum(cpu_seconds(pid) for pid in ours) + children_cpu_s() - ours_before
    proxy_cpu = sum(cpu_seconds(pid) for pid in target.proxy_pids) - proxy_before
    return Run(read_log(log_file), proxy_cpu, max(0.0, busy - ours_cpu), seconds)


@dataclass
class Bench:
    workdir: Path
    app_pid: int
    targets: list[Target]
    processes: list[tuple[str, int]]  # whose memory is reported
    rbac: list[str]  # the RBAC rule sets of api's sidecar


def run_matrix(bench: Bench, loads: Sequence[Load], repeats: int) -> dict[tuple[str, int], Figures]:
    targets = bench.targets
    figures = {(t.name, load.rate): Figures() for t in targets for load in loads}
    for repeat in range(repeats):
        order = [*targets[repeat % len(targets) :], *targets[: repeat % len(targets)]]
        for load in loads:
            for target in order:
                run = run_once(target, load, bench.workdir, bench.app_pid)
                entry = figures[(target.name, load.rate)]
                entry.add(run.samples, load)
                entry.proxy_cpu_s += run.proxy_cpu_s
                entry.others_cpu_s += run.others_cpu_s
                entry.run_s += run.seconds
        print(f"  repetition {repeat + 1}/{repeats} done", flush=True)
    return figures


def warm_up(bench: Bench, load: Load) -> None:
    short = Load(load.rate, 1.0, 0.0, load.connections)
    for target in bench.targets:
        run_once(target, short, bench.workdir, bench.app_pid)


# --- the report -------------------------------------------------------------------------------


def rate_report(rate: int, figures: dict[tuple[str, int], Figures]) -> list[str]:
    direct = figures[("direct", rate)]
    lines = [
        f"rate {rate} rps",
        "  setup   achieved   p50 ms   p90 ms   p99 ms  (p50 reps)    errors slow"
        "  | added p50/p90/p99 ms    | proxy CPU/req | others' CPU",
    ]
    for name in SETUPS:
        f = figures[(name, rate)]
        added = " ".join(f"{f.p(q) - direct.p(q):+6.3f}" for q in (0.5, 0.9, 0.99))
        cpu = f"{f.cpu_us_per_request:6.1f} us" if name != "direct" else "-"
        lines.append(
            f"  {name:<7} {f.ok_in_window / f.window_s:7.1f}/s {f.p(0.5):8.3f} {f.p(0.9):8.3f}"
            f" {f.p(0.99):8.3f}  ({f.p50_range()}) {f.errors:6d} {f.slow:4d}"
            f"  | {added} | {cpu:>13} | {f.others_cores:.2f} cores"
        )
    bare, verity = figures[("bare", rate)], figures[("verity", rate)]
    ratios = "  ".join(f"p{int(q * 100)} {verity.p(q) / bare.p(q):.3f}x" for q in (0.5, 0.9, 0.99))
    cpu_ratio = verity.cpu_us_per_request / max(1e-9, bare.cpu_us_per_request)
    lines.append(f"  verity/bare: {ratios}  proxy CPU/request {cpu_ratio:.3f}x")
    return lines


def authorization_line(rbac: Sequence[str]) -> str:
    named = any(POLICY_NAME in rules for rules in rbac)
    return (
        f"authorization on api's inbound: HTTP RBAC {'; '.join(rbac) or 'NONE'}; "
        f"AuthorizationPolicy default/{POLICY_NAME} (applied) named in it: "
        f"{'yes' if named else 'no'}"
    )


def memory_report(named: Sequence[tuple[str, int]]) -> list[str]:
    lines = ["memory after the runs (private = USS; PSS shares the binary's pages among users)"]
    for label, pid in named:
        lines.append(f"  {label:<30} {memory(pid).line()}")
    return lines


# --- main -------------------------------------------------------------------------------------


@contextmanager
def setups(workdir: Path) -> Iterator[Bench]:
    """Start the app, the bare hops and the Verity mesh."""
    with ExitStack() as stack:
        app_port = free_port()
        app = responder_envoy("app", app_port, BODY, workdir)
        app.start()
        stack.callback(app.stop)
        direct = Target("direct", f"http://127.0.0.1:{app_port}/", ())
        bare = start_bare(app_port, workdir, stack)
        cp = stack.enter_context(running_control_plane(workdir))
        mesh = start_verity(cp, app_port, workdir, stack)
        verity = mesh.target()
        processes = [
            ("verity web sidecar: Envoy", verity.proxy_pids[0]),
            ("verity api sidecar: Envoy", verity.proxy_pids[1]),
            ("verity web sidecar: agent", mesh.web.pid),
            ("verity api sidecar: agent", mesh.api.pid),
            ("bare Envoy (first hop)", bare.proxy_pids[0]),
            ("bare Envoy (second hop)", bare.proxy_pids[1]),
            ("app Envoy (direct_response)", app.pid),
        ]
        targets = [direct, bare, verity]
        for target in targets:
            check_answers(target)
        yield Bench(workdir, app.pid, targets, processes, rbac_rules(mesh.api))


def main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    if shutil.which("h2load") is None:
        sys.exit("h2load not found: install the nghttp2-client package (make bench does)")
    rates = [int(r) for r in args.rates.split(",")]
    loads = [Load(r, args.seconds, 1.0, args.connections) for r in rates]
    os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # inherited by every process started here
    print("command:", command_line("datapath.py", argv))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; {len(BODY)} B responses, "
          f"HTTP/1.1, {args.connections} connections, {args.repeats} x {args.seconds:g} s "
          "per setup and rate (+1 s dropped), interleaved; percentiles: median over "
          f"repetitions; every process of the benchmark at nice {args.nice}")  # fmt: skip
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="verity-bench-") as tmp, setups(Path(tmp)) as bench:
        print(authorization_line(bench.rbac), flush=True)
        warm_up(bench, loads[0])
        figures = run_matrix(bench, loads, args.repeats)
        lines = [line for load in loads for line in rate_report(load.rate, figures)]
        lines += memory_report(bench.processes)
    print("\n".join(lines))
    print(f"took {time.monotonic() - started:.0f} s")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rates", default="500,1000", help="comma-separated request rates")
    parser.add_argument("--seconds", type=float, default=2.0, help="measured seconds per run")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions (interleaved)")
    parser.add_argument("--connections", type=int, default=50, help="client connections")
    parser.add_argument(
        "--nice",
        type=int,
        default=-10 if os.geteuid() == 0 else 0,
        help="scheduling priority of every process of the benchmark (default -10 as root: "
        "on a shared machine, neighbours' bursts then delay requests far less)",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
