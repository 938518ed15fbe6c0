"""Reading a TVM library without loading it: the modules serialized into ``model.so``
(``__tvm_ffi__library_bin``: the Relax VM bytecode and constants), found through the ELF symbol
table, for any architecture (nothing of the foreign library is executed)."""

from __future__ import annotations

import os
import struct

LIBRARY_BIN_SYMBOL = "__tvm_ffi__library_bin"


def elf_symbol_offset(data: bytes, name: str) -> int | None:
    """File offset of the bytes of symbol NAME in an ELF64 shared library, or None."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2:
        return None
    end = "<" if data[5] == 1 else ">"
    (e_shoff,) = struct.unpack_from(end + "Q", data, 0x28)
    e_shentsize, e_shnum = struct.unpack_from(end + "HH", data, 0x3A)
    secs = []
    for i in range(e_shnum):
        off = e_shoff + i * e_shentsize
        if off + 64 > len(data):
            return None
        _n, sh_type, _fl, sh_addr, sh_offset, sh_size, sh_link, _inf, _al, sh_entsize = struct.unpack_from(
            end + "IIQQQQIIQQ", data, off)
        secs.append((sh_type, sh_addr, sh_offset, sh_size, sh_link, sh_entsize))
    want = name.encode()
    for sh_type, _addr, sh_offset, sh_size, sh_link, sh_entsize in secs:
        if sh_type not in (2, 11) or not sh_entsize or sh_link >= len(secs):  # SHT_SYMTAB, SHT_DYNSYM
            continue
        str_off = secs[sh_link][2]
        for j in range(sh_size // sh_entsize):
            st_name, _info, _other, st_shndx, st_value, _size = struct.unpack_from(
                end + "IBBHQQ", data, sh_offset + j * sh_entsize)
            s = str_off + st_name
            if data[s:s + len(want) + 1] != want + b"\0":
                continue
            if st_shndx == 0 or st_shndx >= len(secs) or secs[st_shndx][0] == 8:  # undefined / NOBITS
                continue
            sec = secs[st_shndx]
            return st_value - sec[1] + sec[2]
    return None


def read_library_bin(lib_path) -> list:
    """The modules serialized into a TVM library (``__tvm_ffi__library_bin``, layout of tvm-ffi's
    ProcessLibraryBin): [(kind, bytes or None for the '_lib' placeholder)], root first."""
    with open(lib_path, "rb") as f:
        data = f.read()
    off = elf_symbol_offset(data, LIBRARY_BIN_SYMBOL)
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
