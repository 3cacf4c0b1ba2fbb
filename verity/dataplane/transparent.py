"""Transparent interception: iptables rules that pass a workload's TCP through its sidecar.

`verity dataplane run --transparent` installs, in the network namespace the agent runs in,
two chains of the nat table:

    PREROUTING -p tcp -> VERITY_INBOUND
        excluded inbound ports               RETURN
        everything else                      REDIRECT to redirectPortInbound (15006)
    OUTPUT -p tcp -> VERITY_OUTPUT
        Envoy's own connections (its gid)    RETURN  (else Envoy would redirect to itself)
        to loopback                          RETURN  (admin, readiness, Envoy -> app)
        to the control plane's address:port  RETURN  (the agent enrols before Envoy runs)
        excluded outbound ports              RETURN
        everything else                      REDIRECT to redirectPortOutbound (15001)

All inbound TCP is redirected, not only the declared ports: the inbound redirect listener
sends ports the Dataplane did not declare to a blackhole, so nothing on the host is reachable
around the sidecar (an app listening on 0.0.0.0 included). Envoy is told apart by a dedicated
group (`--proxy-gid`, 1337 by default, as Istio's uid): the agent starts it with that gid and
keeps its uid, so it can still read the 0600 bootstrap. Only IPv4 is intercepted.

The rule texts are pure functions of an `InterceptionPlan` (and, for removal, of what
`iptables-save` shows); `Interception` is the thin layer that applies them atomically with
`iptables-restore --noflush`, replacing in the same transaction any chains a killed agent
left behind. It is fail closed: a rule set that cannot be installed (or is not there
afterwards) is an error, never a warning, and rules already in place are then left alone.
A SIGKILLed agent leaves its rules too, which keeps the host closed (the redirect ports are
dead) until the next agent replaces them.

Not covered: UDP (DNS among it), IPv6, and processes that can change their group to the
proxy's or edit the rules (root can do both: run apps as other users).
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from verity.resources import Dataplane

log = logging.getLogger("verity.agent")

CHAIN_PREFIX = "VERITY_"
INBOUND_CHAIN = "VERITY_INBOUND"
OUTPUT_CHAIN = "VERITY_OUTPUT"
CHAINS = (INBOUND_CHAIN, OUTPUT_CHAIN)
DEFAULT_PROXY_GID = 1337
LOOPBACK = "127.0.0.0/8"
TABLE = "nat"
_JUMPS = (("PREROUTING", INBOUND_CHAIN), ("OUTPUT", OUTPUT_CHAIN))


class InterceptionError(RuntimeError):
    """The rules could not be installed (or removed); the message says which step and why."""


# ---------------------------------------------------------------------------------------------
# Pure: what the rules are


@dataclass(frozen=True, kw_only=True)
class InterceptionPlan:
    """Everything the rules depend on. `control_plane` holds IPv4 (address, port) pairs."""

    inbound_port: int
    outbound_port: int
    proxy_gid: int = DEFAULT_PROXY_GID
    control_plane: tuple[tuple[str, int], ...] = ()
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.inbound_port == self.outbound_port:
            raise ValueError("the inbound and outbound redirect ports must differ")
        ports = [self.inbound_port, self.outbound_port, *self.exclude_inbound_ports]
        ports += [*self.exclude_outbound_ports, *(port for _, port in self.control_plane)]
        for port in ports:
            _check_port(port)
        # gid 0 would exempt every process of the root group, typically the app itself.
        if not 0 < self.proxy_gid < 2**32 - 1:
            raise ValueError(f"proxy gid: {self.proxy_gid} must be a group other than root (0)")
        for address, _ in self.control_plane:
            if not isinstance(ipaddress.ip_address(address), ipaddress.IPv4Address):
                raise ValueError(f"control plane address: {address} is not an IPv4 address")
        if self.inbound_port in self.exclude_inbound_ports:
            raise ValueError(f"inbound port {self.inbound_port} cannot be excluded")


def _check_port(port: int) -> None:
    if not 0 < port < 65536:
        raise ValueError(f"{port} is not a TCP port")


def plan_for(
    dataplane: Dataplane,
    *,
    proxy_gid: int = DEFAULT_PROXY_GID,
    control_plane: Iterable[tuple[str, int]] = (),
    exclude_inbound_ports: Iterable[int] = (),
    exclude_outbound_ports: Iterable[int] = (),
) -> InterceptionPlan:
    """The plan of `dataplane`, whose spec must enable the transparent proxy: the control
    plane builds the redirect listeners only then, and redirecting to ports where nothing
    listens would cut the workload off."""
    proxy = dataplane.spec.transparent_proxy
    if not proxy.enabled:
        raise ValueError("spec.transparentProxy.enabled must be true")
    return InterceptionPlan(
        inbound_port=proxy.redirect_port_inbound,
        outbound_port=proxy.redirect_port_outbound,
        proxy_gid=proxy_gid,
        control_plane=tuple(control_plane),
        exclude_inbound_ports=tuple(exclude_inbound_ports),
        exclude_outbound_ports=tuple(exclude_outbound_ports),
    )


def inbound_rules(plan: InterceptionPlan) -> list[str]:
    """The VERITY_INBOUND chain, in iptables-restore syntax."""
    rules = [_port_exemption(INBOUND_CHAIN, plan.exclude_inbound_ports)]
    rules.append(f"-A {INBOUND_CHAIN} -p tcp -j REDIRECT --to-ports {plan.inbound_port}")
    return [rule for rule in rules if rule]


def output_rules(plan: InterceptionPlan) -> list[str]:
    """The VERITY_OUTPUT chain, in iptables-restore syntax. Order matters: every exemption
    comes before the final REDIRECT."""
    chain = OUTPUT_CHAIN
    rules = [
        f"-A {chain} -m owner --gid-owner {plan.proxy_gid} -j RETURN",
        f"-A {chain} -d {LOOPBACK} -j RETURN",
        *(
            f"-A {chain} -d {address}/32 -p tcp -m tcp --dport {port} -j RETURN"
            for address, port in sorted(set(plan.control_plane))
        ),
        _port_exemption(chain, plan.exclude_outbound_ports),
        f"-A {chain} -p tcp -j REDIRECT --to-ports {plan.outbound_port}",
    ]
    return [rule for rule in rules if rule]


def _port_exemption(chain: str, ports: Iterable[int]) -> str:
    unique = sorted(set(ports))
    if not unique:
        return ""
    # multiport takes at most 15 ports; more than that is not a sane exclusion list.
    if len(unique) > 15:
        raise ValueError(f"{chain}: at most 15 excluded ports (got {len(unique)})")
    listed = ",".join(str(port) for port in unique)
    return f"-A {chain} -p tcp -m multiport --dports {listed} -j RETURN"


def install_script(plan: InterceptionPlan, saved: str = "") -> str:
    """The iptables-restore input (for --noflush) that creates both chains and the jumps, and
    in the same transaction replaces whatever VERITY_* rules `saved` (an `iptables-save -t
    nat` output) holds: there is no moment without interception, even when a restarted agent
    replaces the rules of a killed one."""
    # Declaring an existing chain under --noflush flushes it.
    lines = [f"*{TABLE}", *(f":{chain} - [0:0]" for chain in CHAINS)]
    lines += _jump_deletions(saved)
    others = [chain for chain in our_chains(saved) if chain not in CHAINS]
    lines += [f"-F {chain}" for chain in others] + [f"-X {chain}" for chain in others]
    lines += inbound_rules(plan) + output_rules(plan)
    lines += [f"-A {builtin} -p tcp -j {chain}" for builtin, chain in _JUMPS]
    return "\n".join([*lines, "COMMIT", ""])


def our_chains(saved: str) -> list[str]:
    """The VERITY_* chains an `iptables-save -t nat` output declares."""
    return [
        line[1:].split()[0] for line in saved.splitlines() if line.startswith(":" + CHAIN_PREFIX)
    ]


def removal_script(saved: str) -> str | None:
    """The iptables-restore input that removes every VERITY_* chain and every rule jumping to
    one, as found in `saved` (an `iptables-save -t nat` output); None if there is none.

    Derived from what is there rather than from a plan, so that it also removes what an
    agent with other settings (or a killed one) left behind, duplicates included.
    """
    chains = our_chains(saved)
    jumps = _jump_deletions(saved)
    if not chains and not jumps:
        return None
    lines = [f"*{TABLE}", *jumps]
    lines += [f"-F {chain}" for chain in chains] + [f"-X {chain}" for chain in chains]
    return "\n".join([*lines, "COMMIT", ""])


def _jump_deletions(saved: str) -> list[str]:
    """A `-D` for every rule of another chain that jumps to a VERITY_* chain, as many times
    as it is there."""
    return [
        "-D" + line[2:]
        for line in saved.splitlines()
        if line.startswith("-A ")
        and not line.split()[1].startswith(CHAIN_PREFIX)
        and _jumps_to_ours(line)
    ]


def _jumps_to_ours(rule: str) -> bool:
    words = rule.split()
    return any(
        flag in ("-j", "-g") and target.startswith(CHAIN_PREFIX)
        for flag, target in itertools.pairwise(words)
    )


def installed(saved: str, plan: InterceptionPlan) -> bool:
    """Whether `saved` holds both chains, each jumped to exactly once, each ending in its
    REDIRECT: the check after installing (a silent partial install must not pass)."""
    lines = saved.splitlines()
    for builtin, chain in _JUMPS:
        jumps = [line for line in lines if line.startswith(f"-A {builtin} ") and chain in line]
        rules = [line for line in lines if line.startswith(f"-A {chain} ")]
        if len(jumps) != 1 or not rules or "REDIRECT" not in rules[-1]:
            return False
    ports = (plan.inbound_port, plan.outbound_port)
    return all(f"--to-ports {port}" in saved for port in ports)


# ---------------------------------------------------------------------------------------------
# I/O: applying them


Runner = Callable[[Sequence[str], str], "subprocess.CompletedProcess[str]"]


def run_command(argv: Sequence[str], stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), input=stdin, capture_output=True, text=True, timeout=30, check=False
    )


class Interceptor(Protocol):
    """What the agent needs (Interception is the real one)."""

    def install(self) -> None: ...
    def remove(self) -> None: ...


class Interception:
    """Installs the plan's rules in the current network namespace, and removes them."""

    def __init__(
        self,
        plan: InterceptionPlan,
        *,
        runner: Runner = run_command,
        save: str = "iptables-save",
        restore: str = "iptables-restore",
        attempts: int = 3,
    ) -> None:
        self.plan = plan
        self._run = runner
        self._save = save
        self._restore = restore
        self._attempts = attempts

    def install(self) -> None:
        """Replace any VERITY_* chains with the plan's; InterceptionError if that fails."""
        self._require_tools()
        saved = self._saved()
        if removal_script(saved) is not None:
            log.warning("replacing interception rules left by an earlier agent")
        self._apply(install_script(self.plan, saved), "install the rules")
        if not installed(self._saved(), self.plan):
            raise InterceptionError("the rules are not in place after installing them")
        log.info(
            "interception rules installed",
            extra={
                "chains": list(CHAINS),
                "redirect_inbound": self.plan.inbound_port,
                "redirect_outbound": self.plan.outbound_port,
                "proxy_gid": self.plan.proxy_gid,
                "control_plane": [f"{a}:{p}" for a, p in self.plan.control_plane],
                "exclude_inbound_ports": list(self.plan.exclude_inbound_ports),
                "exclude_outbound_ports": list(self.plan.exclude_outbound_ports),
            },
        )

    def remove(self) -> None:
        """Remove every VERITY_* chain and its jumps; logs (never raises) on failure, since
        it runs on the way out."""
        try:
            script = removal_script(self._saved())
            if script is not None:
                self._apply(script, "remove the rules")
        except InterceptionError as exc:
            log.error("interception rules not removed", extra={"error": str(exc)})
            return
        log.info("interception rules removed", extra={"chains": list(CHAINS)})

    def _require_tools(self) -> None:
        for tool in (self._save, self._restore):
            if shutil.which(tool) is None:
                raise InterceptionError(f"{tool} not found (install the iptables package)")

    def _saved(self) -> str:
        result = self._call([self._save, "-t", TABLE], "", "read the nat table")
        return result.stdout

    def _apply(self, script: str, what: str) -> None:
        self._call([self._restore, "--noflush"], script, what)

    def _call(self, argv: list[str], stdin: str, what: str) -> subprocess.CompletedProcess[str]:
        """Run an iptables tool, retrying briefly: another program may hold the xtables lock."""
        reason = ""
        for attempt in range(self._attempts):
            try:
                result = self._run(argv, stdin)
            except (OSError, subprocess.SubprocessError) as exc:
                raise InterceptionError(f"could not {what}: {exc}") from None
            if result.returncode == 0:
                return result
            reason = " ".join((result.stderr or result.stdout).split()) or "no output"
            if attempt + 1 < self._attempts:
                time.sleep(0.2 * (attempt + 1))
        command = shlex.join(argv)
        raise InterceptionError(f"could not {what}: {command} failed: {reason}")
