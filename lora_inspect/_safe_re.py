"""Regular expressions from untrusted files, matched in time linear in the subject.

Python's ``re`` backtracks, so ``(.*)*x`` against a long name takes exponential time. This module parses
a subset of Python's syntax the way ``re._parser`` (CPython 3.11) parses it, builds a Thompson NFA
(K. Thompson, "Regular expression search algorithm", CACM 1968; R. Cox, "Regular Expression Matching
Can Be Simple And Fast", 2007) and simulates it, caching the sets of states it meets (a lazy DFA).
A match costs at most O(states · len(subject)) steps, and one dictionary look-up per character once
the cache is warm. The answer equals ``bool(re.match(text, subject))`` (or ``re.fullmatch``) for
every pattern the parser accepts: matching is a question of existence, which backtracking and the
NFA answer alike when there are no back-references, look-arounds or atomic groups.

Accepted: literals; escapes of punctuation; ``\\a \\f \\n \\r \\t \\v \\\\``; ``\\xhh``, ``\\uhhhh``,
``\\Uhhhhhhhh``; ``\\d \\D \\s \\S \\w \\W`` (Unicode meaning, as ``re`` for str patterns); ``.`` (not
newline); classes ``[...]`` and ``[^...]`` with ranges and the escapes above (and ``\\b`` = backspace
inside a class); ``* + ? {m} {m,} {,n} {m,n}`` and their lazy forms (counts ≤ :data:`MAX_REPEAT`);
``|``; groups ``(...)`` and ``(?:...)``; ``^`` (start of the subject) and ``$`` (end, or before a final
newline).
Refused: back-references and octal escapes (``\\1``, ``\\0``), ``\\A \\b \\B \\Z \\N{…}``, every other
``(?…)`` construct (flags, look-arounds, named and atomic groups, conditionals, comments), possessive
quantifiers, what Python reserves for set operations (``[[``, ``--``, ``&&``, ``~~``, ``||`` in a class),
patterns longer than :data:`MAX_PATTERN_LENGTH`, nested deeper than :data:`MAX_NESTING`, or whose NFA
has more than :data:`MAX_STATES` states — and everything ``re`` itself rejects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["PatternRefused", "compile_match", "MAX_PATTERN_LENGTH", "MAX_REPEAT", "MAX_NESTING", "MAX_STATES"]

MAX_PATTERN_LENGTH = 1000  # characters of pattern text
MAX_REPEAT = 100  # largest count in {m,n}
MAX_NESTING = 50  # groups inside groups (re's own parser recurses once per level)
MAX_STATES = 1_000  # NFA states after expanding counted repeats: the cost of one step
_CACHE_LIMIT = 100_000  # cached (state set, character) transitions per pattern; cleared when full

_SPECIAL = frozenset(".\\[{()*+?^$|")
_DIGITS = frozenset("0123456789")
_HEX = frozenset("0123456789abcdefABCDEF")
_ASCII_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_ESCAPES = {"\\a": "\a", "\\b": "\b", "\\f": "\f", "\\n": "\n", "\\r": "\r", "\\t": "\t", "\\v": "\v", "\\\\": "\\"}
_HEX_WIDTH = {"x": 2, "u": 4, "U": 8}
_CATEGORIES: dict[str, Callable[[str], bool]] = {
    "d": str.isdecimal,  # sre: Py_UNICODE_ISDECIMAL
    "s": str.isspace,  # sre: Py_UNICODE_ISSPACE
    "w": lambda c: c.isalnum() or c == "_",  # sre: Py_UNICODE_ISALNUM or '_'
}

Node = tuple  # ("char", predicate) | ("cat", [..]) | ("alt", [..]) | ("rep", node, lo, hi) | ("group", node) | ("bol",) | ("eol",)


class PatternRefused(ValueError):
    """The pattern is outside the accepted subset (or invalid); the message says why."""


def _any_but_newline(c: str) -> bool:
    return c != "\n"


def _category(letter: str) -> Callable[[str], bool]:
    test = _CATEGORIES[letter.lower()]
    return test if letter.islower() else (lambda c: not test(c))


class _Parser:
    """Recursive descent over re's tokens (a character, or a backslash with the next character)."""

    def __init__(self, text: str):
        self.s, self.i = text, 0

    def peek(self) -> str | None:
        if self.i >= len(self.s):
            return None
        if self.s[self.i] == "\\":
            if self.i + 1 >= len(self.s):
                raise PatternRefused("it ends with a lone backslash")
            return self.s[self.i : self.i + 2]
        return self.s[self.i]

    def take(self) -> str | None:
        t = self.peek()
        if t is not None:
            self.i += len(t)
        return t

    def getwhile(self, n: int, charset: frozenset) -> str:
        out = ""
        while len(out) < n and self.peek() in charset:
            out += self.take() or ""
        return out

    def parse(self) -> Node:
        node = self.alternation(0)
        if self.peek() is not None:
            raise PatternRefused("a ')' closes no group")
        return node

    def alternation(self, depth: int) -> Node:
        items = [self.sequence(depth)]
        while self.peek() == "|":
            self.take()
            items.append(self.sequence(depth))
        return items[0] if len(items) == 1 else ("alt", items)

    def sequence(self, depth: int) -> Node:
        seq: list[Node] = []
        while (t := self.peek()) is not None and t not in ("|", ")"):
            self.take()
            if len(t) == 2:
                seq.append(self.escape(t))
            elif t not in _SPECIAL:
                seq.append(("char", t.__eq__))
            elif t == "[":
                seq.append(self.charset())
            elif t in "*+?{":
                self.repeat(t, seq)
            elif t == ".":
                seq.append(("char", _any_but_newline))
            elif t == "(":
                seq.append(self.group(depth))
            else:
                seq.append(("bol",) if t == "^" else ("eol",))
        return ("cat", seq)

    def group(self, depth: int) -> Node:
        if self.peek() == "?":
            self.take()
            if self.take() != ":":
                raise PatternRefused("'(?' constructs other than '(?:' (flags, look-arounds, named or atomic groups, "
                                     "conditionals) are not supported")
        if depth + 1 > MAX_NESTING:
            raise PatternRefused(f"groups nest more than {MAX_NESTING} deep")
        inner = self.alternation(depth + 1)
        if self.take() != ")":
            raise PatternRefused("a '(' is never closed")
        return ("group", inner)

    def repeat(self, t: str, seq: list[Node]) -> None:
        here = self.i
        if t == "{":
            bounds = self.braces()
            if bounds is None:  # not a quantifier: re reads '{' literally
                self.i = here
                seq.append(("char", "{".__eq__))
                return
            lo, hi = bounds
        else:
            lo, hi = {"?": (0, 1), "*": (0, None), "+": (1, None)}[t]
        if not seq or seq[-1][0] in ("bol", "eol"):
            raise PatternRefused("a quantifier has nothing to repeat")
        if seq[-1][0] == "rep":
            raise PatternRefused("a quantifier follows another (multiple repeat)")
        if self.peek() == "?":  # lazy: the same set of matches
            self.take()
        elif self.peek() == "+":
            raise PatternRefused("possessive quantifiers are not supported")
        seq[-1] = ("rep", seq[-1], lo, hi)

    def braces(self) -> tuple[int, int | None] | None:
        if self.peek() == "}":
            return None
        lo = self.getwhile(len(self.s), _DIGITS)
        if self.peek() == ",":
            self.take()
            hi: str | None = self.getwhile(len(self.s), _DIGITS)
        else:
            hi = lo
        if self.peek() != "}":
            return None
        self.take()
        if len(lo) > 6 or len(hi or "") > 6 or int(lo or 0) > MAX_REPEAT or int(hi or 0) > MAX_REPEAT:
            raise PatternRefused(f"a repeat count is larger than {MAX_REPEAT}")
        lo_n, hi_n = int(lo or 0), (int(hi) if hi else None)
        if hi_n is not None and hi_n < lo_n:
            raise PatternRefused("a repeat's minimum is greater than its maximum")
        return lo_n, hi_n

    def hex_escape(self, t: str) -> str:
        width = _HEX_WIDTH[t[1]]
        digits = self.getwhile(width, _HEX)
        if len(digits) != width or int(digits, 16) > 0x10FFFF:
            raise PatternRefused(f"incomplete or invalid escape {t + digits!r}")
        return chr(int(digits, 16))

    def literal_escape(self, t: str) -> str:
        c = t[1]
        if t in _ESCAPES:
            return _ESCAPES[t]
        if c in _HEX_WIDTH:
            return self.hex_escape(t)
        if c in _DIGITS:
            raise PatternRefused(f"back-references and octal escapes ({t}) are not supported")
        if c in _ASCII_LETTERS:
            raise PatternRefused(f"the escape {t} is not supported")
        return c

    def escape(self, t: str) -> Node:
        if t[1] in "dDsSwW":
            return ("char", _category(t[1]))
        if t[1] == "b":
            raise PatternRefused("the escape \\b is not supported")
        ch = self.literal_escape(t)
        return ("char", ch.__eq__)

    def class_item(self, t: str) -> Any:
        """One member of a class: a character, or a category predicate."""
        if len(t) == 2:
            return _category(t[1]) if t[1] in "dDsSwW" else self.literal_escape(t)
        return t

    def charset(self) -> Node:
        if self.peek() == "[":
            raise PatternRefused("'[[' is reserved by re for nested sets")
        negate = self.peek() == "^"
        if negate:
            self.take()
        chars: set[str] = set()
        ranges: list[tuple[str, str]] = []
        tests: list[Callable[[str], bool]] = []
        while True:
            t = self.take()
            if t is None:
                raise PatternRefused("a '[' is never closed")
            if t == "]" and (chars or ranges or tests):
                break
            if (chars or ranges or tests) and t in "-&~|" and self.peek() == t:
                raise PatternRefused(f"'{t}{t}' in a class is reserved by re for set operations")
            first = self.class_item(t)
            if self.peek() != "-":
                (chars.add if isinstance(first, str) else tests.append)(first)
                continue
            self.take()
            u = self.take()
            if u is None:
                raise PatternRefused("a '[' is never closed")
            if u == "]":
                (chars.add if isinstance(first, str) else tests.append)(first)
                chars.add("-")
                break
            if u == "-":
                raise PatternRefused("'--' in a class is reserved by re for set operations")
            last = self.class_item(u)
            if not isinstance(first, str) or not isinstance(last, str) or last < first:
                raise PatternRefused(f"bad character range {t}-{u}")
            ranges.append((first, last))
        return ("char", _class_test(frozenset(chars), tuple(ranges), tuple(tests), negate))


