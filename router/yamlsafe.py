"""Parse YAML with bounds: nesting depth and what aliases and merge keys expand to (no bombs, no RecursionError)."""

from __future__ import annotations

from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.nodes import MappingNode, Node, SequenceNode

# A real config nests 5 levels and has a few hundred nodes; these bounds are far above that and far
# below what takes noticeable time or memory. Both count the document as aliases and merge keys
# expand it, so "billion laughs" and merge-key bombs fail at once instead of running for minutes.
MAX_DEPTH = 64
MAX_NODES = 100_000


class YAMLLimitError(ComposerError):
    """The document nests too deep, expands to too many nodes, or an alias refers to itself."""


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer refuses documents nested deeper than MAX_DEPTH (it recurses per level)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:
        # The scanner keeps one possible key per open bracket and rechecks them all per token: stop at
        # the depth bound rather than spend quadratic time on "[[[[…" before the composer sees it.
        if self.flow_level >= MAX_DEPTH:
            raise YAMLLimitError(None, None, f"nested more than {MAX_DEPTH} levels deep; flatten the file",
                                 self.get_mark())
        super().fetch_flow_collection_start(TokenClass)

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                event = self.peek_event()
                raise YAMLLimitError(None, None, f"nested more than {MAX_DEPTH} levels deep; "
                                     "flatten the file", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def compose(text: str) -> Node | None:
    """The root node of a one-document YAML text, checked with `check_bounds`; yaml.YAMLError if not."""
    loader = _BoundedLoader(text)
    try:
        root: Node | None = loader.get_single_node()
    finally:
        loader.dispose()
    if root is not None:
        check_bounds(root)
    return root


def safe_load(text: str) -> Any:
    """yaml.safe_load with the bounds of `compose`."""
    root = compose(text)
    if root is None:
        return None
    constructor = yaml.constructor.SafeConstructor()
    return constructor.construct_document(root)


def check_bounds(root: Node) -> None:
    """Raise YAMLLimitError when `root`, with every alias and merge key expanded, is a cycle, nests
    deeper than MAX_DEPTH or counts more than MAX_NODES nodes. Linear in the composed graph's size."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        kids = _children(node)
        if children_done:
            on_path.discard(key)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            if depth[key] > MAX_DEPTH:
                raise YAMLLimitError(None, None, f"nested more than {MAX_DEPTH} levels deep once aliases "
                                     "(*name) are expanded; flatten the file", node.start_mark)
            if size[key] > MAX_NODES:
                raise YAMLLimitError(None, None, f"aliases (*name) and merge keys (<<) here expand to more than "
                                     f"{MAX_NODES} values; write the values out instead", node.start_mark)
            continue
        if key in size:
            continue
        if key in on_path:
            raise YAMLLimitError(None, None, "an alias (*name) refers to the value that contains it",
                                 node.start_mark)
        on_path.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in kids if id(k) not in size)
    return None


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []
