"""Sieve (RFC 5228) scripts: bytes -> a syntax tree, with bounds fit for untrusted input.

Users upload Sieve scripts (ManageSieve, the CLI) and the server runs them
at every local delivery, so the parser meets hostile text.  sievelib, the
one maintained Python parser, is a client-side library: it has no bound on
script size or nesting, keeps no line/column for errors, and runs nothing.
So this parser is ours, and small: the grammar of RFC 5228 §8 (commands,
tests, test lists, string lists, numbers with K/M/G, quoted strings with
``\\`` escapes, ``text:`` multi-line strings with dot-stuffing, ``#`` and
``/* */`` comments), nothing else.  It knows no command names: which
commands and extensions exist is ``sieve_check``'s job.

Every bound is in ``SieveLimits`` and each failure is a ``SieveSyntaxError``
carrying the 1-based line and column a user can go to.  Recursion is only
on nesting (blocks and test lists) and is cut at ``max_depth``, far below
Python's own limit.
"""

from __future__ import annotations

from dataclasses import dataclass

# RFC 5228 §2.4.1: numbers take K, M or G as powers of 1024.
_QUANTIFIERS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
# RFC 5228 §2.4.1 leaves the size of numbers to implementations; a number
# that big is an error rather than a bignum fed to comparisons.
_MAX_NUMBER = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class SieveLimits:
    """Bounds on one script; a script past any of them is refused."""

    max_bytes: int = 64 * 1024
    max_depth: int = 24
    max_tokens: int = 20_000


@dataclass(frozen=True, slots=True)
class Tag:
    """A ``:name`` argument, lower-cased (RFC 5228 §8.1: tags are case-insensitive)."""

    name: str


Argument = Tag | int | tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Test:
    """A test such as ``header :is "from" "a@b"``, possibly holding tests (allof)."""

    name: str
    arguments: tuple[Argument, ...]
    tests: tuple[Test, ...]
    line: int
    column: int


@dataclass(frozen=True, slots=True)
class Command:
    """A command; ``block`` is None for commands ended by ``;``."""

    name: str
    arguments: tuple[Argument, ...]
    tests: tuple[Test, ...]
    block: tuple[Command, ...] | None
    line: int
    column: int


class SieveSyntaxError(ValueError):
    """The script is not valid Sieve; ``line``/``column`` are 1-based."""

    def __init__(self, message: str, line: int, column: int) -> None:
        super().__init__(f"line {line}, column {column}: {message}")
        self.reason = message
        self.line = line
        self.column = column


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "id", "tag", "num", "str", or the punctuation itself
    value: str | int
    line: int
    column: int


def _is_id_start(ch: str) -> bool:
    return ch == "_" or ("a" <= ch <= "z") or ("A" <= ch <= "Z")


def _is_id_char(ch: str) -> bool:
    return _is_id_start(ch) or ("0" <= ch <= "9")


