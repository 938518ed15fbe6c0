"""Compilation targets: the names users type and the TVM target dicts behind them."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

from bdp.errors import InputError


@dataclass(frozen=True)
class TargetSpec:
    name: str
    tvm: dict  # TVM target dict (tvm.target.Target(dict))
    arch: str  # "x86_64", "aarch64" or "cuda"
    description: str
    cross_cc: str | None = None  # C++ compiler that links the library, when not the host's
    host_runnable: bool = True  # can this host run the library directly?
    popcount_isa: str = ""


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def host_x86_mcpu() -> tuple[str, str]:
    """(LLVM mcpu, popcount ISA) of this host's best x86-64 ISA."""
    flags = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512_vpopcntdq"} <= flags:
        return "icelake-server", "avx512-vpopcntdq"
    if {"avx512f", "avx512bw"} <= flags:
        return "skylake-avx512", "avx512"
    if "avx2" in flags:
        return "haswell", "avx2"
    return "x86-64", "popcnt"


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


def get_target(name: str) -> TargetSpec:
    """The TargetSpec for a user-facing target name; InputError for an unknown one."""
    host_is_x86 = platform.machine().lower() in ("x86_64", "amd64")
    host_is_arm = platform.machine().lower() in ("aarch64", "arm64")
    if name == "x86":
        mcpu, isa = host_x86_mcpu() if host_is_x86 else ("x86-64", "popcnt")
        return TargetSpec("x86", {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu,
                                  "num-cores": runtime_threads()}, "x86_64",
                          f"this host's best x86-64 ISA ({mcpu})", host_runnable=host_is_x86, popcount_isa=isa)
    if name == "x86-avx2":
        return TargetSpec(name, {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell",
                                 "num-cores": runtime_threads()}, "x86_64", "x86-64 with AVX2 (Haswell and newer)",
                          host_runnable=host_is_x86 and "avx2" in _cpu_flags(), popcount_isa="avx2")
    if name == "x86-avx512":
        return TargetSpec(name, {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "icelake-server",
                                 "num-cores": runtime_threads()}, "x86_64",
                          "x86-64 with AVX-512 and VPOPCNTDQ (Ice Lake server and newer)",
                          host_runnable=host_is_x86 and "avx512_vpopcntdq" in _cpu_flags(),
                          popcount_isa="avx512-vpopcntdq")
    if name == "arm64":
        return TargetSpec(name, {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
                          "aarch64", "generic AArch64 with NEON", cross_cc=None if host_is_arm else "aarch64-linux-gnu-g++",
                          host_runnable=host_is_arm, popcount_isa="neon-cnt")
    if name == "rpi4":
        return TargetSpec(name, {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72",
                                 "mattr": ["+neon"], "num-cores": 4},
                          "aarch64", "Raspberry Pi 4 (Cortex-A72, 4 cores, 64-bit OS)",
                          cross_cc=None if host_is_arm else "aarch64-linux-gnu-g++",
                          host_runnable=host_is_arm, popcount_isa="neon-cnt")
    if name == "cuda":
        return TargetSpec(name, {"kind": "cuda", "arch": "sm_80", "host": {"kind": "llvm"}}, "cuda",
                          "NVIDIA GPU (sm_80+), CUDA source built by TVM", host_runnable=False,
                          popcount_isa="__popcll")
    raise InputError(f"unknown target '{name}'; choose one of: {', '.join(TARGET_NAMES)}")


TARGET_NAMES = ("x86", "x86-avx2", "x86-avx512", "arm64", "rpi4", "cuda")
