"""``bdp profile BUNDLE --device cortex-a72-model``: a Cortex-A72 (Raspberry Pi 4) estimate of an
AArch64 bundle, made on a host without a Pi. An estimate, not a measurement.

How it works
1. The bundle's own ``bin/bdp-run`` runs under ``qemu-aarch64`` with ``TVM_NUM_THREADS=1`` and a
   QEMU plugin (``estimator/libbb.c``, plugin API v1 as in Debian's qemu-user 7.2, built with the
   host C compiler on first use into ``$BDP_CACHE/estimator/``). The plugin adds one inline
   counter per translation block (TB) and at exit writes every executed TB: guest address,
   instruction count, execution count, instruction bytes, and the file + file offset behind it
   (from the host's ``/proc/self/maps``: qemu-user maps guest files 1:1, so the dlopen'ed
   ``model.so`` needs no load-address guessing). Executed instructions are counted exactly: the
   same bundle and input give the same counts on any host, however busy it is.
2. File offset -> ELF address -> the function symbol before it (``llvm-nm``). TVM's
   ``__tvm_ffi_X`` / ``X_compute_`` are folded into kernel ``X``. Only ``model.so`` counts as the
   model's kernels.
3. The hottest blocks that make up 99% of the instructions are disassembled (``llvm-mc``) and
   given to ``llvm-mca -mcpu=cortex-a72 -iterations=100`` one region each: block cost = Total
   Cycles / 100. Cycles = sum(executions x block cycles); the remaining 1% get the modelled
   blocks' average cycles per instruction. ms = cycles / 1.5 GHz. llvm-mca results are cached by
   block bytes (``$BDP_CACHE/estimator/mca-*.json``).
4. The per-run cost outside ``model.so`` (the TVM VM, workspace allocations) is the difference
   between a process that runs the model RUNS + 1 times and one that runs it RUNS times; the
   same difference counts the calls of ``TVMBackendAllocWorkspace`` / ``TVMBackendFreeWorkspace``.

What it ignores (so it is an optimistic, compute-bound figure): :data:`IGNORES`. The shared team
tool it comes from (``armproxy``) estimated L1-resident NEON loops (OpenSSL's AES) at 0.88-0.97x
the cycles measured on a Pi 4.

Tools: ``qemu-aarch64`` (``qemu-user``), ``llvm-mc`` / ``llvm-mca`` / ``llvm-nm`` (Debian's
``llvm``), a host C compiler; missing ones are an :class:`InputError` naming the apt command.
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from bdp.errors import InputError

DEVICE = "cortex-a72-model"
GHZ = 1.5
MCPU = "cortex-a72"
COVERAGE = 0.99
IGNORES = ("caches, TLB and DRAM (every load hits L1), memory bandwidth, branch mispredictions and fetch "
           "stalls, multithreading (one thread), thermal throttling; LLVM's cortex-a72 model uses the "
           "Cortex-A57 tables (A72 FP latencies are shorter)")
IGNORES_SHORT = "caches, memory bandwidth, branch mispredictions, threads"
APT = "apt-get install qemu-user llvm gcc g++-aarch64-linux-gnu"
PLUGIN_SOURCES = ("libbb.c", "qemu-plugin-v1.h")
RUNTIME_CALLS = ("TVMBackendAllocWorkspace", "TVMBackendFreeWorkspace")
# ELF start-up / tear-down glue in model.so: runs at dlopen / exit, not per model run
_GLUE = {"_init", "_fini", "frame_dummy", "register_tm_clones", "deregister_tm_clones",
         "__do_global_dtors_aux", "call_weak_fn"}
EM_AARCH64 = 183


# ---------------------------------------------------------------------------------------------
# tools, cache, plugin


def cache_dir() -> Path:
    """``$BDP_CACHE/estimator`` (default ``~/.cache/bdp/estimator``)."""
    root = os.environ.get("BDP_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "bdp") / "estimator"


def _which(name: str) -> str | None:
    """NAME on PATH, or Debian's versioned NAME-19 ... NAME-14."""
    for cand in [name] + [f"{name}-{v}" for v in range(19, 13, -1)]:
        p = shutil.which(cand)
        if p:
            return p
    return None