def _class_test(chars: frozenset, ranges: tuple, tests: tuple, negate: bool) -> Callable[[str], bool]:
    def test(c: str) -> bool:
        hit = c in chars or any(lo <= c <= hi for lo, hi in ranges) or any(f(c) for f in tests)
        return hit != negate

    return test


_CHAR, _SPLIT, _BOL, _EOL, _MATCH = range(5)


class _NFA:
    """Thompson's construction, built back to front: each node is compiled with its successor known."""

    def __init__(self) -> None:
        self.kind: list[int] = []
        self.test: list[Any] = []
        self.out: list[int] = []
        self.alt: list[int] = []

    def add(self, kind: int, test: Any = None, out: int = -1, alt: int = -1) -> int:
        if len(self.kind) >= MAX_STATES:
            raise PatternRefused(f"it expands to more than {MAX_STATES} states (counted repeats)")
        self.kind.append(kind)
        self.test.append(test)
        self.out.append(out)
        self.alt.append(alt)
        return len(self.kind) - 1

    def build(self, node: Node, nxt: int) -> int:
        tag = node[0]
        if tag == "char":
            return self.add(_CHAR, node[1], nxt)
        if tag == "cat":
            for sub in reversed(node[1]):
                nxt = self.build(sub, nxt)
            return nxt
        if tag == "alt":
            starts = [self.build(sub, nxt) for sub in node[1]]
            s = starts[-1]
            for first in reversed(starts[:-1]):
                s = self.add(_SPLIT, None, first, s)
            return s
        if tag == "group":
            return self.build(node[1], nxt)
        if tag == "rep":
            return self.repeat(node[1], node[2], node[3], nxt)
        return self.add(_BOL if tag == "bol" else _EOL, None, nxt)

    def repeat(self, body: Node, lo: int, hi: int | None, nxt: int) -> int:
        if hi is None:
            loop = self.add(_SPLIT, None, -1, nxt)
            self.out[loop] = self.build(body, loop)
            t = loop
        else:
            t = nxt
            for _ in range(hi - lo):
                t = self.add(_SPLIT, None, self.build(body, t), nxt)
        for _ in range(lo):
            t = self.build(body, t)
        return t

    def closure(self, seeds: list[int], at_start: bool, at_end: bool) -> frozenset:
        """The states reachable without consuming a character: only CHAR and MATCH states are kept."""
        seen: set[int] = set()
        keep: list[int] = []
        stack = list(seeds)
        kind, out, alt = self.kind, self.out, self.alt
        while stack:
            s = stack.pop()
            if s in seen:
                continue
            seen.add(s)
            k = kind[s]
            if k == _SPLIT:
                stack.append(alt[s])
                stack.append(out[s])
            elif k == _BOL:
                if at_start:
                    stack.append(out[s])
            elif k == _EOL:
                if at_end:
                    stack.append(out[s])
            else:
                keep.append(s)
        return frozenset(keep)

    def step(self, states: frozenset, c: str) -> list[int]:
        kind, test, out = self.kind, self.test, self.out
        return [out[s] for s in states if kind[s] == _CHAR and test[s](c)]


