"""Reading a TVM library without loading it: the modules serialized into ``model.so``
(``__tvm_ffi__library_bin``: the Relax VM bytecode and constants), found through the ELF symbol
table (pyelftools, :mod:`bdp.targets.elf`), for any architecture (nothing of the foreign library
is executed)."""

from __future__ import annotations

import os
import struct

LIBRARY_BIN_SYMBOL = "__tvm_ffi__library_bin"


def read_library_bin(lib_path) -> list:
    """The modules serialized into a TVM library (``__tvm_ffi__library_bin``, layout of tvm-ffi's
    ProcessLibraryBin): [(kind, bytes or None for the '_lib' placeholder)], root first."""
    from .elf import symbol_file_offset

    with open(lib_path, "rb") as f:
        data = f.read()
    found = symbol_file_offset(lib_path, LIBRARY_BIN_SYMBOL)
    off = found[0] if found else None
    if off is None:
        raise ValueError(f"{os.path.basename(lib_path)} carries no {LIBRARY_BIN_SYMBOL} (not a TVM library?)")
    (nbytes,) = struct.unpack_from("<Q", data, off)
    pos, stop = off + 8, off + 8 + nbytes

    def u64():
        nonlocal pos
        if pos + 8 > stop:
            raise ValueError("truncated library binary")
        (v,) = struct.unpack_from("<Q", data, pos)
        pos += 8
        return v

    def vec():
        return [u64() for _ in range(u64())]

    def blob():
        nonlocal pos
        n = u64()
        if pos + n > stop:
            raise ValueError("truncated library binary")
        b = data[pos:pos + n]
        pos += n
        return b

    indptr = vec()
    vec()  # child indices
    mods = []
    for _ in range(len(indptr) - 1):
        kind = blob().decode()
        mods.append((kind, None if kind == "_lib" else blob()))
    return mods
