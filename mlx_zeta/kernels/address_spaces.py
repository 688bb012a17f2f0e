"""Metal's address spaces as C++ types, for a compile-only check of a kernel's text.

The program the emulator runs erases ``device``, ``constant``, ``thread`` and ``threadgroup`` with
macros (the kernel text stays verbatim, and plain pointers keep AddressSanitizer's view of every
access). Erased qualifiers cannot tell a threadgroup pointer from a device pointer, which Metal
rejects at compile time; g++ has no address-space qualifiers in C++ (named address spaces are a C
extension) and no macro can wrap the declarator that follows a keyword. So before the real build
:func:`lower` rewrites, in a copy of the text used only by ``g++ -fsyntax-only``:

* ``[const] SPACE [const] TYPE [const] *``  ->  ``::emu::space_ptr<::emu::SPACE_space, [const] TYPE>``
* ``threadgroup TYPE name[N][M]...;``        ->  ``static ::emu::tg_array<TYPE, N, M...> name;``
* any other ``SPACE`` (``constant float c = ...``, ``thread T&``) is erased, as in the real build.

``space_ptr`` (``metal/emulator.h``) indexes, offsets and compares like a pointer and converts
only to a pointer of its own space (``T`` to ``const T``), so mixing spaces is a compile error
that names both types. Comments are blanked first; line breaks are kept, so g++ reports the
body's own line numbers. A form the patterns miss is merely left unchecked (erased), never
miscompiled: this text is never run.
"""

from __future__ import annotations

import re

__all__ = ["lower", "SPACES"]

SPACES = ("device", "constant", "threadgroup", "thread")
_TYPE = r"[A-Za-z_]\w*(?:::\w+)*(?:\s*<[^<>;()]*>)?"
_POINTER = re.compile(rf"(?<![\w:.])(?:(const)\s+)?({'|'.join(SPACES)})\s+(?:(const)\s+)?({_TYPE})\s*(?:(const)\s*)?\*")
_ARRAY = re.compile(rf"(?<![\w:.])threadgroup\s+({_TYPE})\s+([A-Za-z_]\w*)\s*((?:\[[^\]]+\]\s*)+);")
_QUALIFIER = re.compile(rf"(?<![\w:.])(?:{'|'.join(SPACES)})(?!\w)")
_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)


def _blank(match: re.Match) -> str:
    return re.sub(r"[^\n]", " ", match.group(0))


def _pointer(m: re.Match) -> str:
    const = "const " if (m.group(1) or m.group(3) or m.group(5)) else ""
    return f"::emu::space_ptr<::emu::{m.group(2)}_space, {const}{m.group(4)}> "


def _array(m: re.Match) -> str:
    dims = ", ".join(d.strip() for d in re.findall(r"\[([^\]]+)\]", m.group(3)))
    return f"static ::emu::tg_array<{m.group(1)}, {dims}> {m.group(2)};"


def lower(text: str) -> str:
    """``text`` with Metal's address-space qualifiers rewritten into distinct C++ types (module docstring)."""
    text = _COMMENT.sub(_blank, text)
    text = _ARRAY.sub(lambda m: _array(m) + "\n" * m.group(0).count("\n"), text)
    text = _POINTER.sub(lambda m: _pointer(m) + "\n" * m.group(0).count("\n"), text)
    return _QUALIFIER.sub("", text)
