"""ELF checks with pyelftools, before a shared library of a bundle is loaded.

The dynamic loader maps a library's segments as its program headers say; a file cut short
(``model.so`` half copied, its hash "fixed" in the manifest) is then read past its end and the
process dies by SIGBUS, in Python as much as in ``bin/bdp-run``. :func:`validate` refuses such a
file with an :class:`InputError` first: the ELF identification (magic, 64-bit, little-endian,
version), a shared object, the machine of the bundle's target, the program header table and
every segment's bytes inside the file, the section header table and every section's bytes
inside the file, a dynamic segment.

:func:`symbol_file_offset` finds where a symbol's bytes lie in the file (for reading data a
library carries, e.g. TVM's ``__tvm_ffi__library_bin``) without loading it.
"""

from __future__ import annotations

import os

from bdp.errors import InputError, first_line

from .spec import elf_machine  # a target's ELF e_machine (pyelftools' name), from its TargetSpec

_EHDR = 64   # ELF64 header
_PHENT = 56  # ELF64 program header entry
_SHENT = 64  # ELF64 section header entry


def _bad(path, why):
    return InputError(f"{path}: not a loadable library ({why}); recompile the bundle")


def validate(path, arch=None, what=None):
    """Raise InputError unless PATH is a complete 64-bit little-endian ELF shared library for
    ARCH (a TargetSpec ``arch`` whose spec names an ``elf_machine``; None: any). WHAT names the
    file in the message (default PATH)."""
    from elftools.common.exceptions import ELFError, ELFParseError
    from elftools.elf.elffile import ELFFile

    name = what or str(path)
    try:
        size = os.path.getsize(path)
        f = open(path, "rb")
    except OSError as e:
        raise InputError(f"{name}: cannot read ({e.strerror})") from None
    with f:
        ident = f.read(16)
        if len(ident) < 16 or ident[:4] != b"\x7fELF":
            raise _bad(name, "no ELF header")
        if ident[4] != 2:
            raise _bad(name, "not a 64-bit ELF file")
        if ident[5] != 1:
            raise _bad(name, "not little-endian")
        if ident[6] != 1:
            raise _bad(name, f"ELF version {ident[6]}")
        if size < _EHDR:
            raise _bad(name, "ELF header cut short")
        f.seek(0)
        try:
            elf = ELFFile(f)
            h = elf.header
            if h["e_type"] != "ET_DYN":
                raise _bad(name, f"{h['e_type']}, not a shared library")
            if arch is not None:
                want = elf_machine(arch)
                if want is None or h["e_machine"] != want:
                    raise _bad(name, f"machine {h['e_machine']}, the bundle's target is {arch}")
            if h["e_phnum"] == 0 or h["e_phentsize"] != _PHENT:
                raise _bad(name, "no program header table")
            if h["e_phoff"] + h["e_phnum"] * h["e_phentsize"] > size:
                raise _bad(name, "program header table beyond the end of the file (truncated?)")
            dynamic = False
            for i in range(h["e_phnum"]):
                seg = elf.get_segment(i)
                if seg["p_offset"] + seg["p_filesz"] > size:
                    raise _bad(name, f"segment {i} ({seg['p_type']}) ends at byte {seg['p_offset'] + seg['p_filesz']}, "
                                     f"the file has {size} (truncated?)")
                if seg["p_filesz"] > seg["p_memsz"] and seg["p_type"] == "PT_LOAD":
                    raise _bad(name, f"segment {i} is larger in the file than in memory")
                dynamic = dynamic or seg["p_type"] == "PT_DYNAMIC"
            if not dynamic:
                raise _bad(name, "no dynamic segment")
            if h["e_shnum"]:
                if h["e_shentsize"] != _SHENT:
                    raise _bad(name, "section header entries of the wrong size")
                if h["e_shoff"] + h["e_shnum"] * h["e_shentsize"] > size:
                    raise _bad(name, "section header table beyond the end of the file (truncated?)")
                if h["e_shstrndx"] >= h["e_shnum"]:
                    raise _bad(name, "section name table index out of range")
                for i in range(h["e_shnum"]):
                    sec = elf._get_section_header(i)
                    if sec["sh_type"] != "SHT_NOBITS" and sec["sh_offset"] + sec["sh_size"] > size:
                        raise _bad(name, f"section {i} ends at byte {sec['sh_offset'] + sec['sh_size']}, "
                                         f"the file has {size} (truncated?)")
        except (ELFError, ELFParseError) as e:
            raise _bad(name, first_line(e, 120)) from None
        except (ValueError, KeyError, OSError, EOFError) as e:  # pyelftools on damaged structures
            raise _bad(name, f"damaged ELF structure: {type(e).__name__}") from None


def symbol_file_offset(path, name) -> tuple[int, int] | None:
    """(file offset, size) of the bytes of the defined symbol NAME in the ELF file PATH (from
    .symtab or .dynsym), or None when it has no such symbol or the symbol has no file bytes."""
    from elftools.common.exceptions import ELFError, ELFParseError
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            size = os.path.getsize(path)
            for sec in elf.iter_sections():
                if not isinstance(sec, SymbolTableSection):
                    continue
                for sym in sec.get_symbol_by_name(name) or []:
                    shndx = sym["st_shndx"]
                    if not isinstance(shndx, int) or shndx == 0 or shndx >= elf.num_sections():
                        continue
                    target = elf.get_section(shndx)
                    if target["sh_type"] == "SHT_NOBITS":
                        continue
                    off = sym["st_value"] - target["sh_addr"] + target["sh_offset"]
                    if off < 0 or off + sym["st_size"] > size:
                        return None
                    return off, sym["st_size"]
    except (ELFError, ELFParseError, ValueError, KeyError, EOFError):
        return None
    return None


def machine(path) -> str | None:
    """The ELF machine of PATH in pyelftools' names ('EM_X86_64', 'EM_AARCH64', ...), or None
    for a file that is not ELF."""
    from elftools.common.exceptions import ELFError, ELFParseError
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as f:
            return str(ELFFile(f).header["e_machine"])
    except (OSError, ELFError, ELFParseError, ValueError, KeyError, EOFError):
        return None


def version_needs(path) -> dict[str, set[str]]:
    """{needed library: {symbol versions}} of an ELF file (its GNU version-needed section:
    which glibc / libstdc++ symbol versions it needs at run time); {} for none."""
    from elftools.common.exceptions import ELFError, ELFParseError
    from elftools.elf.elffile import ELFFile
    from elftools.elf.gnuversions import GNUVerNeedSection

    needs: dict[str, set[str]] = {}
    try:
        with open(path, "rb") as f:
            for sec in ELFFile(f).iter_sections():
                if not isinstance(sec, GNUVerNeedSection):
                    continue
                for verneed, auxs in sec.iter_versions():
                    needs.setdefault(verneed.name, set()).update(aux.name for aux in auxs)
    except (OSError, ELFError, ELFParseError, ValueError, KeyError, EOFError):
        return {}
    return needs