def tools() -> dict:
    """{"qemu", "mc", "mca", "nm", "cc"}: paths of the tools; InputError naming the missing ones."""
    from bdp.targets.devices.aarch64 import QEMU, QEMU_LD_PREFIX

    found = {"qemu": shutil.which(QEMU), "mc": _which("llvm-mc"), "mca": _which("llvm-mca"),
             "nm": _which("llvm-nm"), "cc": shutil.which(os.environ.get("CC", "")) or shutil.which("cc")
             or shutil.which("gcc")}
    names = {"qemu": QEMU, "mc": "llvm-mc", "mca": "llvm-mca", "nm": "llvm-nm", "cc": "a C compiler (cc)"}
    missing = [names[k] for k, v in found.items() if not v]
    if not Path(QEMU_LD_PREFIX, "lib").is_dir():
        missing.append(f"{QEMU_LD_PREFIX} (AArch64 glibc)")
    if missing:
        raise InputError(f"--device {DEVICE} needs {', '.join(missing)}: {APT}")
    return found


def plugin_source_dir() -> Path:
    return Path(__file__).resolve().parent / "estimator"


def build_plugin(cc: str | None = None, out_dir: str | os.PathLike | None = None) -> Path:
    """The QEMU plugin ``libbb-<hash>.so`` built from ``estimator/`` with the host C compiler, cached
    in OUT_DIR (default :func:`cache_dir`) by a hash of the sources; built once, atomically."""
    cc = cc or tools()["cc"]
    src = plugin_source_dir()
    h = hashlib.sha256()
    for name in PLUGIN_SOURCES:
        h.update((src / name).read_bytes())
    h.update(cc.encode())
    d = Path(out_dir) if out_dir else cache_dir()
    out = d / f"libbb-{h.hexdigest()[:16]}.so"
    if out.is_file():
        return out
    d.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".libbb.", suffix=".so", dir=d)
    os.close(fd)
    try:
        p = subprocess.run([cc, "-O2", "-Wall", "-shared", "-fPIC", "-fvisibility=hidden", "-o", tmp,
                            str(src / "libbb.c"), "-lpthread"], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"building the estimator's QEMU plugin failed: {p.stderr.strip()[-400:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


# ---------------------------------------------------------------------------------------------
# running under qemu


def run_counted(bundle: Path, input_npy: Path, out_dir: Path, bb_out: Path, repeat: int, tl: dict,
                timeout: float | None = None) -> None:
    """``bin/bdp-run`` under qemu-aarch64 with the plugin: REPEAT model runs (``--warmup 0
    --repeat REPEAT``, also for 1, so that two processes differ by model runs only), the block table
    in BB_OUT."""
    from bdp.targets.devices.aarch64 import QEMU_LD_PREFIX

    plugin = build_plugin(tl["cc"])
    extra = ["--warmup", "0", "--repeat", str(repeat)]
    cmd = [tl["qemu"], "-plugin", f"{plugin},out={bb_out}", str(bundle / "bin" / "bdp-run"), *extra,
           str(bundle), str(input_npy), str(out_dir)]
    env = dict(os.environ, QEMU_LD_PREFIX=QEMU_LD_PREFIX, LD_LIBRARY_PATH=str((bundle / "lib").resolve()),
               TVM_NUM_THREADS="1")
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"bdp-run under qemu took longer than {timeout:.0f} s") from None
    if p.returncode == 2:  # the runner's "your input is at fault"
        lines = [ln for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith("libbb:")]
        raise InputError(lines[-1] if lines else f"{bundle}: bdp-run refused the input")
    if p.returncode != 0:
        raise RuntimeError(f"bdp-run failed under qemu (exit {p.returncode}): {p.stderr.strip()[-400:]}")
    if not bb_out.is_file():
        raise RuntimeError("the estimator's QEMU plugin wrote no block table")