class _Matcher:
    """``bool(re.match(...))`` (or ``re.fullmatch``) by NFA simulation with a transition cache."""

    def __init__(self, nfa: _NFA, start: int, match: int, full: bool):
        self.nfa, self.start, self.match, self.full = nfa, start, match, full
        self.cache: dict[tuple[frozenset, str], frozenset] = {}
        self.interned: dict[frozenset, frozenset] = {}

    def _next(self, cur: frozenset, c: str) -> frozenset:
        nxt = self.cache.get((cur, c))
        if nxt is None:
            if len(self.cache) >= _CACHE_LIMIT:
                self.cache.clear()
                self.interned.clear()
            fresh = self.nfa.closure(self.nfa.step(cur, c), False, False)
            nxt = self.interned.setdefault(fresh, fresh)
            self.cache[(cur, c)] = nxt
        return nxt

    def __call__(self, name: str) -> bool:
        n = len(name)
        before_final_newline = n - 1 if name.endswith("\n") else -1
        cur = self.nfa.closure([self.start], True, n == 0 or before_final_newline == 0)
        cur = self.interned.setdefault(cur, cur)
        for i, c in enumerate(name):
            if not cur or (self.match in cur and not self.full):
                break
            j = i + 1
            if j in (n, before_final_newline):  # '$' holds here: no caching of this rare context
                cur = self.nfa.closure(self.nfa.step(cur, c), False, True)
            else:
                cur = self._next(cur, c)
        else:
            return self.match in cur
        return self.match in cur and not self.full


def compile_match(text: str, *, full: bool = False) -> Callable[[str], bool]:
    """A predicate equal to ``bool(re.match(text, s))`` (``re.fullmatch`` with ``full``), linear in ``s``."""
    if len(text) > MAX_PATTERN_LENGTH:
        raise PatternRefused(f"it is longer than {MAX_PATTERN_LENGTH} characters")
    tree = _Parser(text).parse()
    nfa = _NFA()
    match = nfa.add(_MATCH)
    start = nfa.build(tree, match)
    return _Matcher(nfa, start, match, full)