class _Lexer:
    def __init__(self, text: str, limits: SieveLimits) -> None:
        self._text = text
        self._pos = 0
        self._line = 1
        self._line_start = 0
        self._limits = limits

    def _error(self, message: str, pos: int | None = None) -> SieveSyntaxError:
        pos = self._pos if pos is None else pos
        line_start = self._text.rfind("\n", 0, pos) + 1
        line = self._text.count("\n", 0, pos) + 1
        return SieveSyntaxError(message, line, pos - line_start + 1)

    def _where(self) -> tuple[int, int]:
        return self._line, self._pos - self._line_start + 1

    def _advance_to(self, pos: int) -> None:
        newlines = self._text.count("\n", self._pos, pos)
        if newlines:
            self._line += newlines
            self._line_start = self._text.rfind("\n", self._pos, pos) + 1
        self._pos = pos

    def tokens(self) -> list[_Token]:
        out: list[_Token] = []
        end = len(self._text)
        while True:
            self._skip_space_and_comments()
            if self._pos >= end:
                return out
            if len(out) >= self._limits.max_tokens:
                raise self._error("script has too many tokens")
            out.append(self._next_token())

    def _skip_space_and_comments(self) -> None:
        text = self._text
        end = len(text)
        while self._pos < end:
            ch = text[self._pos]
            if ch in " \t\r\n":
                self._advance_to(self._pos + 1)
            elif ch == "#":
                nl = text.find("\n", self._pos)
                self._advance_to(end if nl < 0 else nl + 1)
            elif text.startswith("/*", self._pos):
                close = text.find("*/", self._pos + 2)
                if close < 0:
                    raise self._error("unterminated /* comment")
                self._advance_to(close + 2)
            else:
                return

    def _next_token(self) -> _Token:
        text = self._text
        line, column = self._where()
        ch = text[self._pos]
        if ch in "[](){},;":
            self._advance_to(self._pos + 1)
            return _Token(ch, ch, line, column)
        if ch == '"':
            return _Token("str", self._quoted(), line, column)
        if ch == ":":
            start = self._pos + 1
            stop = start
            while stop < len(text) and _is_id_char(text[stop]):
                stop += 1
            if stop == start or not _is_id_start(text[start]):
                raise self._error("':' must begin a tag such as :is")
            self._advance_to(stop)
            return _Token("tag", text[start:stop].lower(), line, column)
        if "0" <= ch <= "9":
            return _Token("num", self._number(), line, column)
        if _is_id_start(ch):
            stop = self._pos
            while stop < len(text) and _is_id_char(text[stop]):
                stop += 1
            word = text[self._pos : stop]
            if word.lower() == "text" and text.startswith(":", stop):
                return _Token("str", self._multiline(stop + 1), line, column)
            self._advance_to(stop)
            return _Token("id", word.lower(), line, column)
        raise self._error(f"unexpected character {ch!r}")

    def _number(self) -> int:
        text = self._text
        stop = self._pos
        while stop < len(text) and "0" <= text[stop] <= "9":
            stop += 1
        if stop - self._pos > 19:
            raise self._error("number too large")
        value = int(text[self._pos : stop])
        if stop < len(text) and text[stop].upper() in _QUANTIFIERS:
            value *= _QUANTIFIERS[text[stop].upper()]
            stop += 1
        if value > _MAX_NUMBER:
            raise self._error("number too large")
        self._advance_to(stop)
        return value

    def _quoted(self) -> str:
        # RFC 5228 §2.4.2: \" and \\ are escapes; any other backslash is
        # dropped ("\a" is "a").
        text = self._text
        pos = self._pos + 1
        parts: list[str] = []
        while True:
            stop = pos
            while stop < len(text) and text[stop] not in '"\\':
                stop += 1
            parts.append(text[pos:stop])
            if stop >= len(text):
                raise self._error("unterminated quoted string")
            if text[stop] == '"':
                self._advance_to(stop + 1)
                return "".join(parts)
            if stop + 1 >= len(text):
                raise self._error("unterminated quoted string")
            parts.append(text[stop + 1])
            pos = stop + 2

    def _multiline(self, pos: int) -> str:
        # RFC 5228 §8.1: "text:" *(SP / HTAB) (hash-comment / CRLF), then
        # lines, a leading "." doubled, ended by a line of one ".".
        text = self._text
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        if text.startswith("#", pos):
            nl = text.find("\n", pos)
            pos = len(text) if nl < 0 else nl
        if text.startswith("\r\n", pos):
            pos += 2
        elif text.startswith("\n", pos):
            pos += 1
        else:
            raise self._error("text: must be followed by the end of the line", pos)
        lines: list[str] = []
        while True:
            nl = text.find("\n", pos)
            if nl < 0:
                raise self._error("unterminated text: string (no line with a lone '.')")
            line = text[pos:nl]
            line_body = line[:-1] if line.endswith("\r") else line
            if line_body == ".":
                self._advance_to(nl + 1)
                return "".join(lines)
            if line_body.startswith("."):
                line_body = line_body[1:]
            lines.append(line_body + "\r\n")
            pos = nl + 1


