"""Integer expressions of the multistep-arithmetic task: read, write, evaluate, reduce.

The task's rationales are chains of expressions (``(7 - -1 + -1) = ((7 - -1) + -1) =
(8 + -1) = 7``) and its verifier asks of every ``=`` link whether the right side is the
left side with exactly one operation computed. Comparing *texts* cannot answer that,
so expressions are parsed into trees with the usual precedence (``*`` binds tighter
than ``+`` and ``-``, all left-associative) and compared as trees: written parentheses
that do not change the tree (``(8 + -1 + -4)`` vs ``((8 + -1) + -4)``) do not matter.

A tree (:data:`Node`) is an ``int`` (a number), a ``str`` (a letter ``A``-``Z`` standing
for a sub-expression) or a tuple ``(op, left, right)``. Tuples compare and hash by
value, so "same tree" is plain ``==``.

Canonical text: binary operators with one space on each side, negative numbers written
``-5`` (no space), no space inside parentheses: ``((7 - -1) * 3)``. The verifier
requires it, so a model learns one spelling of every expression.
"""

from __future__ import annotations

import re
from typing import Union

Node = Union[int, str, tuple]

OPERATORS = ("+", "-", "*")
#: Limits that keep garbled text from exhausting the stack or int->str conversion.
MAX_DEPTH = 200
MAX_DIGITS = 1000

_TOKEN_RE = re.compile(r"-?[0-9]+|[()+*A-Z-]")  # ASCII digits only


class ExprError(ValueError):
    """Text that is not an expression; the message says what could not be read."""


def tokenize(text: str) -> list[str]:
    """Split an expression into tokens: ``(``, ``)``, numbers, operators, letters.

    ``-`` directly followed by a digit is a negative number (``7 - -1`` is 7, -, -1).
    """
    tokens = _TOKEN_RE.findall(text)
    if "".join(tokens) != "".join(text.split()):
        rest = "".join(text.split())
        at = next((i for i, (a, b) in enumerate(zip("".join(tokens), rest)) if a != b), len("".join(tokens)))
        raise ExprError(f"cannot read {rest[at:at + 12]!r}")
    for tok in tokens:
        if tok[-1].isdigit():
            digits = tok.lstrip("-")
            if len(digits) > MAX_DIGITS:
                raise ExprError("a number is too long")
            if (digits != "0" and digits.startswith("0")) or tok == "-0":
                raise ExprError(f"{tok!r} is not a number in standard form")
    return tokens


def render_tokens(tokens: list[str]) -> str:
    """The canonical text of a token list."""
    out = ""
    for tok in tokens:
        if out and not out.endswith("(") and tok != ")":
            out += " "
        out += tok
    return out


def canonical(text: str) -> str:
    """The canonical spelling of ``text`` (same tokens); raises :class:`ExprError`."""
    return render_tokens(tokenize(text))


def parse_tokens(tokens: list[str]) -> Node:
    """Parse tokens into a tree; raises :class:`ExprError` on anything malformed."""
    pos = 0
    depth = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise ExprError("the expression ends too early")
        pos += 1
        return tokens[pos - 1]

    def expr() -> Node:
        node = term()
        while peek() in ("+", "-"):
            op = take()
            node = (op, node, term())
        return node

    def term() -> Node:
        node = factor()
        while peek() == "*":
            take()
            node = ("*", node, factor())
        return node

    def factor() -> Node:
        nonlocal depth
        tok = take()
        if tok == "(":
            depth += 1
            if depth > MAX_DEPTH:
                raise ExprError("too many nested parentheses")
            node = expr()
            if take() != ")":
                raise ExprError("a parenthesis is not closed")
            depth -= 1
            return node
        if tok[-1].isdigit():
            return int(tok)
        if tok.isalpha():
            return tok
        raise ExprError(f"{tok!r} where a number was expected")

    if not tokens:
        raise ExprError("the expression is empty")
    node = expr()
    if pos != len(tokens):
        raise ExprError(f"unexpected {tokens[pos]!r}")
    return node


def parse(text: str) -> Node:
    """Parse an expression text (any spacing) into a tree."""
    return parse_tokens(tokenize(text))


