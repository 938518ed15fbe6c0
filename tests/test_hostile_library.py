"""A damaged model.so (issue 15, item 4): the loader raises InputError, the process never dies.

The library is cut in half (or its ELF tables pointed past its end) and its sha256 in the
manifest "fixed", so only the ELF check stands between it and the dynamic loader, which maps
the missing bytes and dies by SIGBUS. Loads run in a subprocess: a regression must fail the
test, not kill the test session.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from bdp.toolchain.bundle.format import sha256_file
from conftest import assert_input_error, run_cli
from hostile_common import SHAPE, copy_bundle, shared_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return shared_bundle(tmp_path_factory)


def _damaged(bundle, dst, damage):
    b = copy_bundle(bundle, dst)
    lib = b / "model.so"
    data = bytearray(lib.read_bytes())
    lib.write_bytes(bytes(damage(data)))
    d = json.loads((b / "manifest.json").read_text())
    d["files"]["model.so"] = {"sha256": sha256_file(lib), "bytes": os.path.getsize(lib)}
    (b / "manifest.json").write_text(json.dumps(d, indent=2))
    return b


def _half(data):
    return data[: len(data) // 2]


def _shoff_past_end(data):
    struct.pack_into("<Q", data, 0x28, len(data) + 4096)
    return data


def _phoff_past_end(data):
    struct.pack_into("<Q", data, 0x20, len(data) - 8)
    return data


def _machine_arm(data):
    struct.pack_into("<H", data, 18, 183)  # EM_AARCH64
    return data


def _elf32(data):
    data[4] = 1
    return data


def _not_elf(data):
    return b"MZ" + bytes(data[2:200])


DAMAGES = {"cut in half": (_half, "truncated"), "section table past the end": (_shoff_past_end, "section"),
           "program headers past the end": (_phoff_past_end, "program header"),
           "another machine": (_machine_arm, "EM_AARCH64"), "32-bit": (_elf32, "64-bit"),
           "not ELF": (_not_elf, "no ELF header")}


@pytest.mark.parametrize("name", list(DAMAGES))
def test_damaged_library_is_exit_2(bundle, tmp_path, name):
    damage, needle = DAMAGES[name]
    b = _damaged(bundle, tmp_path / "b", damage)
    np.save(tmp_path / "x.npy", np.zeros(SHAPE, np.float32))
    p = run_cli("run", b, "--input", tmp_path / "x.npy", "-o", tmp_path / "o.npz")
    line = assert_input_error(p, "model.so", "not a loadable library")
    assert needle in line, line
    assert not (tmp_path / "o.npz").exists()


def test_load_raises_instead_of_killing_the_interpreter(bundle, tmp_path):
    b = _damaged(bundle, tmp_path / "b", _half)
    code = ("import bdp, sys\nfrom bdp.errors import InputError\n"
            "try:\n    bdp.load(sys.argv[1])\nexcept InputError as e:\n    print('InputError:', e)\n    sys.exit(0)\n"
            "sys.exit(3)\n")
    p = subprocess.run([sys.executable, "-c", code, str(b)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)  # -7 would be SIGBUS
    assert "truncated" in p.stdout


def test_symbol_file_offset_matches_the_library_bytes(bundle):
    """targets/elf.symbol_file_offset (pyelftools) finds TVM's embedded module blob: the bytes
    there are the blob (its length word fits the file) and parse into the VM executable's
    modules, the compiled code's placeholder among them."""
    from bdp.targets.elf import symbol_file_offset
    from bdp.targets.library import read_library_bin

    lib = bundle / "model.so"
    data = lib.read_bytes()
    off, size = symbol_file_offset(lib, "__tvm_ffi__library_bin")
    nbytes = struct.unpack_from("<Q", data, off)[0]
    assert 0 < nbytes < len(data) - off
    kinds = [k for k, _ in read_library_bin(lib)]
    assert "_lib" in kinds and any("VM" in k or "relax" in k.lower() for k in kinds), kinds
    assert symbol_file_offset(lib, "no_such_symbol_anywhere") is None
