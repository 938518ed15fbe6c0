"""Compilation targets: one registry, :data:`TARGETS`, of the names users type and the facts
behind each (TVM target, ELF machine, vector width and registers, popcount instructions and the
schedule choices they call for, how the bundle is packaged and run, its estimator). Schedules,
the bundle checks and the toolchain ask the spec; nothing else compares target, ISA or
architecture names, and the tables that need a fact per architecture (the ELF machines of
:mod:`bdp.targets.elf`, the manifest's known architectures) are read from :data:`TARGETS`.

A new CPU target is one :class:`TargetSpec` entry here (its :class:`ScheduleTraits` say which of
the schedules' measured choices apply); a new board's packaging goes in
:mod:`bdp.targets.devices` (one module), unless an existing one fits (``device="aarch64"``).
"""

from __future__ import annotations

import os
import platform
import threading
from dataclasses import dataclass, field, replace

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


_POOL = threading.local()  # TVM's thread pool is per calling thread: configured once in each
# TVM's ThreadGroup::AffinityMode (src/runtime/threading_backend.cc), for runtime.config_threadpool
_TVM_BIG_CORES = 1  # TVM's own mode: workers pinned one per core, unless TVM_BIND_THREADS says otherwise
_TVM_SHARE_ALL_CORES = -3  # kSpecifyThreadShareAllCore: every worker may run on every CPU listed


def configure_runtime_threads() -> int:
    """Configure TVM's thread pool for bdp in the calling thread (once per thread, before the
    pool's first parallel call); returns the thread count.

    TVM's own default on x86 is half the logical CPUs ("ignore hyper-threading") with the
    workers pinned one per core: on a 2-vCPU VM without hyper-threading that is one thread, and a
    pinned worker cannot move off a core that another thread (another runtime's spinning worker,
    another process) takes. bdp runs :func:`runtime_threads` workers (the physical cores of its
    affinity mask), each free to run on any CPU of the mask. It says so through TVM's runtime API
    (``runtime.config_threadpool``), not the environment: loading a bundle leaves ``os.environ``
    as it was. ``TVM_NUM_THREADS`` and ``TVM_BIND_THREADS`` in the environment still win (TVM
    reads the binding itself).
    """
    n = getattr(_POOL, "threads", None)
    if n is not None:
        return n
    import tvm

    n = runtime_threads()
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    mode = _TVM_BIG_CORES if "TVM_BIND_THREADS" in os.environ else _TVM_SHARE_ALL_CORES
    tvm.get_global_func("runtime.config_threadpool")(mode, n, [str(c) for c in cpus])
    _POOL.threads = n
    return n


@dataclass(frozen=True)
class ScheduleTraits:
    """Which of the CPU schedules' measured choices a target's ISA takes (the figures behind each
    are beside the code that reads it, in :mod:`bdp.targets.schedules`).

    ``narrow_words``: binary words of at most 16 bits, counts added in 16-bit lanes (NEON ``cnt``
    + ``uadalp``; ``binary_cpu.binary_word``); ``byte_counters``: the vector popcount counts bytes
    and bdp adds the byte counts as they are (AVX2's ``vpshufb`` table;
    :mod:`bdp.targets.byte_counters`, and the words ``binary_word`` picks with it);
    ``cycle_model_tiles``: binary conv tiles picked by the NEON cycle model
    (``binary_cpu._neon_plan``); ``wide_tiles``: binary register tiles of several vectors, the
    fewest loads per popcount (``binary_cpu.WIDE_TILES``); ``depthwise_rows``: depthwise binary
    convs tile several output rows (``binary_cpu.depthwise_rows``); ``columns_first``: float convs
    try vectors over the output columns before channel tiles, when the reduction has at most
    ``columns_first_limits[0]`` terms or at most ``[1]`` output channels (None: always)
    (``float_cpu.columns_first``); ``column_block_min_terms``: reductions the column tiles sum in
    blocks from this many terms (0: every one).
    """

    narrow_words: bool = False
    byte_counters: bool = False
    cycle_model_tiles: bool = False
    wide_tiles: bool = False
    depthwise_rows: bool = False
    columns_first: bool = False
    columns_first_limits: tuple | None = None
    column_block_min_terms: int = 0


# NEON: measured on the Cortex-A72 estimator; 128 = 2 x float_tile.BLOCK_MIN_TERMS (the stems'
# short reductions are not blocked)
NEON_TRAITS = ScheduleTraits(narrow_words=True, cycle_model_tiles=True, wide_tiles=True, depthwise_rows=True,
                             columns_first=True, column_block_min_terms=128)
# AVX2: measured on Zen 3
AVX2_TRAITS = ScheduleTraits(byte_counters=True, wide_tiles=True, depthwise_rows=True, columns_first=True,
                             columns_first_limits=(64, 16))
