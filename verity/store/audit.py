"""The audit trail's hash chain, as pure functions (no storage, no clock).

Each entry's hash is the sha256 of the canonical JSON of all its other fields, prev_hash
included, so changing any field of an entry breaks its own hash and removing an entry breaks
the next entry's prev_hash. The store also keeps the chain head (last seq and hash) next to the
store revision, which catches a truncated tail. A chain kept in the same database can still be
rewritten wholesale by someone with write access to the file: anchoring the head elsewhere
(an external log, a signed checkpoint) is what makes it tamper-evident against that.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from verity.store.base import AuditEntry
from verity.store.canonical import canonical_json, sha256_hex

GENESIS_HASH = "0" * 64


@dataclass(frozen=True)
class ChainHead:
    """The last entry of the chain (seq 0 and the genesis hash when the chain is empty)."""

    seq: int
    hash: str


EMPTY_CHAIN = ChainHead(0, GENESIS_HASH)


def entry_hash(entry: AuditEntry) -> str:
    """sha256 of the canonical JSON of every field but the hash itself."""
    fields = {
        "seq": entry.seq,
        "at": entry.at,
        "actor": entry.actor,
        "action": entry.action,
        "kind": entry.kind,
        "namespace": entry.namespace,
        "name": entry.name,
        "old_version": entry.old_version,
        "new_version": entry.new_version,
        "spec_digest": entry.spec_digest,
        "prev_hash": entry.prev_hash,
    }
    return sha256_hex(canonical_json(fields))


def next_entry(
    head: ChainHead,
    *,
    at: str,
    actor: str,
    action: str,
    kind: str,
    namespace: str,
    name: str,
    old_version: int | None,
    new_version: int | None,
    spec_digest: str,
) -> AuditEntry:
    """The entry that follows head, with its hash filled in."""
    unhashed = AuditEntry(
        seq=head.seq + 1,
        at=at,
        actor=actor,
        action=action,
        kind=kind,
        namespace=namespace,
        name=name,
        old_version=old_version,
        new_version=new_version,
        spec_digest=spec_digest,
        prev_hash=head.hash,
        hash="",
    )
    return replace(unhashed, hash=entry_hash(unhashed))


def _link_problems(entry: AuditEntry, previous: AuditEntry | None) -> list[str]:
    expected_seq = previous.seq + 1 if previous else 1
    expected_prev = previous.hash if previous else GENESIS_HASH
    problems = []
    if entry.seq != expected_seq:
        problems.append(
            f"entry {entry.seq}: gap in seq, entries {expected_seq}..{entry.seq - 1} are missing"
        )
    if entry.prev_hash != expected_prev:
        after = f"entry {previous.seq}" if previous else "the start of the chain"
        problems.append(f"entry {entry.seq}: prev_hash does not match {after}")
    return problems


def verify_chain(entries: Iterable[AuditEntry], head: ChainHead | None = None) -> list[str]:
    """Human-readable problems of a chain given in seq order; empty when it is intact.

    head, when given, is the last entry the store recorded; a chain that ends elsewhere has
    lost (or gained) entries at its end.
    """
    problems: list[str] = []
    previous: AuditEntry | None = None
    for entry in entries:
        if entry_hash(entry) != entry.hash:
            problems.append(f"entry {entry.seq}: hash mismatch")
        problems.extend(_link_problems(entry, previous))
        previous = entry
    last = ChainHead(previous.seq, previous.hash) if previous else EMPTY_CHAIN
    if head is not None and last != head:
        problems.append(
            f"chain ends at entry {last.seq} but the store recorded entry {head.seq} as the last"
        )
    return problems
