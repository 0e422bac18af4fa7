"""RLLC memory rules (SPEC.md section 4): the `memory=` string grammar and explicit (U, b) matrices.

A memory of k units is stored as the k columns of M (n x k); one step updates every unit at once
from the previous memory:

    M <- M U + g b^T            (U: k x k propagator, b: k input weights)

Grammar (whitespace is ignored between tokens)::

    memory := unit ("+" unit)*
    unit   := "M(" beta ")"                 # m <- beta m + g                       (1 unit)
            | "J(" beta "," j ")"           # Jordan block of size j:               (j units)
                                            #   m_1 <- beta m_1 + g, m_i <- beta m_i + m_{i-1}
            | "C(" r "," phi ")"            # rotation pair, eigenvalues r e^{+-i phi} (2 units)
                                            #   (m_1, m_2) <- r (cos phi m_1 - sin phi m_2,
                                            #                    sin phi m_1 + cos phi m_2) + (g, 0)
    beta, r, phi := a finite real number (Python float syntax: 0.9, -1, 1e-3)
    j            := a positive integer

``parse_memory("M(0.9)+M(0)")`` returns ``(U, b)`` as tuples of floats. A malformed string raises
`MemorySyntaxError` (a ValueError) whose message shows the string and a caret under the offending
character.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

from ._hyper import F32_MAX

__all__ = ["MemorySyntaxError", "parse_memory", "memory_rule", "units_to_matrices"]

Matrix = tuple[tuple[float, ...], ...]

MAX_UNITS = 64  # a sanity bound on k: the k x k law solve and the k state tensors per parameter

_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_INTEGER = re.compile(r"[+-]?\d+")
_UNIT_ARGS = {"M": ("beta",), "J": ("beta", "j"), "C": ("r", "phi")}


class MemorySyntaxError(ValueError):
    """A malformed `memory=` string; `position` is the index of the offending character."""

    def __init__(self, owner: str, text: str, position: int, what: str):
        self.text, self.position, self.what = text, position, what
        caret = " " * position + "^"
        super().__init__(
            f"{owner}: bad memory string at character {position}: {what}\n"
            f"    {text}\n"
            f"    {caret}\n"
            "memory units are M(beta), J(beta, j) and C(r, phi), joined by '+', e.g. 'M(0.9)+M(0)'"
        )


class _Parser:
    def __init__(self, text: str, owner: str):
        self.text, self.owner, self.pos = text, owner, 0

    def fail(self, what: str, position: int | None = None):
        raise MemorySyntaxError(self.owner, self.text, self.pos if position is None else position, what)

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def found(self) -> str:
        return repr(self.text[self.pos]) if self.pos < len(self.text) else "the end of the string"

    def expect(self, char: str) -> None:
        self.skip_space()
        if self.pos < len(self.text) and self.text[self.pos] == char:
            self.pos += 1
            return
        self.fail(f"expected {char!r}, found {self.found()}")

    def number(self, name: str, integer: bool = False) -> float | int:
        self.skip_space()
        start = self.pos
        match = (_INTEGER if integer else _NUMBER).match(self.text, self.pos)
        if match is None:
            self.fail(f"expected {'an integer' if integer else 'a number'} for {name}, found {self.found()}")
        self.pos = match.end()
        if integer:
            # "J(0.8, 2.5)": point at the '.' rather than at the ')' that the caller would expect
            if self.pos < len(self.text) and self.text[self.pos] in ".eE":
                self.fail(f"{name} must be an integer", start)
            if len(match.group().lstrip("+-0")) > 18:  # (Python refuses to read an int of over 4300 digits)
                self.fail(f"{name} has {len(match.group())} digits: at most {MAX_UNITS} memory units are supported",
                          start)
            value = int(match.group())
            if value < 1:
                self.fail(f"{name} (the Jordan block size) must be >= 1, got {value}", start)
            return value
        value = float(match.group())
        if not abs(value) <= F32_MAX:  # e.g. 1e999, or 1e39 (inf in the float32 the kernels use)
            self.fail(f"{name} must be finite in float32 (at most {F32_MAX!r} in magnitude), got {match.group()}", start)
        return value

    def unit(self) -> tuple:
        self.skip_space()
        start = self.pos
        kind = self.text[self.pos] if self.pos < len(self.text) else ""
        if kind not in _UNIT_ARGS:
            self.fail(f"expected a memory unit M(...), J(...) or C(...), found {self.found()}")
        self.pos += 1
        self.expect("(")
        args = []
        for i, name in enumerate(_UNIT_ARGS[kind]):
            if i:
                self.expect(",")
            args.append(self.number(name, integer=(name == "j")))
        self.expect(")")
        return (kind, *args, start)

    def parse(self) -> list[tuple]:
        units = [self.unit()]
        while True:
            self.skip_space()
            if self.pos == len(self.text):
                return units
            if self.text[self.pos] != "+":
                self.fail(f"expected '+' or the end of the string, found {self.found()}")
            self.pos += 1
            units.append(self.unit())


def units_to_matrices(units: Sequence[tuple]) -> tuple[Matrix, tuple[float, ...]]:
    """(U, b) of a list of units ("M", beta) / ("J", beta, j) / ("C", r, phi): block-diagonal U."""
    sizes = [{"M": 1, "J": u[2] if u[0] == "J" else 0, "C": 2}[u[0]] for u in units]
    k = sum(sizes)
    U = [[0.0] * k for _ in range(k)]
    b = [0.0] * k
    at = 0
    for unit, size in zip(units, sizes):
        kind = unit[0]
        if kind == "M":
            U[at][at] = float(unit[1])
            b[at] = 1.0
        elif kind == "J":
            beta = float(unit[1])
            for i in range(size):
                U[at + i][at + i] = beta
                if i:
                    U[at + i - 1][at + i] = 1.0  # column i of M U takes the previous m_{i-1}
            b[at] = 1.0
        else:  # C(r, phi): new (m1, m2) = (m1, m2) @ r [[cos, sin], [-sin, cos]]
            r, phi = float(unit[1]), float(unit[2])
            c, s = r * math.cos(phi), r * math.sin(phi)
            U[at][at], U[at][at + 1] = c, s
            U[at + 1][at], U[at + 1][at + 1] = -s, c
            b[at] = 1.0
        at += size
    return tuple(tuple(row) for row in U), tuple(b)


def parse_memory(text: str, owner: str = "RLLC") -> tuple[Matrix, tuple[float, ...]]:
    """The (U, b) of a memory string such as "M(0.9)+M(0)" or "J(0.8, 2) + C(0.9, 0.3)"."""
    if not isinstance(text, str):
        raise ValueError(f"{owner}: memory must be a string or a pair (U, b), got {type(text).__name__}")
    units = _Parser(text, owner).parse()
    k = sum({"M": 1, "J": u[2] if u[0] == "J" else 0, "C": 2}[u[0]] for u in units)
    if k > MAX_UNITS:
        raise MemorySyntaxError(owner, text, units[-1][-1], f"{k} memory units; at most {MAX_UNITS} are supported")
    return units_to_matrices([u[:-1] for u in units])


def values_of(owner: str, name: str, value):
    """value.tolist() of a tensor or a NumPy array; a tensor whose values cannot be read (on the meta
    device, a fake tensor) is an error naming the argument."""
    try:
        return value.tolist()
    except (RuntimeError, NotImplementedError) as err:
        raise ValueError(f"{owner}: {name} must hold numbers that can be read, got a tensor without values "
                         f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from err


def _as_floats(owner: str, name: str, value) -> list:
    """Nested lists of floats from lists, tuples, NumPy arrays or tensors."""
    if hasattr(value, "tolist"):
        value = values_of(owner, name, value)
    if isinstance(value, (list, tuple)):
        return [_as_floats(owner, name, v) for v in value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{owner}: {name} must hold real numbers, got {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond every float: 10**400
        raise ValueError(f"{owner}: {name} must be finite in float32 (at most {F32_MAX!r} in magnitude), got a "
                         "number beyond every float") from None
    if not abs(value) <= F32_MAX:
        raise ValueError(f"{owner}: {name} must be finite in float32 (at most {F32_MAX!r} in magnitude), got {value!r}")
    return value


def memory_rule(memory, owner: str = "RLLC") -> tuple[Matrix, tuple[float, ...]]:
    """(U, b) from a memory string or an explicit pair (U, b) (k x k and k entries), validated."""
    if isinstance(memory, str):
        return parse_memory(memory, owner)
    if not isinstance(memory, (tuple, list)) or len(memory) != 2:
        raise ValueError(
            f"{owner}: memory must be a string such as 'M(0.9)+M(0)' or a pair (U, b) of a k x k "
            f"propagator and k input weights; got {memory!r}"
        )
    U, b = _as_floats(owner, "memory U", memory[0]), _as_floats(owner, "memory b", memory[1])
    if not isinstance(b, list) or not b or any(isinstance(x, list) for x in b):
        raise ValueError(f"{owner}: memory b must be a 1-D sequence of k >= 1 numbers, got {memory[1]!r}")
    k = len(b)
    if k > MAX_UNITS:
        raise ValueError(f"{owner}: memory must have k in [1, {MAX_UNITS}] units, got k = {k}")
    if not isinstance(U, list) or len(U) != k or any(not isinstance(row, list) or len(row) != k or
                                                     any(isinstance(x, list) for x in row) for row in U):
        raise ValueError(f"{owner}: memory U must be a k x k matrix with k = len(b) = {k}, got {memory[0]!r}")
    return tuple(tuple(row) for row in U), tuple(b)
