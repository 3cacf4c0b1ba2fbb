"""The API in-process over ASGI with a real SQLite store: nothing a client sends gives a 500."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from verity.controlplane.api import create_app
from verity.controlplane.server import ensure_admin_token
from verity.store import open_store
from verity.store.base import Store


async def _client(store: Store, data_dir: Path) -> httpx.AsyncClient:
    token = (await ensure_admin_token(store, data_dir)).read_text().strip()
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(store, body_limit=64 * 1024)),
        base_url="http://api",
        headers={"Authorization": f"Bearer {token}"},
    )


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    store = open_store(str(tmp_path / "verity.db"))
    await store.open()
    async with await _client(store, tmp_path) as client:
        yield client
    await store.close()


async def test_unknown_kind_is_404_with_known_kinds(api: httpx.AsyncClient) -> None:
    reply = await api.get("/api/v1/resources/widgets")
    assert reply.status_code == 404
    assert "widgets" in reply.json()["error"]


async def test_bad_label_selector_is_400(api: httpx.AsyncClient) -> None:
    reply = await api.get("/api/v1/resources/ap", params={"labelSelector": "novalue"})
    assert reply.status_code == 400 and "labelSelector" in reply.json()["error"]


async def test_non_utf8_body_is_400(api: httpx.AsyncClient) -> None:
    reply = await api.post("/api/v1/apply", content=b"\xff\xfe\x00kind")
    assert reply.status_code == 400 and "UTF-8" in reply.json()["error"]


async def test_empty_body_is_400(api: httpx.AsyncClient) -> None:
    reply = await api.post("/api/v1/apply", content=b"")
    assert reply.status_code == 400


async def test_bad_token_request_is_422_naming_field(api: httpx.AsyncClient) -> None:
    reply = await api.post("/api/v1/tokens", json={"name": "Bad Name!", "namespaces": ["x"]})
    assert reply.status_code == 422 and "name" in reply.json()["error"]


DOCUMENTS = st.one_of(
    st.text(max_size=400),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20)),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(
                st.sampled_from(
                    [
                        "apiVersion",
                        "kind",
                        "metadata",
                        "spec",
                        "name",
                        "namespace",
                        "rules",
                        "mtls",
                        "mode",
                        "selector",
                        "type",
                        "mesh",
                        "x",
                    ]
                ),
                children,
                max_size=5,
            )
        ),
        max_leaves=20,
    ).map(str),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=DOCUMENTS)
def test_no_body_gives_a_server_error(body: str) -> None:
    import asyncio

    async def probe() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            store = open_store(str(Path(tmp) / "verity.db"))
            await store.open()
            try:
                async with await _client(store, Path(tmp)) as client:
                    for path in ("/api/v1/apply", "/api/v1/delete", "/api/v1/update"):
                        reply = await client.post(path, content=body.encode())
                        assert reply.status_code < 500, (path, body, reply.text)
            finally:
                await store.close()

    asyncio.run(probe())
