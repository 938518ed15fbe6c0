"""Compilation targets: one registry, :data:`TARGETS`, of the names users type and the facts
behind each (TVM target, vector width and registers, popcount instructions, how the bundle is
packaged and run). Schedules and the toolchain ask the spec; nothing else compares target or
architecture names.

A new CPU target is one :class:`TargetSpec` entry here (plus its schedule choices, if the
generic ones do not fit, in :mod:`bdp.targets.schedules`); a new board's packaging goes in
:mod:`bdp.targets.devices`.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field

from bdp.errors import InputError


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def host_arch() -> str:
    """This host's architecture in ELF terms: "x86_64" or "aarch64" (else what Python says)."""
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def host_cores() -> int:
    """Physical cores this process may run on: the CPUs of its affinity mask, hyper-threading
    siblings counted once (``/sys/devices/system/cpu/cpuN/topology/thread_siblings_list``)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    cores = set()
    for c in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(c))
    return max(1, len(cores))


def runtime_threads() -> int:
    """Threads a bdp bundle runs with on this host: ``TVM_NUM_THREADS`` if set, else
    :func:`host_cores`."""
    try:
        return max(1, int(os.environ["TVM_NUM_THREADS"]))
    except (KeyError, ValueError):
        return host_cores()


def configure_runtime_threads() -> int:
    """Set TVM's thread-pool defaults for bdp before the pool starts; returns the thread count.

    TVM's own default on x86 is half the logical CPUs ("ignore hyper-threading") with the
    workers pinned one per core: on a 2-vCPU VM without hyper-threading that is one thread, and a
    pinned worker cannot move off a core that another thread (another runtime's spinning worker,
    another process) takes. bdp defaults to the physical cores of its affinity mask
    (``TVM_NUM_THREADS``) and to unpinned workers (``TVM_BIND_THREADS=0``); a value already in
    the environment wins.
    """
    n = runtime_threads()
    os.environ.setdefault("TVM_NUM_THREADS", str(n))
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    return n


@dataclass(frozen=True)
class TargetSpec:
    """What bdp knows about one target.

    ``llvm`` / ``kind``: the TVM target (``tvm`` adds the core count of a CPU target at the time
    it is asked); ``arch``: the ELF machine of the library (what a host must be to load it);
    ``vector_bits`` / ``vector_registers``: the SIMD register file the schedules tile for;
    ``binary_acc_registers``: vector registers a binary conv tile may keep accumulators in;
    ``popcount_isa``: how a vector popcount is made (reported, and picked by the schedules);
    ``device``: the packaging of :mod:`bdp.targets.devices` that makes the bundle run on its
    board without Python (None: the host's TVM runs it); ``needs_flags``: CPU flags a host must
    have to run the library; ``num_cores``: fixed core count (a board), None for this host's,
    0 for none in the TVM target.
    """

    name: str
    description: str
    kind: str  # "cpu" or "gpu": the schedule family
    arch: str  # "x86_64", "aarch64", or "cuda" (a GPU library with x86-64 host code)
    tvm_target: dict = field(default_factory=dict)
    vector_bits: int = 128
    vector_registers: int = 16
    binary_acc_registers: int = 8
    popcount_isa: str = ""
    device: str | None = None
    needs_flags: frozenset = frozenset()
    num_cores: int | None = None
    note: str | None = None  # said in the manifest and by `bdp compile`

    def vector_lanes(self, bits=64) -> int:
        """Lanes of BITS-bit elements in a vector register."""
        return max(1, self.vector_bits // bits)

    @property
    def tvm(self) -> dict:
        """The TVM target dict (``tvm.target.Target(spec.tvm)``)."""
        t = dict(self.tvm_target)
        if self.kind == "cpu" and self.num_cores != 0:
            t["num-cores"] = self.num_cores or runtime_threads()
        return t

    @property
    def fuses_epilogues(self) -> bool:
        """Relax fuses the float ops around a bdp kernel into it and bdp's schedule folds them
        (CPU targets); on a GPU each kernel is scheduled alone before fusion."""
        return self.kind == "cpu"

    @property
    def host_runnable(self) -> bool:
        """Can this host load and run the library directly?"""
        if self.kind != "cpu" or self.arch != host_arch():
            return False
        return self.needs_flags <= cpu_flags() if self.arch == "x86_64" else True

    @property
    def cross_cc(self) -> str | None:
        """The C++ compiler that links the library, when not the host's."""
        if self.device is None or self.arch == host_arch():
            return None
        from .devices import get_device

        return get_device(self.device).CROSS_CXX

    def why_not_runnable(self) -> str:
        if self.kind == "gpu":
            return "a CUDA bundle needs an NVIDIA GPU and TVM's CUDA runtime"
        if self.arch != host_arch():
            return f"built for {self.arch} ({self.name}), this host is {host_arch()}"
        missing = sorted(self.needs_flags - cpu_flags())
        return f"built for {self.name}, this CPU lacks {', '.join(missing)}" if missing else ""


_X86 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}
_AVX512 = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_vpopcntdq"})

