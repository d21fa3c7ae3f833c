"""The one way xcent reads YAML: bounded in size and in expansion.

A YAML file is a graph, not a tree: an anchor (``&a``) may be referenced by any
number of aliases (``*a``), so a file of a few hundred bytes can describe a document
of billions of nodes (the "billion laughs" bomb: nine aliases of nine aliases of ...).
PyYAML's safe loader builds such a document quickly, as shared Python objects; what
hangs (and grows memory without bound) is whatever walks it afterwards as a tree:
jsonargparse's config parsing, a ``json.dumps``, a comparison of two configs.

So every YAML text xcent reads (``--config`` files of every command, the values
jsonargparse parses from the command line, ``OUT/config.yaml`` of a run) goes through
:func:`load_yaml`, which first composes the text into nodes (cheap: aliases stay
shared) and counts the nodes of the document *as a tree* (each alias counted as the
whole subtree it stands for, memoised per node, so the count costs one visit per
distinct node). A text longer than :data:`MAX_YAML_BYTES`, deeper than PyYAML's
recursion allows, with a recursive alias, or expanding to more than
:data:`MAX_YAML_NODES` nodes is refused with one line naming where it came from.
A configuration has a few dozen keys; the bounds are far above any real one.
JSON read from files goes through :func:`load_json` (nesting too deep for the parser
is a ValueError, as any other text that is not JSON).

jsonargparse reads ``--config`` files and typed flag values with the loader of its
parser's ``parser_mode``; :func:`argument_parser` makes parsers whose mode is
:data:`PARSER_MODE`, jsonargparse's own YAML loader behind this check.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UsageError

__all__ = ["MAX_YAML_BYTES", "MAX_YAML_NODES", "PARSER_MODE", "YamlLimitError", "argument_parser", "check_yaml",
           "load_json", "load_yaml", "read_yaml"]

#: the longest YAML text read (a configuration is a few KiB)
MAX_YAML_BYTES = 1 << 20
#: the most nodes (scalars, sequences, mappings) a YAML document may have once its
#: aliases are expanded
MAX_YAML_NODES = 100_000
#: the jsonargparse ``parser_mode`` of :func:`argument_parser` (registered on first use)
PARSER_MODE = "xcent_yaml"


class YamlLimitError(UsageError):
    """A YAML text over the bounds of :func:`check_yaml` (a UsageError: exit 2)."""


def _expanded_size(root) -> int | None:
    """Nodes of the document under ``root`` as a tree (aliases expanded), stopping at
    :data:`MAX_YAML_NODES` + 1; None for a recursive alias (an infinite tree). Each
    distinct node is visited once (iteratively: no recursion limit)."""
    from yaml.nodes import MappingNode, SequenceNode

    def children(node):
        if isinstance(node, SequenceNode):
            return list(node.value)
        if isinstance(node, MappingNode):
            return [n for pair in node.value for n in pair]
        return []

    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, False)]
    cap = MAX_YAML_NODES + 1
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            size[key] = min(cap, 1 + sum(size[id(c)] for c in children(node)))
            continue
        if key in size:
            continue
        if key in on_path:
            return None
        on_path.add(key)
        stack.append((node, True))
        for child in children(node):
            if id(child) in on_path:
                return None
            if id(child) not in size:
                stack.append((child, False))
    return size[id(root)]


def load_json(text):
    """``json.loads(text)`` for text read from a file (a run's JSONL, ``compare.json``, a
    safetensors header, ...): JSON has no aliases, so its size is that of the text, but
    a deeply nested text (``[[[[...``) makes the parser raise RecursionError, which no
    caller expects; it is a ValueError here, like any other text that is not JSON."""
    import json

    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply to be read") from None


def check_yaml(text: str, where: str) -> None:
    """Refuse a YAML ``text`` over the bounds (see the module docstring) with a
    :class:`YamlLimitError` naming ``where``; a syntax error is left to the loader."""
    import yaml

    if len(text) > MAX_YAML_BYTES:
        raise YamlLimitError(f"{where}: {len(text)} characters of YAML, more than the {MAX_YAML_BYTES} read")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return  # the loader reports it, in its own words
    except RecursionError:
        raise YamlLimitError(f"{where}: YAML nested too deeply to be read") from None
    if root is None:
        return
    nodes = _expanded_size(root)
    if nodes is None:
        raise YamlLimitError(f"{where}: YAML with a recursive alias (an anchor used inside itself)")
    if nodes > MAX_YAML_NODES:
        raise YamlLimitError(f"{where}: YAML whose aliases expand to more than {MAX_YAML_NODES} values "
                             f"(an alias bomb?); a configuration has a few dozen")


def load_yaml(text: str, where: str):
    """``text`` parsed by PyYAML's safe loader, within the bounds of :func:`check_yaml`.
    A syntax error is a UsageError naming ``where``."""
    import yaml

    check_yaml(text, where)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"{where}: not valid YAML ({' '.join(str(exc).split())[:160]})") from None


def read_yaml(path, where: str | None = None):
    """The YAML file ``path`` (UTF-8), bounded as :func:`load_yaml`; its size is
    checked before it is read. Problems are one UsageError naming ``where`` (default:
    the path)."""
    path = Path(path)
    where = where or str(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise UsageError(f"{where}: not a file")
        if size > MAX_YAML_BYTES:
            raise YamlLimitError(f"{where}: {size} bytes, more than the {MAX_YAML_BYTES} read from a YAML file")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{where}: not a UTF-8 text (YAML) file (byte {exc.start})") from None
    except OSError as exc:
        raise UsageError(f"{where}: cannot be read ({exc.strerror})") from None
    return load_yaml(text, where)


def _jsonargparse_loader():
    """jsonargparse's own YAML loader (its resolvers: no timestamps, its floats) behind
    :func:`check_yaml`, registered as :data:`PARSER_MODE`."""
    import yaml
    from jsonargparse import get_loader, set_loader

    global _registered
    if _registered:
        return
    original = get_loader("yaml")

    def load(stream, path=""):
        check_yaml(stream, f"--config {path}" if path else "a YAML value")
        return original(stream)

    set_loader(PARSER_MODE, load, exceptions=(yaml.YAMLError,))
    _registered = True


_registered = False


def argument_parser(**kwargs):
    """A jsonargparse ``ArgumentParser`` (``kwargs`` as its own) whose ``--config``
    files and flag values are read by the bounded loader. Every xcent command builds
    its parser here."""
    from jsonargparse import ArgumentParser

    _jsonargparse_loader()
    return ArgumentParser(parser_mode=PARSER_MODE, **kwargs)