def parse_bb(path: Path):
    """({path id: file}, [block dicts]) from the plugin's table."""
    paths, blocks = {}, []
    with open(path) as f:
        for line in f:
            if line.startswith("P "):
                _, i, p = line.rstrip("\n").split(" ", 2)
                paths[int(i)] = p
            elif line.startswith("B "):
                _, va, n, cnt, pid, off, hx = line.split()
                blocks.append({"vaddr": int(va, 16), "n": int(n), "count": int(cnt), "pid": int(pid),
                               "off": -1 if off == "-1" else int(off, 16), "hex": hx})
    return paths, blocks


# ---------------------------------------------------------------------------------------------
# ELF


class Elf:
    """An AArch64 ELF file: PT_LOAD file offset -> address, address -> function symbol (llvm-nm)."""

    def __init__(self, path: str, nm: str):
        self.path, self.loads = path, []
        with open(path, "rb") as f:
            hdr = f.read(64)
            if len(hdr) < 64 or hdr[:4] != b"\x7fELF" or hdr[4] != 2:
                raise ValueError("not ELF64")
            self.machine = struct.unpack_from("<H", hdr, 18)[0]
            phoff, = struct.unpack_from("<Q", hdr, 32)
            phentsize, phnum = struct.unpack_from("<HH", hdr, 54)
            f.seek(phoff)
            for _ in range(phnum):
                ph = f.read(phentsize)
                p_type, _flags, p_off, p_vaddr, _pa, p_filesz = struct.unpack_from("<IIQQQQ", ph)
                if p_type == 1:
                    self.loads.append((p_off, p_filesz, p_vaddr))
        seen = {}
        if self.machine == EM_AARCH64:
            for dyn in (False, True):
                cmd = [nm, "-n", "--defined-only", "--print-size"] + (["-D"] if dyn else []) + [path]
                out = subprocess.run(cmd, capture_output=True, text=True).stdout
                for line in out.splitlines():
                    parts = line.split()
                    if len(parts) == 4 and parts[2] in "tTwWiI":
                        a = int(parts[0], 16)
                        if a not in seen or seen[a].startswith("$"):
                            seen[a] = parts[3]
        self.syms = sorted(seen.items())
        self.addrs = [a for a, _ in self.syms]
        self.by_name = {s: a for a, s in self.syms}

    def off2vaddr(self, off: int) -> int | None:
        for p_off, sz, va in self.loads:
            if p_off <= off < p_off + sz:
                return off - p_off + va
        return None

    def symbol(self, va: int) -> str:
        i = bisect.bisect_right(self.addrs, va) - 1
        return self.syms[i][1] if i >= 0 else "?"


def kernel_name(sym: str) -> str:
    """TVM's ``__tvm_ffi_X`` and ``X_compute_`` -> X."""
    if sym.startswith("__tvm_ffi_"):
        sym = sym[len("__tvm_ffi_"):]
    if sym.endswith("_compute_"):
        sym = sym[: -len("_compute_")]
    return sym


def model_kernels(bundle_dir, nm: str | None = None) -> list[str]:
    """The kernels model.so exports (``__tvm_ffi_X`` -> X), for checking that an estimate covers them."""
    nm = nm or tools()["nm"]
    out = subprocess.run([nm, "-D", "--defined-only", str(Path(bundle_dir) / "model.so")], capture_output=True,
                         text=True).stdout
    names = [ln.split()[-1] for ln in out.splitlines() if ln.split() and ln.split()[-1].startswith("__tvm_ffi_")]
    return sorted(kernel_name(n) for n in names if n != "__tvm_ffi__library_bin")