X86_AVX512 = TargetSpec("x86-avx512", "x86-64 with AVX-512 and VPOPCNTDQ (Ice Lake server and newer)", "cpu", "x86_64",
                        dict(_X86, mcpu="icelake-server"), vector_bits=512, vector_registers=32,
                        binary_acc_registers=16, popcount_isa="avx512-vpopcntdq", needs_flags=_AVX512)
X86_AVX2 = TargetSpec("x86-avx2", "x86-64 with AVX2 (Haswell and newer)", "cpu", "x86_64",
                      dict(_X86, mcpu="haswell"), vector_bits=256, vector_registers=16, binary_acc_registers=8,
                      popcount_isa="avx2", needs_flags=frozenset({"avx2"}))
_X86_AVX512_ONLY = TargetSpec("x86-avx512-novpopcnt", "x86-64 with AVX-512, no VPOPCNTDQ (Skylake server)", "cpu",
                              "x86_64", dict(_X86, mcpu="skylake-avx512"), vector_bits=512, vector_registers=32,
                              binary_acc_registers=16, popcount_isa="avx512",
                              needs_flags=frozenset({"avx512f", "avx512bw"}))
X86_GENERIC = TargetSpec("x86-64", "x86-64 (SSE2)", "cpu", "x86_64", dict(_X86, mcpu="x86-64"), vector_bits=128,
                         vector_registers=16, binary_acc_registers=8, popcount_isa="popcnt")
ARM64 = TargetSpec("arm64", "generic AArch64 with NEON", "cpu", "aarch64",
                   {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}, vector_bits=128,
                   vector_registers=32, binary_acc_registers=16, popcount_isa="neon-cnt", device="aarch64",
                   num_cores=0)
RPI4 = TargetSpec("rpi4", "Raspberry Pi 4 (Cortex-A72, 4 cores, 64-bit OS)", "cpu", "aarch64",
                  {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"]},
                  vector_bits=128, vector_registers=32, binary_acc_registers=16, popcount_isa="neon-cnt",
                  device="aarch64", num_cores=4)
CUDA = TargetSpec("cuda", "NVIDIA GPU (sm_80+), CUDA source built by TVM", "gpu", "cuda",
                  {"kind": "cuda", "arch": "sm_80", "host": {"kind": "llvm"}}, popcount_isa="__popcll",
                  note="CUDA bundle built on a host without a GPU: it compiled, it has not been run on a GPU")


def _host_x86() -> TargetSpec:
    """``x86``: this host's best x86-64 ISA (AVX-512 VPOPCNTDQ, AVX2 or plain x86-64)."""
    flags = cpu_flags() if host_arch() == "x86_64" else set()
    best = next((t for t in (X86_AVX512, _X86_AVX512_ONLY, X86_AVX2) if t.needs_flags <= flags), X86_GENERIC)
    return TargetSpec("x86", f"this host's best x86-64 ISA ({best.tvm_target['mcpu']})", "cpu", "x86_64",
                      best.tvm_target, best.vector_bits, best.vector_registers, best.binary_acc_registers,
                      best.popcount_isa, needs_flags=best.needs_flags)


TARGETS: dict[str, TargetSpec] = {t.name: t for t in (_host_x86(), X86_AVX2, X86_AVX512, ARM64, RPI4, CUDA)}
TARGET_NAMES = tuple(TARGETS)


def get_target(name: str) -> TargetSpec:
    """The TargetSpec for a user-facing target name; InputError for an unknown one."""
    try:
        return TARGETS[name]
    except (KeyError, TypeError):
        raise InputError(f"unknown target '{name}'; choose one of: {', '.join(TARGET_NAMES)}") from None


def spec_of_manifest(target: dict) -> TargetSpec | None:
    """The registry entry a bundle's manifest ``target`` record names (None: unknown here). A
    bundle built for ``x86`` is taken for the ISA it was built with (its TVM ``mcpu``), not this
    host's."""
    if hasattr(target, "to_dict"):  # a toolchain.bundle.manifest.Target
        target = target.to_dict()
    if not isinstance(target, dict):
        return None
    if target.get("name") == "x86":
        mcpu = target.get("tvm", {}).get("mcpu") if isinstance(target.get("tvm"), dict) else None
        return next((t for t in (X86_AVX512, _X86_AVX512_ONLY, X86_AVX2, X86_GENERIC)
                     if t.tvm_target.get("mcpu") == mcpu), None)
    return TARGETS.get(target.get("name"))
