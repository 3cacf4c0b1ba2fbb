"""Reading YAML (and JSON) safely: plain data only, and nothing ambiguous.

On top of `yaml.safe_load` semantics: duplicate keys are refused (the last one would
silently win, hiding part of a policy), aliases are refused (they let a small document
expand exponentially), and timestamps stay strings (as the Kubernetes API reads them).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node

from verity.resources.errors import FieldError, InvalidResource, describe

_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"


class _StrictSafeLoader(yaml.SafeLoader):
    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if self.check_event(yaml.AliasEvent):
            # check_event() has peeked the alias into current_event.
            mark = self.current_event.start_mark
            raise ComposerError(None, None, "YAML aliases (*name) are not supported", mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable) and key in seen:
                raise ConstructorError(
                    None, None, f"duplicate key {describe(key)}", key_node.start_mark
                )
            if isinstance(key, Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep)


_StrictSafeLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != _TIMESTAMP_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def read_documents(text: str) -> Iterator[tuple[int, Any]]:
    """(1-based position, data) for every document, empty ones included (as None)."""
    documents = yaml.load_all(text, Loader=_StrictSafeLoader)
    position = 1
    while True:
        try:
            data = next(documents)
        except StopIteration:
            return
        except yaml.YAMLError as exc:
            raise _syntax_error(position, exc) from None
        except RecursionError:
            reason = "invalid YAML: nested too deeply"
            raise InvalidResource(f"document {position}", [FieldError("", reason)]) from None
        yield position, data
        position += 1


def _syntax_error(position: int, exc: yaml.YAMLError) -> InvalidResource:
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
    reason = getattr(exc, "problem", None) or str(exc)
    return InvalidResource(f"document {position}", [FieldError(where, f"invalid YAML: {reason}")])