def resolve(paths: dict, blocks: list, model_path: str, nm: str, elfs: dict) -> None:
    """Add file, sym, elf_va, is_model to every block (ELF files cached in ELFS by path)."""
    model = os.path.realpath(model_path)
    for b in blocks:
        b["insns"] = b["n"] * b["count"]
        p = paths.get(b["pid"])
        if p is not None and p not in elfs:
            try:
                elfs[p] = Elf(p, nm)
            except (OSError, ValueError):
                elfs[p] = None
        e = elfs.get(p) if p is not None else None
        b["file"] = os.path.basename(p) if p else "?"
        b["path"] = p
        b["is_model"] = p is not None and os.path.realpath(p) == model
        if e is None or e.machine != EM_AARCH64 or b["off"] < 0:
            b["sym"], b["elf_va"] = "?", None
            continue
        va = e.off2vaddr(b["off"])
        b["elf_va"] = va
        b["sym"] = e.symbol(va) if va is not None else "?"


# ---------------------------------------------------------------------------------------------
# llvm-mc / llvm-mca


def disassemble(hexes: list[str], mc: str) -> list[list[str] | None]:
    """A64 bytes (hex strings) -> assembly lines per block; None where llvm-mc could not decode one."""
    data = "\n".join(" ".join("0x" + hx[i:i + 2] for i in range(0, len(hx), 2)) for hx in hexes)
    p = subprocess.run([mc, "--disassemble", "-triple=aarch64", f"-mcpu={MCPU}"], input=data,
                       capture_output=True, text=True)
    bad = collections.Counter(int(m.group(1)) - 1 for m in re.finditer(r"<stdin>:(\d+):\d+: warning", p.stderr))
    lines = [ln.strip() for ln in p.stdout.splitlines() if ln.strip() and not ln.strip().startswith(".text")]
    res, k = [], 0
    for i, h in enumerate(hexes):
        got = len(h) // 8 - bad.get(i, 0)
        res.append(lines[k:k + got] if i not in bad else None)
        k += got
    if k != len(lines):
        raise RuntimeError("llvm-mc's disassembly does not line up with the blocks")
    return res


_REGION = re.compile(r"\[(\d+)\] Code Region - b(\d+)")


def mca_cycles(blocks_asm: list[list[str]], mca: str, iterations: int = 100) -> list[float | None]:
    """Cycles per execution of each block (llvm-mca Total Cycles / ITERATIONS), None where llvm-mca
    refuses an instruction. Blocks go 400 to a call as separate regions; a refused call is split."""
    res: list = [None] * len(blocks_asm)

    def run(idx):
        src = []
        for i in idx:
            src += [f"# LLVM-MCA-BEGIN b{i}", *blocks_asm[i], "# LLVM-MCA-END"]
        p = subprocess.run([mca, "-mtriple=aarch64", f"-mcpu={MCPU}", f"-iterations={iterations}",
                            "-instruction-info=false", "-resource-pressure=false"],
                           input="\n".join(src) + "\n", capture_output=True, text=True)
        if p.returncode != 0:
            return False
        cur = None
        for line in p.stdout.splitlines():
            m = _REGION.search(line)
            if m:
                cur = int(m.group(2))
            elif cur is not None and line.startswith("Total Cycles:"):
                res[cur] = float(line.split(":")[1]) / iterations
        if len(idx) == 1 and res[idx[0]] is None:  # one region: no "Code Region" header
            m = re.search(r"Total Cycles:\s+(\d+)", p.stdout)
            if m:
                res[idx[0]] = int(m.group(1)) / iterations
        return True

    def rec(idx):
        if idx and not run(idx) and len(idx) > 1:
            mid = len(idx) // 2
            rec(idx[:mid])
            rec(idx[mid:])

    todo = [i for i, a in enumerate(blocks_asm) if a]
    for s in range(0, len(todo), 400):
        rec(todo[s:s + 400])
    return res


