"""open_store(): paths and URLs."""

from __future__ import annotations

from pathlib import Path

import pytest

from verity.store import SqliteStore, open_store
from verity.store.base import StoreError

from .conftest import apply_op


def test_path_url_and_data_dir(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    for spec in (str(db), f"sqlite://{db}"):
        store = open_store(spec)
        assert isinstance(store, SqliteStore) and store.path == db
    store = open_store(str(tmp_path))
    assert isinstance(store, SqliteStore) and store.path == tmp_path / "verity.db"


@pytest.mark.parametrize(
    "url", ["postgresql://user:hunter2@db/verity", "postgres://db/v", "postgresql+psycopg://db/v"]
)
def test_postgresql_is_not_supported_yet(url: str) -> None:
    with pytest.raises(StoreError, match="PostgreSQL store is not supported yet") as raised:
        open_store(url)
    assert "hunter2" not in str(raised.value)


@pytest.mark.parametrize("url", ["mysql://db/v", "sqlite://host/x.db", "sqlite:///x.db?mode=ro"])
def test_other_urls_are_refused(url: str) -> None:
    with pytest.raises(StoreError):
        open_store(url)


async def test_opened_store_works_and_persists(tmp_path: Path) -> None:
    store = open_store(f"sqlite://{tmp_path}/nested/dir/verity.db")
    await store.open()
    await store.write([apply_op("a")], actor="x")
    await store.close()
    assert (tmp_path / "nested/dir/verity.db").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "nested/dir").stat().st_mode & 0o777 == 0o700
    reopened = open_store(str(tmp_path / "nested/dir"))
    await reopened.open()
    assert [o.key.name for o in await reopened.list()] == ["a"]
    await reopened.close()
