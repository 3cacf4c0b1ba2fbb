"""Each mesh's CA as the control plane keeps it: sealed in the store, shared by replicas.

The CA (and, during a root rotation, the incoming one) is sealed with the key-encryption key
and kept as a store blob, so several control-plane replicas share one CA and a restart keeps
it (proxies never lose trust). Creation uses compare-and-set: two replicas racing to create a
mesh's CA end up with the same one. No API returns the sealed blob or the key.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from verity.pki import (
    CertificateAuthority,
    InvalidCA,
    IssuedSvid,
    Kek,
    KeyAlgorithm,
    RevocationList,
    RotationStage,
    RotationState,
    SpiffeId,
    advance,
    generate_builtin_ca,
    issue_svid,
    load_provided_ca,
    seal_ca,
    stable,
    unseal_ca,
)
from verity.resources import KumaMesh, Mesh, MeshSpec, parse_document
from verity.resources import RevocationList as RevocationListResource
from verity.store.base import ObjectKey, Store

_KEY_TYPES = {
    "ECDSA_P256": KeyAlgorithm.ECDSA_P256,
    "RSA_2048": KeyAlgorithm.RSA_2048,
    "RSA_3072": KeyAlgorithm.RSA_3072,
}


class MeshNotFound(LookupError):
    pass


@dataclass(frozen=True)
class MeshView:
    name: str
    spec: MeshSpec


def _blob_key(mesh: str) -> str:
    return f"ca/{mesh}"


def encode_state(state: RotationState, kek: Kek) -> bytes:
    return json.dumps(
        {
            "stage": state.stage.value,
            "current": base64.b64encode(seal_ca(state.current, kek)).decode(),
            "incoming": base64.b64encode(seal_ca(state.incoming, kek)).decode()
            if state.incoming
            else None,
        }
    ).encode()


def decode_state(blob: bytes, kek: Kek, mesh: str) -> RotationState:
    raw = json.loads(blob)
    incoming = raw.get("incoming")
    return RotationState(
        stage=RotationStage(raw["stage"]),
        current=unseal_ca(base64.b64decode(raw["current"]), kek, mesh),
        incoming=unseal_ca(base64.b64decode(incoming), kek, mesh) if incoming else None,
    )


def _read_pem(inline: str | None, file: str | None) -> bytes:
    if inline:
        return inline.encode()
    assert file is not None  # the Mesh model requires one of the two
    return Path(file).read_bytes()


def new_ca(mesh: MeshView, now: datetime) -> CertificateAuthority:
    """A CA for the mesh as its spec says: a fresh builtin root, or the user's provided CA."""
    ca_spec = mesh.spec.ca
    trust_domain = mesh.spec.trust_domain
    if ca_spec.backend == "provided" and ca_spec.provided is not None:
        provided = ca_spec.provided
        try:
            cert = _read_pem(provided.cert_pem, provided.cert_file)
            key = _read_pem(provided.key_pem, provided.key_file)
        except OSError as exc:
            raise InvalidCA(f"provided CA: cannot read {exc.filename}: {exc.strerror}") from exc
        return load_provided_ca(mesh.name, trust_domain, cert, key, now)
    key_type = _KEY_TYPES[ca_spec.builtin_settings.key_type]
    return generate_builtin_ca(mesh.name, trust_domain, now, key_algorithm=key_type)


class MeshCAs:
    """Loads, creates and rotates mesh CAs; issues SVIDs with them."""

    def __init__(
        self, store: Store, kek: Kek, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self._store = store
        self._kek = kek
        self._clock = clock
        self._cache: dict[str, tuple[bytes, RotationState]] = {}
        self._lock = asyncio.Lock()

    async def mesh(self, name: str) -> MeshView:
        obj = await self._store.get(ObjectKey("Mesh", "", name))
        if obj is None:
            raise MeshNotFound(f"mesh {name!r} does not exist")
        resource = parse_document(obj.document)
        assert isinstance(resource, Mesh | KumaMesh)
        return MeshView(name, resource.as_verity_mesh())

    async def state(self, mesh_name: str) -> RotationState:
        """The mesh's CA state, created on first use (compare-and-set against other replicas)."""
        blob = await self._store.get_blob(_blob_key(mesh_name))
        if blob is None:
            async with self._lock:
                blob = await self._create(mesh_name)
        cached = self._cache.get(mesh_name)
        if cached is not None and cached[0] == blob:
            return cached[1]
        state = decode_state(blob, self._kek, mesh_name)
        self._cache[mesh_name] = (blob, state)
        return state

    async def _create(self, mesh_name: str) -> bytes:
        existing = await self._store.get_blob(_blob_key(mesh_name))
        if existing is not None:
            return existing
        mesh = await self.mesh(mesh_name)
        blob = encode_state(stable(new_ca(mesh, self._clock())), self._kek)
        if await self._store.put_blob(_blob_key(mesh_name), blob, expected=None):
            return blob
        winner = await self._store.get_blob(_blob_key(mesh_name))
        assert winner is not None
        return winner

    async def revocations(self, mesh_name: str) -> RevocationList:
        obj = await self._store.get(ObjectKey("RevocationList", "", mesh_name))
        if obj is None:
            return RevocationList()
        resource = parse_document(obj.document)
        assert isinstance(resource, RevocationListResource)
        return RevocationList(
            identities={
                i.spiffe_id: datetime.fromisoformat(i.revoked_at.replace("Z", "+00:00"))
                for i in resource.spec.identities
            }
        )

    async def issue(self, mesh_name: str, identity: SpiffeId, csr_pem: bytes) -> IssuedSvid:
        """Sign the CSR for `identity`, which the caller authenticated, in its mesh."""
        mesh = await self.mesh(mesh_name)
        state = await self.state(mesh_name)
        return issue_svid(
            state.signing_ca,
            csr_pem,
            identity,
            self._clock(),
            mesh.spec.certificates.validity,
            revocations=await self.revocations(mesh_name),
        )

    async def rotate(self, mesh_name: str, reached_all_proxies: bool) -> RotationState:
        """Advance the root rotation by one stage (gated on the previous one's propagation)."""
        current_blob = await self._store.get_blob(_blob_key(mesh_name))
        state = await self.state(mesh_name)
        fresh = None
        if state.stage is RotationStage.STABLE:
            fresh = new_ca(await self.mesh(mesh_name), self._clock())
        next_state = advance(
            state, previous_stage_reached_all_proxies=reached_all_proxies, new_ca=fresh
        )
        blob = encode_state(next_state, self._kek)
        if current_blob is None or not await self._store.put_blob(
            _blob_key(mesh_name), blob, expected=current_blob
        ):
            raise RuntimeError("the CA changed concurrently (another replica rotated); retry")
        self._cache[mesh_name] = (blob, next_state)
        return next_state