# AVX-512 and plain x86-64: the schedules' defaults (not measured since the choices above)
DEFAULT_TRAITS = ScheduleTraits()


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
    0 for none in the TVM target; ``elf_machine``: the library's ELF ``e_machine`` (pyelftools'
    name; None: not checked); ``isa_label``: the popcount ISA as tables print it; ``schedules``:
    the schedules' choices for the ISA (:class:`ScheduleTraits`); ``estimator``: the ``bdp
    profile --device`` that estimates the bundle's speed here (None: none); ``bench_goals``: the
    speed-ups ``bdp bench`` asks of this ISA where they differ from its defaults;
    ``host_code_arch``: the machine of the library's own code where it is not ``arch`` (a CUDA
    library's host code is built for the compiling x86-64 machine).
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
    elf_machine: str | None = None
    isa_label: str = ""
    schedules: ScheduleTraits = DEFAULT_TRAITS
    estimator: str | None = None
    bench_goals: dict = field(default_factory=dict)
    host_code_arch: str | None = None

    @property
    def library_arch(self) -> str:
        """The machine the library's code runs on (what a host or board must be to load it)."""
        return self.host_code_arch or self.arch

    @property
    def is_gpu(self) -> bool:
        return self.kind == "gpu"

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
                        binary_acc_registers=16, popcount_isa="avx512-vpopcntdq", needs_flags=_AVX512,
                        elf_machine="EM_X86_64", isa_label="AVX-512 VPOPCNTDQ")
X86_AVX2 = TargetSpec("x86-avx2", "x86-64 with AVX2 (Haswell and newer)", "cpu", "x86_64",
                      dict(_X86, mcpu="haswell"), vector_bits=256, vector_registers=16, binary_acc_registers=8,
                      popcount_isa="avx2", needs_flags=frozenset({"avx2"}), elf_machine="EM_X86_64", isa_label="AVX2",
                      schedules=AVX2_TRAITS,
                      # AVX2 has no vector popcount and onnxruntime's FP32 conv runs near the FMA peak
                      # (about 7x is the limit per layer)
                      bench_goals={"layer_geomean": 6.0, "model_int8_each": 2.5})
_X86_AVX512_ONLY = TargetSpec("x86-avx512-novpopcnt", "x86-64 with AVX-512, no VPOPCNTDQ (Skylake server)", "cpu",
                              "x86_64", dict(_X86, mcpu="skylake-avx512"), vector_bits=512, vector_registers=32,
                              binary_acc_registers=16, popcount_isa="avx512",
                              needs_flags=frozenset({"avx512f", "avx512bw"}), elf_machine="EM_X86_64",
                              isa_label="AVX-512")
X86_GENERIC = TargetSpec("x86-64", "x86-64 (SSE2)", "cpu", "x86_64", dict(_X86, mcpu="x86-64"), vector_bits=128,
                         vector_registers=16, binary_acc_registers=8, popcount_isa="popcnt", elf_machine="EM_X86_64",
                         isa_label="POPCNT")
ARM64 = TargetSpec("arm64", "generic AArch64 with NEON", "cpu", "aarch64",
                   {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}, vector_bits=128,
                   vector_registers=32, binary_acc_registers=16, popcount_isa="neon-cnt", device="aarch64",
                   num_cores=0, elf_machine="EM_AARCH64", isa_label="NEON (cnt)", schedules=NEON_TRAITS)
RPI4 = TargetSpec("rpi4", "Raspberry Pi 4 (Cortex-A72, 4 cores, 64-bit OS)", "cpu", "aarch64",
                  {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"]},
                  vector_bits=128, vector_registers=32, binary_acc_registers=16, popcount_isa="neon-cnt",
                  device="aarch64", num_cores=4, elf_machine="EM_AARCH64", isa_label="NEON (cnt)",
                  schedules=NEON_TRAITS, estimator="cortex-a72-model")
CUDA = TargetSpec("cuda", "NVIDIA GPU (sm_80+), CUDA source built by TVM", "gpu", "cuda",
                  {"kind": "cuda", "arch": "sm_80", "host": {"kind": "llvm"}}, popcount_isa="__popcll",
                  host_code_arch="x86_64",
                  note="CUDA bundle built on a host without a GPU: it compiled, it has not been run on a GPU")


def _host_x86() -> TargetSpec:
    """``x86``: this host's best x86-64 ISA (AVX-512 VPOPCNTDQ, AVX2 or plain x86-64)."""
    flags = cpu_flags() if host_arch() == "x86_64" else set()
    best = next((t for t in (X86_AVX512, _X86_AVX512_ONLY, X86_AVX2) if t.needs_flags <= flags), X86_GENERIC)
    return replace(best, name="x86", description=f"this host's best x86-64 ISA ({best.tvm_target['mcpu']})")


TARGETS: dict[str, TargetSpec] = {t.name: t for t in (_host_x86(), X86_AVX2, X86_AVX512, ARM64, RPI4, CUDA)}
TARGET_NAMES = tuple(TARGETS)


def elf_machine(arch: str) -> str | None:
    """The ELF ``e_machine`` of libraries built for ARCH (a TargetSpec ``arch``), None if no
    target of that architecture names one."""
    return next((t.elf_machine for t in TARGETS.values() if t.arch == arch and t.elf_machine), None)


def arches() -> tuple:
    """The architectures of :data:`TARGETS` (what a manifest's ``target.arch`` may say)."""
    return tuple(sorted({t.arch for t in TARGETS.values()}))


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