def _mca_version(mca: str) -> str:
    out = subprocess.run([mca, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"LLVM version (\S+)", out)
    return m.group(1) if m else "unknown"


class McaCache:
    """llvm-mca cycles per block, by the block's bytes, in ``mca-<mcpu>-llvm<version>.json``."""

    def __init__(self, mca: str, mc: str):
        self.mca, self.mc = mca, mc
        self.path = cache_dir() / f"mca-{MCPU}-llvm{_mca_version(mca)}.json"
        self.data = self._read()

    def _read(self) -> dict:
        try:
            d = json.loads(self.path.read_text())
            return d if isinstance(d, dict) else {}
        except (OSError, ValueError):
            return {}

    def cycles(self, hexes: list[str]) -> dict:
        """{hex: cycles per execution or None}: cached, or llvm-mca'd now and saved."""
        todo = sorted({h for h in hexes if h not in self.data})
        if todo:
            asm = disassemble(todo, self.mc)
            cyc = mca_cycles([a or [] for a in asm], self.mca)
            new = {h: c for h, c in zip(todo, cyc)}
            self.data.update(new)
            try:  # merge with what another process may have saved meanwhile; replace atomically
                self.path.parent.mkdir(parents=True, exist_ok=True)
                merged = {**self._read(), **self.data}
                fd, tmp = tempfile.mkstemp(prefix=".mca.", dir=self.path.parent)
                with os.fdopen(fd, "w") as f:
                    json.dump(merged, f)
                os.replace(tmp, self.path)
            except OSError:
                pass
        return {h: self.data.get(h) for h in hexes}


def cost(blocks: list, cache: McaCache, coverage: float = COVERAGE, key: str = "insns") -> dict:
    """Give each block ``cycles`` (for its KEY executions: "insns"/"count" or "d_insns"/"d_count"):
    llvm-mca for the hottest blocks covering COVERAGE of the instructions, the modelled blocks'
    average cycles per instruction for the rest. Returns {"modelled": share of instructions, "cpi"}."""
    ckey = "count" if key == "insns" else "d_count"
    total = sum(b[key] for b in blocks)
    hot, acc = [], 0
    for b in sorted(blocks, key=lambda b: -b[key]):
        if acc >= coverage * total or b[key] <= 0:
            break
        hot.append(b)
        acc += b[key]
    cyc = cache.cycles([b["hex"] for b in hot])
    mi = mc = 0.0
    for b in hot:
        c = cyc[b["hex"]]
        if c is not None:
            b["cyc_per_exec"] = c
            mi += b[key]
            mc += c * b[ckey]
    cpi = mc / mi if mi else 1.0
    for b in blocks:
        b["cycles"] = b["cyc_per_exec"] * b[ckey] if "cyc_per_exec" in b else b[key] * cpi
    return {"modelled": mi / total if total else 1.0, "cpi": cpi}


# ---------------------------------------------------------------------------------------------
# the estimate


def check_bundle(manifest: dict, bundle_dir) -> None:
    """InputError unless MANIFEST is an AArch64 bundle with its runner."""
    from bdp.targets.spec import spec_of_manifest

    t = manifest.get("target") or {}
    spec = spec_of_manifest(t)
    if spec is None or spec.device != "aarch64":
        raise InputError(f"{bundle_dir}: --device {DEVICE} estimates AArch64 bundles (--target rpi4 or arm64); "
                         f"this one is for {t.get('name')} ({t.get('arch')}); use --device local for it")
    if not (Path(bundle_dir) / "bin" / "bdp-run").is_file():
        raise InputError(f"{bundle_dir}: bin/bdp-run is missing; recompile the bundle with --target rpi4")


def _key(b):
    return (b["path"] or "?", b["off"] if b["off"] >= 0 else b["vaddr"], b["n"], b["hex"])


def _calls(blocks: list, elfs: dict, count_key: str, scale: float) -> dict:
    """Executions of the first block of each of RUNTIME_CALLS: the number of calls."""
    res = {}
    for name in RUNTIME_CALLS:
        hits = [(p, e.by_name[name]) for p, e in elfs.items() if e is not None and name in e.by_name]
        res[name] = sum(b[count_key] for b in blocks for p, a in hits if b["path"] == p and b["elf_va"] == a) / scale
    return res


def estimate(bundle_dir, x=None, *, runs: int = 1, overhead: bool = True, out_dir=None, keep=None,
             timeout: float | None = None, coverage: float = COVERAGE) -> dict:
    """Estimate BUNDLE_DIR (an AArch64 bundle) on a Cortex-A72 at 1.5 GHz, one thread.

    X: the input (default: standard normal, seed 0, of the manifest's shape). RUNS model runs in
    one process (counts are divided by RUNS; they are exact, so 1 is enough). OVERHEAD: also run
    RUNS + 1 times for the per-run cost outside model.so (TVM VM, workspace allocations). The
    runner's outputs (of the RUNS process) go to OUT_DIR, one .npy per output; KEEP keeps the block
    tables there. Returns the result dict (see ``format_text``)."""
    from bdp.toolchain.bundle.format import read_manifest
    from .timing import host_info

    if runs < 1:
        raise InputError("--runs must be at least 1")
    bundle = Path(bundle_dir).resolve()
    man = read_manifest(str(bundle_dir))
    check_bundle(man, bundle_dir)
    tl = tools()
    shape = [int(d) for d in man["input"]["shape"]]
    if x is None:
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="bdp-estimate-"))
    work.mkdir(parents=True, exist_ok=True)
    elfs: dict = {}
    try:
        np.save(work / "input.npy", np.asarray(x))
        out = Path(out_dir) if out_dir else work / "out"
        run_counted(bundle, work / "input.npy", out, work / "bb.txt", runs, tl, timeout)
        paths, blocks = parse_bb(work / "bb.txt")
        resolve(paths, blocks, str(bundle / "model.so"), tl["nm"], elfs)
        more = None
        if overhead:
            run_counted(bundle, work / "input.npy", work / "out-more", work / "bb-more.txt", runs + 1, tl, timeout)
            paths2, more = parse_bb(work / "bb-more.txt")
            resolve(paths2, more, str(bundle / "model.so"), tl["nm"], elfs)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)

    cache = McaCache(tl["mca"], tl["mc"])
    model = [b for b in blocks if b["is_model"] and b["sym"] not in _GLUE]
    mstat = cost(model, cache, coverage)
    per = collections.defaultdict(lambda: {"insns": 0, "cycles": 0.0})
    for b in model:
        k = per[kernel_name(b["sym"])]
        k["insns"] += b["insns"]
        k["cycles"] += b["cycles"]
    m_ins = sum(v["insns"] for v in per.values()) / runs
    m_cyc = sum(v["cycles"] for v in per.values()) / runs
    rows = [{"op": k, "insns": v["insns"] / runs, "cycles": v["cycles"] / runs, "total_ms": v["cycles"] / runs / GHZ / 1e6,
             "share": v["cycles"] / runs / m_cyc if m_cyc else 0.0,
             "ipc": v["insns"] / v["cycles"] if v["cycles"] else 0.0}
            for k, v in per.items()]
    rows.sort(key=lambda r: -r["cycles"])
    res = {"device": DEVICE, "estimate": True, "host": host_info(), "bundle": str(bundle),
           "target": man["target"].get("name"), "input_shape": shape, "threads": 1, "ghz": GHZ, "runs": runs,
           "cpu_model": f"llvm-mca -mcpu={MCPU} (LLVM {_mca_version(tl['mca'])})",
           "method": ("AArch64 instructions executed by bin/bdp-run under qemu-aarch64, counted exactly per "
                      "translation block; cycles per block from llvm-mca; ms = cycles / 1.5 GHz"),
           "ignores": IGNORES,
           "model": {"insns": m_ins, "cycles": m_cyc, "ms": m_cyc / GHZ / 1e6, "mca_coverage": mstat["modelled"]},
           "process_insns": sum(b["insns"] for b in blocks),
           "per_op": rows}
    res["runtime_calls"] = _calls(blocks, elfs, "count", runs)
    res["runtime_calls_note"] = "per run, counted in the whole process (start-up included)"
    res["runtime"] = None
    res["estimate_ms"] = res["model"]["ms"]
    if more is not None:
        res.update(_overhead(blocks, more, elfs, cache, coverage, m_ins))
        res["estimate_ms"] = res["model"]["ms"] + res["runtime"]["ms"]
    return res


