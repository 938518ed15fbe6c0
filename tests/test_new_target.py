"""A new target is one TargetSpec entry (targets/spec.py), and at most one device module.

The tests here add targets the way a contributor would, by registering a spec in TARGETS and
nothing else (monkeypatch stands in for the edit of spec.py), and check that everything that
needs a fact about a target reads it from there: the compiler (TVM target, schedules), the
bundle's ELF check and manifest reader, the runner. A second AArch64 board (a Cortex-A53 one:
Raspberry Pi 3, Zero 2 W) reuses the ``aarch64`` device packaging, so no device module is
touched; it is compiled and run under qemu. A RISC-V 64 spec shows the per-architecture tables
(ELF machine, manifest architectures) follow the registry; it is not compiled here, because no
riscv64 cross linker is installed (TVM's LLVM has the riscv64 backend; the packaging of a
RISC-V board would be its one device module).
"""

import json
import os

import numpy as np
import pytest

from bdp.targets import spec as specs

A53 = specs.TargetSpec(
    "cortex-a53", "Cortex-A53 board (Raspberry Pi 3 / Zero 2 W, 64-bit OS)", "cpu", "aarch64",
    {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a53", "mattr": ["+neon"]},
    vector_bits=128, vector_registers=32, binary_acc_registers=16, popcount_isa="neon-cnt", device="aarch64",
    num_cores=4, elf_machine="EM_AARCH64", isa_label="NEON (cnt)", schedules=specs.NEON_TRAITS)

RISCV64 = specs.TargetSpec(
    "riscv64-rvv", "RISC-V 64 with the vector extension (RVV 1.0)", "cpu", "riscv64",
    {"kind": "llvm", "mtriple": "riscv64-linux-gnu", "mattr": ["+64bit", "+m", "+a", "+f", "+d", "+c", "+v"]},
    vector_bits=128, vector_registers=32, binary_acc_registers=16, popcount_isa="rvv-vcpop", num_cores=0,
    elf_machine="EM_RISCV", isa_label="RVV (vcpop)")


@pytest.fixture
def a53(monkeypatch):
    monkeypatch.setitem(specs.TARGETS, A53.name, A53)
    return A53


def test_tables_follow_the_registry(monkeypatch):
    from bdp.targets.schedules import binary_word
    from bdp.targets.kernels import BinaryConvParams
    from bdp.toolchain.bundle.manifest import Target

    record = {"name": RISCV64.name, "arch": RISCV64.arch, "tvm": RISCV64.tvm_target}
    with pytest.raises(Exception, match="target.arch"):
        Target.from_dict(record)  # not a target yet
    assert specs.elf_machine("riscv64") is None
    monkeypatch.setitem(specs.TARGETS, RISCV64.name, RISCV64)
    assert Target.from_dict(record).arch == "riscv64"
    assert "riscv64" in specs.arches() and specs.elf_machine("riscv64") == "EM_RISCV"
    assert specs.get_target("riscv64-rvv") is RISCV64 and specs.spec_of_manifest(record) is RISCV64
    assert not RISCV64.host_runnable and "riscv64" in RISCV64.why_not_runnable()
    # the schedules ask its traits (the defaults: 64-bit words), not its ISA name
    p = BinaryConvParams(n=1, c=64, h=16, w=16, m=64, kh=3, kw=3, strides=(1, 1), dilations=(1, 1), pads=(1, 1, 1, 1),
                         group=1, act_threshold=0.0, pad_value=0.0)
    assert binary_word(p, RISCV64) == 0
    assert binary_word(p, A53) == binary_word(p, specs.RPI4) == 16


def test_a53_board_compiles_and_runs(a53, tmp_path):
    import onnx
    import onnxruntime as ort

    import bdp
    from bdp.targets.devices import aarch64
    from bdp.targets.elf import machine
    from bdp.toolchain.bench.table import conv_layer_onnx
    from bdp.toolchain.bundle.format import read_manifest
    from bdp.toolchain.runtime.run import run_bundle

    ok, why = aarch64.tools_available()
    assert ok, f"AArch64 tools missing (CI installs them: bash .ci/setup): {why}"
    src = tmp_path / "layer.onnx"
    model = conv_layer_onnx(16, 8, 10, binary=True)
    onnx.save(model, src)
    out = bdp.compile(str(src), target="cortex-a53", out=str(tmp_path / "bundle"))
    man = read_manifest(out)  # the manifest reader and ELF check accept the new target
    assert man.target.name == "cortex-a53" and man.target.arch == "aarch64"
    assert man.target.tvm["mcpu"] == "cortex-a53" and man.target.popcount == "neon-cnt"
    assert man.stats["binary_convs"] == 1
    assert machine(os.path.join(out, "model.so")) == "EM_AARCH64"
    assert (tmp_path / "bundle" / "bin" / "bdp-run").is_file()  # the aarch64 packaging, unchanged

    x = np.random.default_rng(1).standard_normal((1, 16, 8, 10)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    got = run_bundle(out, tmp_path / "x.npy", tmp_path / "y.npz")["y"]  # bin/bdp-run under qemu
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    # onnxruntime sums 144 products +-alpha * +-1 in float32; bdp counts the signs exactly and
    # scales once: the two differ by float32 round-off of the sum, well under 1e-5 of its scale
    scale = float(np.abs(want).max())
    assert float(np.abs(got - want).max()) <= 1e-5 * scale
    report = json.loads((tmp_path / "bundle" / "report.json").read_text())
    assert report  # the compile report was written for the new target like any other


def test_trait_figures_match_the_schedules():
    """The traits hold figures the schedule modules define (spec.py imports no TVM, so it cannot
    import them): they must agree."""
    from bdp.targets.schedules.float_tile import BLOCK_MIN_TERMS

    assert specs.NEON_TRAITS.column_block_min_terms == 2 * BLOCK_MIN_TERMS
    for name in ("x86", "x86-avx2", "x86-avx512", "arm64", "rpi4"):
        t = specs.TARGETS[name]
        assert t.elf_machine and t.isa_label, name
    assert specs.TARGETS["x86"].schedules == specs.spec_of_manifest(
        {"name": "x86", "tvm": specs.TARGETS["x86"].tvm_target}).schedules
