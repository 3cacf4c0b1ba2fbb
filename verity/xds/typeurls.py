"""The xDS v3 type URLs Verity serves, and the order in which changes are pushed."""

from __future__ import annotations

_PREFIX = "type.googleapis.com/"

LISTENER = _PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
CLUSTER = _PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET = _PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"

# Make-before-break (xDS protocol, "eventual consistency considerations"): clusters first,
# then their endpoints, then the listeners that route to them, then the routes those
# listeners name. Secrets are asked for by name by the clusters and listeners that need
# them, so their place only matters among already subscribed names; they go last.
PUSH_ORDER: tuple[str, ...] = (CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET)

# In state-of-the-world xDS, LDS and CDS requests subscribe to every resource of the type
# ("wildcard"); the other types subscribe to the names listed in the request.
WILDCARD_TYPES: frozenset[str] = frozenset({LISTENER, CLUSTER})

SHORT_NAMES: dict[str, str] = {
    LISTENER: "lds",
    ROUTE: "rds",
    CLUSTER: "cds",
    ENDPOINT: "eds",
    SECRET: "sds",
}


def type_url_of(full_name: str) -> str:
    """The type URL of a protobuf message type, from its full name."""
    return _PREFIX + full_name


def push_rank(type_url: str) -> int:
    """Sort key that puts type URLs in push order; types Verity does not know go last."""
    try:
        return PUSH_ORDER.index(type_url)
    except ValueError:
        return len(PUSH_ORDER)


def short_name(type_url: str) -> str:
    """A short label for logs and status ("cds", "eds", ...), or the type's own name."""
    return SHORT_NAMES.get(type_url, type_url.rsplit(".", 1)[-1])