def _overhead(blocks: list, more: list, elfs: dict, cache: McaCache, coverage: float, m_ins: float) -> dict:
    """The per-run cost outside model.so: blocks of the RUNS + 1 process minus those of the RUNS one."""
    base = collections.Counter()
    for b in blocks:
        base[_key(b)] += b["count"]
    for b in more:
        b["d_count"] = max(0, b["count"] - base.get(_key(b), 0))
        b["d_insns"] = b["d_count"] * b["n"]
    outside = [b for b in more if not b["is_model"] and b["d_count"]]
    st = cost(outside, cache, coverage, key="d_insns")
    o_ins = sum(b["d_insns"] for b in outside)
    o_cyc = sum(b["cycles"] for b in outside)
    by = collections.Counter()
    for b in outside:
        by[f"{b['file']}:{b['sym']}"] += b["d_insns"]
    model_one = sum(b["d_insns"] for b in more if b["is_model"] and b["sym"] not in _GLUE)
    return {"runtime": {"insns": o_ins, "cycles": o_cyc, "ms": o_cyc / GHZ / 1e6, "mca_coverage": st["modelled"],
                        "top": [{"where": k, "insns": v} for k, v in by.most_common(8)],
                        "note": "outside model.so, per run: TVM VM, workspace allocations, the runner's loop"},
            "runtime_calls": _calls(more, elfs, "d_count", 1),
            "runtime_calls_note": "per run: calls in one more run of the model",
            "model_insns_one_more_run": model_one, "model_insns_exact": model_one == round(m_ins)}