class _Parser:
    def __init__(self, tokens: list[_Token], limits: SieveLimits, end: tuple[int, int]) -> None:
        self._tokens = tokens
        self._i = 0
        self._limits = limits
        self._end = end

    def peek(self) -> _Token | None:
        return self._tokens[self._i] if self._i < len(self._tokens) else None

    def _take(self) -> _Token:
        tok = self.peek()
        if tok is None:
            raise SieveSyntaxError("unexpected end of script", *self._end)
        self._i += 1
        return tok

    def _expect(self, kind: str, what: str) -> _Token:
        tok = self._take()
        if tok.kind != kind:
            raise SieveSyntaxError(f"expected {what}", tok.line, tok.column)
        return tok

    def _check_depth(self, depth: int, tok: _Token) -> None:
        if depth > self._limits.max_depth:
            raise SieveSyntaxError("nesting too deep", tok.line, tok.column)

    def commands(self, depth: int) -> tuple[Command, ...]:
        out: list[Command] = []
        while True:
            tok = self.peek()
            if tok is None or tok.kind == "}":
                return tuple(out)
            out.append(self.command(depth))

    def command(self, depth: int) -> Command:
        name = self._expect("id", "a command name")
        arguments, tests = self._arguments(depth)
        tok = self._take()
        if tok.kind == ";":
            return Command(str(name.value), arguments, tests, None, name.line, name.column)
        if tok.kind == "{":
            self._check_depth(depth + 1, tok)
            block = self.commands(depth + 1)
            self._expect("}", "'}' closing the block")
            return Command(str(name.value), arguments, tests, block, name.line, name.column)
        raise SieveSyntaxError("expected ';' or '{'", tok.line, tok.column)

    def _arguments(self, depth: int) -> tuple[tuple[Argument, ...], tuple[Test, ...]]:
        arguments: list[Argument] = []
        while True:
            tok = self.peek()
            if tok is None:
                raise SieveSyntaxError("unexpected end of script", *self._end)
            if tok.kind == "tag":
                self._i += 1
                arguments.append(Tag(str(tok.value)))
            elif tok.kind == "num":
                self._i += 1
                arguments.append(int(tok.value))
            elif tok.kind in ("str", "["):
                arguments.append(self._string_list())
            else:
                break
        tok = self.peek()
        if tok is not None and tok.kind == "id":
            return tuple(arguments), (self.test(depth + 1),)
        if tok is not None and tok.kind == "(":
            return tuple(arguments), self._test_list(depth + 1)
        return tuple(arguments), ()

    def _string_list(self) -> tuple[str, ...]:
        tok = self._take()
        if tok.kind == "str":
            return (str(tok.value),)
        items: list[str] = []
        while True:
            items.append(str(self._expect("str", "a string in the list").value))
            sep = self._take()
            if sep.kind == "]":
                return tuple(items)
            if sep.kind != ",":
                raise SieveSyntaxError("expected ',' or ']'", sep.line, sep.column)

    def test(self, depth: int) -> Test:
        name = self._expect("id", "a test name")
        self._check_depth(depth, name)
        arguments, tests = self._arguments(depth)
        return Test(str(name.value), arguments, tests, name.line, name.column)

    def _test_list(self, depth: int) -> tuple[Test, ...]:
        opening = self._take()
        self._check_depth(depth, opening)
        tests: list[Test] = []
        while True:
            tests.append(self.test(depth))
            sep = self._take()
            if sep.kind == ")":
                return tuple(tests)
            if sep.kind != ",":
                raise SieveSyntaxError("expected ',' or ')'", sep.line, sep.column)


def parse_script(data: bytes, limits: SieveLimits | None = None) -> tuple[Command, ...]:
    """Parse a script (UTF-8, RFC 5228 §2.1) into its commands, or raise SieveSyntaxError."""
    limits = limits or SieveLimits()
    if len(data) > limits.max_bytes:
        raise SieveSyntaxError(f"script larger than {limits.max_bytes} bytes", 1, 1)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        prefix = data[: exc.start]
        line = prefix.count(b"\n") + 1
        column = len(prefix) - (prefix.rfind(b"\n") + 1) + 1
        raise SieveSyntaxError("script is not UTF-8", line, column) from None
    tokens = _Lexer(text, limits).tokens()
    end_line = text.count("\n") + 1
    end = (end_line, len(text) - (text.rfind("\n") + 1) + 1)
    parser = _Parser(tokens, limits, end)
    commands = parser.commands(0)
    leftover = parser.peek()
    if leftover is not None:
        raise SieveSyntaxError("unexpected '}'", leftover.line, leftover.column)
    return commands