def letters(node: Node) -> list[str]:
    """The letters of a tree, left to right (with repeats)."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, tuple):
        return letters(node[1]) + letters(node[2])
    return []


def evaluate(node: Node, env: dict[str, int] | None = None) -> int:
    """The value of a tree; letters are looked up in ``env`` (KeyError if absent)."""
    if isinstance(node, int):
        return node
    if isinstance(node, str):
        return (env or {})[node]
    op, left, right = node
    a, b = evaluate(left, env), evaluate(right, env)
    return a + b if op == "+" else a - b if op == "-" else a * b


def substitute(node: Node, env: dict[str, Node]) -> Node:
    """Replace every letter that ``env`` names by its tree (or number)."""
    if isinstance(node, str):
        return env.get(node, node)
    if isinstance(node, tuple):
        return (node[0], substitute(node[1], env), substitute(node[2], env))
    return node


def render_full(node: Node) -> str:
    """Fully parenthesized canonical text: every operation in its own parentheses."""
    if isinstance(node, tuple):
        return f"({render_full(node[1])} {node[0]} {render_full(node[2])})"
    return str(node)


def is_reducible(node: Node) -> bool:
    """An operation whose two operands are numbers: one ``=`` link may compute it."""
    return isinstance(node, tuple) and isinstance(node[1], int) and isinstance(node[2], int)


def reduce_once(node: Node) -> Node:
    """The gold next link: compute one operation, multiplications first, left to right.

    Among the operations whose operands are both numbers, the leftmost multiplication is
    computed if there is one, else the leftmost operation.
    """
    paths: list[tuple[int, ...]] = []

    def collect(n: Node, path: tuple[int, ...]) -> None:
        if is_reducible(n):
            paths.append(path)
        elif isinstance(n, tuple):
            collect(n[1], path + (1,))
            collect(n[2], path + (2,))

    collect(node, ())
    if not paths:
        return node
    target = next((p for p in paths if _at(node, p)[0] == "*"), paths[0])
    return _replace(node, target, evaluate(_at(node, target)))


def _at(node: Node, path: tuple[int, ...]) -> Node:
    for i in path:
        node = node[i]
    return node


def _replace(node: Node, path: tuple[int, ...], new: Node) -> Node:
    if not path:
        return new
    parts = list(node)
    parts[path[0]] = _replace(node[path[0]], path[1:], new)
    return tuple(parts)


def diff(a: Node, b: Node) -> list[tuple[Node, Node]]:
    """The smallest differing subtrees of two trees, left to right.

    Both trees are walked together while they have the same operation at the same
    place; anywhere else they differ, the pair of subtrees is one difference.
    """
    if a == b:
        return []
    if isinstance(a, tuple) and isinstance(b, tuple) and a[0] == b[0]:
        return diff(a[1], b[1]) + diff(a[2], b[2])
    return [(a, b)]


def match(pattern: Node, node: Node) -> dict[str, Node] | None:
    """Bind the letters of ``pattern`` so that it becomes ``node``; None if impossible."""
    bindings: dict[str, Node] = {}

    def walk(p: Node, n: Node) -> bool:
        if isinstance(p, str):
            if p in bindings:
                return bindings[p] == n
            bindings[p] = n
            return True
        if isinstance(p, tuple):
            return isinstance(n, tuple) and p[0] == n[0] and walk(p[1], n[1]) and walk(p[2], n[2])
        return p == n

    return bindings if walk(pattern, node) else None


def leaf_groups(tokens: list[str]) -> list[tuple[int, int]]:
    """Token spans ``[start, end]`` of the parenthesized groups with no parentheses inside.

    These are the BIG-Bench "groups" (``(7 - -1 + -1 + -4)``) that the gold partition
    names with letters. Assumes balanced parentheses (a parsed expression).
    """
    spans = []
    open_at: list[int] = []
    inner_paren: list[bool] = []
    for i, tok in enumerate(tokens):
        if tok == "(":
            if inner_paren:
                inner_paren[-1] = True
            open_at.append(i)
            inner_paren.append(False)
        elif tok == ")" and open_at:
            start, had_inner = open_at.pop(), inner_paren.pop()
            if not had_inner:
                spans.append((start, i))
    return sorted(spans)