def format_text(res) -> str:
    m, rt = res["model"], res.get("runtime")
    lines = [f"bdp profile: {res['bundle']} on {DEVICE}: an ESTIMATE, not a measurement "
             f"(target {res['target']}, input {res['input_shape']})",
             f"  Cortex-A72 at {res['ghz']} GHz, 1 thread: AArch64 instructions counted exactly under qemu-aarch64, "
             f"cycles per block from {res['cpu_model']}",
             f"  ignores: {res['ignores']}",
             f"  model.so kernels  est. {m['ms']:9.3f} ms  {m['insns']:15,.0f} insns  {m['cycles']:15,.0f} cycles"]
    calls = res.get("runtime_calls") or {}
    ncalls = " + ".join(f"{calls[k]:,.0f} {k.replace('TVMBackend', '')}" for k in RUNTIME_CALLS if k in calls)
    if rt:
        lines.append(f"  runtime per run   est. {rt['ms']:9.3f} ms  {rt['insns']:15,.0f} insns  {rt['cycles']:15,.0f} cycles"
                     f"  (TVM VM, {ncalls})")
        lines.append(f"  total per run     est. {res['estimate_ms']:9.3f} ms")
    elif ncalls:
        lines.append(f"  runtime calls per run: {ncalls}")
    lines.append("  per kernel (est. ms/run, share, instructions, IPC, kernel):")
    for r in res["per_op"][:15]:
        op = r["op"] if len(r["op"]) <= 80 else r["op"][:77] + "..."
        lines.append(f"    {r['total_ms']:9.3f}  {100 * r['share']:5.1f}%  {r['insns']:13,.0f}  {r['ipc']:4.2f}  {op}")
    if len(res["per_op"]) > 15:
        lines.append(f"    ... {len(res['per_op']) - 15} more kernels in the JSON")
    return "\n".join(lines)


def chart_png(path, res):
    """Bars: the estimate (kernels, runtime) and the top kernels, in estimated ms."""
    from .charts import bar_chart

    bars = [("model.so kernels (est.)", res["model"]["ms"])]
    if res.get("runtime"):
        bars.append(("runtime per run (est.)", res["runtime"]["ms"]))
    bars += [(r["op"][:40], r["total_ms"]) for r in res["per_op"][:10]]
    return bar_chart(path, f"bdp profile: {res['target']} bundle, Cortex-A72 ESTIMATE (ms @ {res['ghz']} GHz, 1 thread)",
                     bars)
