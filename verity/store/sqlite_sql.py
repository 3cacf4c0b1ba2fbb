"""Every SQL statement of the SQLite backend: the schema, its migrations and the queries.

Statements are assembled only from the constant fragments below; every value is a bound
parameter (hence the S608 waivers). The token statements name columns, not secrets (S105).

Objects keep their labels twice: as JSON in the row (returned as is) and as one row per pair
in object_labels (indexed by key and value), so a label selector is answered by the index
and only matching rows are read and decoded.
"""

from __future__ import annotations

from verity.store.audit import GENESIS_HASH

SCHEMA_VERSION = 1

CREATE_SCHEMA_VERSION = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
SELECT_SCHEMA_VERSION = "SELECT max(version) FROM schema_version"
INSERT_SCHEMA_VERSION = "INSERT INTO schema_version (version) VALUES (?)"

# MIGRATIONS[n] takes schema version n-1 to n, in the same transaction as the version bump.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        # The store revision (bumped once per changed object) and the audit chain head, in
        # one row that every write updates.
        """CREATE TABLE store_state (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            revision INTEGER NOT NULL,
            audit_seq INTEGER NOT NULL,
            audit_hash TEXT NOT NULL
        )""",
        f"INSERT INTO store_state VALUES (1, 0, 0, '{GENESIS_HASH}')",  # noqa: S608
        """CREATE TABLE objects (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,
            namespace TEXT NOT NULL,
            name TEXT NOT NULL,
            api_version TEXT NOT NULL,
            labels TEXT NOT NULL,
            document TEXT NOT NULL,
            spec_digest TEXT NOT NULL,
            uid TEXT NOT NULL UNIQUE,
            resource_version INTEGER NOT NULL,
            generation INTEGER NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            UNIQUE (kind, namespace, name)
        )""",
        "CREATE INDEX objects_by_namespace ON objects (namespace, kind, name)",
        """CREATE TABLE object_labels (
            object_id INTEGER NOT NULL REFERENCES objects (id) ON DELETE CASCADE,
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (object_id, key)
        ) WITHOUT ROWID""",
        "CREATE INDEX object_labels_by_pair ON object_labels (key, value)",
        # The change log behind watch(). Kept forever for now: it is small next to the
        # objects, and compaction (with a "too old, relist" answer to watch) can come later.
        """CREATE TABLE changes (
            revision INTEGER PRIMARY KEY,
            type TEXT NOT NULL,
            kind TEXT NOT NULL,
            namespace TEXT NOT NULL,
            name TEXT NOT NULL,
            object TEXT NOT NULL
        )""",
        """CREATE TABLE audit (
            seq INTEGER PRIMARY KEY,
            at TEXT NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            kind TEXT NOT NULL,
            namespace TEXT NOT NULL,
            name TEXT NOT NULL,
            old_version INTEGER,
            new_version INTEGER,
            spec_digest TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        )""",
        "CREATE INDEX audit_by_object ON audit (kind, namespace)",
        "CREATE INDEX audit_by_actor ON audit (actor)",
        """CREATE TABLE tokens (
            name TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            secret_hash TEXT NOT NULL UNIQUE,
            scope TEXT NOT NULL,
            created_at TEXT NOT NULL,
            expires_at TEXT,
            revoked_at TEXT
        )""",
        "CREATE TABLE blobs (key TEXT PRIMARY KEY, value BLOB NOT NULL)",
    ),
}

SELECT_STATE = "SELECT revision, audit_seq, audit_hash FROM store_state WHERE id = 1"
UPDATE_STATE = "UPDATE store_state SET revision = ?, audit_seq = ?, audit_hash = ? WHERE id = 1"

OBJECT_COLUMNS = (
    "o.kind, o.namespace, o.name, o.api_version, o.labels, o.document, o.spec_digest, o.uid,"
    " o.resource_version, o.generation, o.created_at, o.updated_at"
)
SELECT_OBJECT = (
    f"SELECT {OBJECT_COLUMNS} FROM objects o WHERE o.kind = ? AND o.namespace = ? AND o.name = ?"  # noqa: S608
)
INSERT_OBJECT = """INSERT INTO objects (kind, namespace, name, api_version, labels, document,
    spec_digest, uid, resource_version, generation, created_at, updated_at)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id"""
