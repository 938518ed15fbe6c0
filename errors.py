"""Errors shared by every layer of bdp.

``InputError`` is the user's input being at fault (missing or corrupt file, unsupported op,
wrong shape, a missing system tool): the CLI prints its message on one line and exits with code 2.
Anything else that escapes is a fault of bdp itself (exit code 1).
"""


class InputError(Exception):
    """The input was at fault. The message is one line naming the file, node or value and what to do."""


class ToolMissingError(InputError, RuntimeError):
    """The user's machine lacks a tool or file bdp needs (a cross compiler, qemu, a download):
    exit code 2 with how to get it. Also a RuntimeError, what such faults raised before."""


class UnsupportedOpError(InputError):
    """A node the compiler cannot handle."""

    def __init__(self, node_name, op_type, why=""):
        msg = f"node '{node_name}' ({op_type}) is not supported by bdp's compiler"
        if why:
            msg += f": {why}"
        super().__init__(msg)
        self.node_name = node_name
        self.op_type = op_type


def first_line(e: BaseException, limit: int | None = 160, empty: str | None = None) -> str:
    """What a one-line report of exception E says: the first line of its message, stripped, at
    most LIMIT characters (None: all of it). An empty message gives EMPTY (default: E's type
    name)."""
    s = str(e).strip()
    if not s:
        return type(e).__name__ if empty is None else empty
    return s.splitlines()[0].strip()[:limit] if limit is not None else s.splitlines()[0].strip()