UPDATE_OBJECT = """UPDATE objects SET api_version = ?, labels = ?, document = ?, spec_digest = ?,
    resource_version = ?, generation = ?, updated_at = ?
    WHERE kind = ? AND namespace = ? AND name = ? RETURNING id"""
DELETE_OBJECT = "DELETE FROM objects WHERE kind = ? AND namespace = ? AND name = ?"
DELETE_LABELS = "DELETE FROM object_labels WHERE object_id = ?"
INSERT_LABEL = "INSERT INTO object_labels (object_id, key, value) VALUES (?, ?, ?)"
LABEL_PAIR = "SELECT object_id FROM object_labels WHERE key = ? AND value = ?"


def select_objects(*, by_kind: bool, by_namespace: bool, label_count: int) -> str:
    """The list query for the given filters; parameters go kind, namespace, then key/value pairs.

    A label selector intersects the id sets of its pairs inside the label index before any
    object row is read, so a broad label (app=web) paired with a narrow one (team=x) costs
    the narrow result, whichever comes first.
    """
    conditions = []
    if by_kind:
        conditions.append("o.kind = ?")
    if by_namespace:
        conditions.append("o.namespace = ?")
    if label_count:
        conditions.append(f"o.id IN ({' INTERSECT '.join([LABEL_PAIR] * label_count)})")
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    return f"SELECT {OBJECT_COLUMNS} FROM objects o{where} ORDER BY o.kind, o.namespace, o.name"  # noqa: S608


INSERT_CHANGE = """INSERT INTO changes (revision, type, kind, namespace, name, object)
    VALUES (?, ?, ?, ?, ?, ?)"""
SELECT_CHANGES = """SELECT revision, type, object FROM changes
    WHERE revision > ? ORDER BY revision LIMIT ?"""

AUDIT_COLUMNS = (
    "seq, at, actor, action, kind, namespace, name, old_version, new_version, spec_digest,"
    " prev_hash, hash"
)
INSERT_AUDIT = f"INSERT INTO audit ({AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"  # noqa: S608
SELECT_AUDIT_CHAIN = f"SELECT {AUDIT_COLUMNS} FROM audit ORDER BY seq"  # noqa: S608


def select_audit(*, by_kind: bool, by_namespace: bool, by_actor: bool) -> str:
    """Newest N matching entries (LIMIT ?, -1 for all), returned oldest first."""
    conditions = [
        column
        for column, used in (
            ("kind = ?", by_kind),
            ("namespace = ?", by_namespace),
            ("actor = ?", by_actor),
        )
        if used
    ]
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    newest = f"SELECT {AUDIT_COLUMNS} FROM audit{where} ORDER BY seq DESC LIMIT ?"  # noqa: S608
    return f"SELECT * FROM ({newest}) ORDER BY seq"  # noqa: S608


TOKEN_COLUMNS = "name, kind, secret_hash, scope, created_at, expires_at, revoked_at"  # noqa: S105
INSERT_TOKEN = f"INSERT INTO tokens ({TOKEN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"  # noqa: S608
TOKEN_NAME_EXISTS = "SELECT 1 FROM tokens WHERE name = ?"  # noqa: S105
TOKEN_HASH_EXISTS = "SELECT 1 FROM tokens WHERE secret_hash = ?"  # noqa: S105
SELECT_TOKEN_BY_HASH = f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE secret_hash = ?"  # noqa: S608
SELECT_TOKENS = f"SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY name"  # noqa: S608
REVOKE_TOKEN = "UPDATE tokens SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL"  # noqa: S105

SELECT_BLOB = "SELECT value FROM blobs WHERE key = ?"
UPSERT_BLOB = """INSERT INTO blobs (key, value) VALUES (?, ?)
    ON CONFLICT (key) DO UPDATE SET value = excluded.value"""
