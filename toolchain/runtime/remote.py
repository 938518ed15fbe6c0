"""``bdp profile --device NAME``: profiling a bundle on a board over TVM RPC.

Boards and their config file: :mod:`bdp.toolchain.runtime.boards`; connecting: :mod:`bdp.toolchain.runtime.rpc`;
reading the VM bytecode of ``model.so``: :mod:`bdp.targets.library`.

On the board: the TVM runtime of the same version as here (``pip install apache-tvm==0.27.0.post1``
plus ``cloudpickle psutil``; AArch64 wheels exist) and ``python -m tvm.exec.rpc_server --host 0.0.0.0
--port 9090`` (add ``--tracker HOST:9190 --key rpi4`` to register with a tracker started by
``python -m tvm.exec.rpc_tracker``, which needs ``tornado``). Only ``model.so`` is sent.

What ``profile_remote`` does:

1. checks the bundle (hashes), connects, asks the remote which CPU it is
   (``target.llvm_get_system_triple`` where the server has it) and refuses a bundle built for
   another architecture; a server without that function is just tried, and a load failure is
   reported naming both sides;
2. uploads ``model.so``, loads it, builds a Relax ``VirtualMachine`` on the remote device and
   times the whole ``main`` with the VM's ``time_evaluator`` (``number=1, repeat=runs`` after
   ``warmup`` untimed runs), on the board's own clock: median / p90 / p99 of the per-run times;
3. per-op breakdown (the VM's instrumentation hook cannot be set from the client over RPC --
   "Cannot pass type ffi.Function as an argument to the remote" -- and the runtime has no
   profiling VM): the kernel calls of ``main`` and their argument shapes and
   dtypes are recovered *here*, by deserializing the bundle's VM bytecode from ``model.so``
   (``__tvm_ffi__library_bin``; works for any architecture, nothing is executed from the
   foreign library) and running ``main`` on a local VM in which every kernel is a recording
   stub. Then a tiny VM executable is built with ``relax.ExecBuilder`` holding one function per
   distinct kernel call (it just calls the kernel by name), sent to the board, made to import
   the bundle's module there (so the kernels resolve to the bundle's compiled code), and each
   function is timed with ``time_evaluator`` on remote tensors of the recorded shapes (float
   tensors zero-filled, shared between kernels; non-float ones -- packed weights, tables --
   carry the values recorded from the bytecode's constants). Rows are
   ``{op: kernel symbol, calls per run, total_ms per run, share}``, as ``bdp profile`` locally.
   Each kernel is timed in isolation (warm caches, one VM call of overhead, about a
   microsecond); ``per_op_note`` says so and gives their sum beside the end-to-end median.
   If any step of this fails, ``per_op`` is ``[]`` and ``per_op_note`` says why; nothing is
   estimated.

The FP32 onnxruntime baseline of local profiling is not measured on boards (onnxruntime does
not run over TVM RPC); ``fp32_onnxruntime`` is ``None`` and ``fp32_note`` says so.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass

import numpy as np

from bdp.errors import InputError
from bdp.targets.library import read_library_bin
from bdp.targets.spec import spec_of_manifest

from .boards import fmt_address, resolve_device
from .rpc import connect, first_line, needed_host_arch, preflight, remote_info, remote_threads

@dataclass
class KernelCall:
    """One distinct kernel call of ``main``: the kernel symbol, its arguments, and how often."""

    name: str
    args: list  # ("tensor", shape, dtype, numpy data or None) | ("int", v) | ("float", v)
    calls: int = 1


def _tensor_like(a) -> bool:
    return hasattr(a, "shape") and hasattr(a, "dtype") and hasattr(a, "numpy")


def kernel_calls(lib_path, manifest) -> list[KernelCall]:
    """The kernel calls one run of ``main`` makes, with argument shapes and dtypes, recovered from
    the VM bytecode in LIB_PATH (any architecture) by running it here with recording stubs."""
    import tvm
    import tvm_ffi
    from tvm.runtime.vm import VirtualMachine

    blobs = [b for kind, b in read_library_bin(lib_path) if kind == "relax.VMExecutable"]
    if not blobs:
        raise ValueError("the library holds no Relax VM executable")
    ex = tvm.get_global_func("ffi.Module.load_from_bytes.relax.VMExecutable")(blobs[0])
    stats = str(ex["stats"]())
    m = re.search(r"Globals \(#\d+\): \[(.*?)\]\s*$", stats, re.M)
    if not m:
        raise ValueError("cannot read the function table of the VM executable")
    names = [n.strip() for n in m.group(1).split(",") if n.strip()]
    kernels = [n for n in names if n != "main" and tvm_ffi.get_global_func(n, allow_missing=True) is None]

    seen: dict = {}
    order: list = []

    def make_stub(kname):
        def stub(*args):
            spec, key = [], [kname]
            for a in args:
                if _tensor_like(a):
                    shape, dtype = tuple(int(s) for s in a.shape), str(a.dtype)
                    floating = dtype.startswith(("float", "bfloat"))
                    # keep the data of non-float tensors (packed weights, tables, indices: the
                    # kernel may index with them); float data does not change the timing
                    spec.append(("tensor", shape, dtype, None if floating else a.numpy().copy()))
                    key.append((shape, dtype))
                elif isinstance(a, (bool, int, np.integer)):
                    spec.append(("int", int(a)))
                    key.append(("int", int(a)))
                elif isinstance(a, (float, np.floating)):
                    spec.append(("float", float(a)))
                    key.append(("float", float(a)))
                else:
                    spec.append(("other", type(a).__name__))
                    key.append(("other", type(a).__name__))
            key = tuple(key)
            if key in seen:
                seen[key].calls += 1
            else:
                seen[key] = KernelCall(kname, spec)
                order.append(seen[key])
        return stub

    def zero_allocations(func, func_symbol, before_run, ret_value, *args):
        # intermediate tensors start as zeros, so recorded non-float data is never garbage
        if not before_run and func_symbol == "vm.builtin.alloc_tensor" and _tensor_like(ret_value):
            ret_value.copyfrom(np.zeros(tuple(ret_value.shape), dtype=str(ret_value.dtype)))
        return 0

    registered = []
    try:
        for k in kernels:
            tvm_ffi.register_global_func(k, make_stub(k), override=True)
            registered.append(k)
        # the bytecode may name two devices (a GPU and the host); here both are this CPU
        spec = spec_of_manifest(manifest.get("target", {}))
        gpu = spec is not None and spec.is_gpu
        vm = VirtualMachine(ex, [tvm.cpu(0), tvm.cpu(0)] if gpu else tvm.cpu(0))
        vm.set_instrument(zero_allocations)
        inp = manifest["input"]
        x = tvm.runtime.tensor(np.zeros(tuple(inp["shape"]), dtype=inp.get("dtype", "float32")), tvm.cpu())
        vm["main"](x)
    finally:
        for k in registered:
            try:
                tvm_ffi.remove_global_func(k)
            except (RuntimeError, ValueError):  # TVM's errors; a stub left registered is harmless
                pass
    return order


def _bench_executable(calls):
    """A VM executable with one function ``bdp_k{i}`` per call: it calls the kernel by name with
    its tensor arguments (inputs of the function) and immediates."""
    from tvm import relax

    ib = relax.ExecBuilder()
    for i, c in enumerate(calls):
        n_in = sum(1 for a in c.args if a[0] == "tensor")
        with ib.function(f"bdp_k{i}", num_inputs=n_in):
            args, r = [], 0
            for a in c.args:
                if a[0] == "tensor":
                    args.append(ib.r(r))
                    r += 1
                else:
                    args.append(ib.imm(int(a[1])))
            ib.emit_call(c.name, args=args)
            ib.emit_ret(ib.r(0) if n_in else ib.void_arg())
    ex = ib.get()
    mod = getattr(ex, "mod", ex)
    with tempfile.TemporaryDirectory(prefix="bdp-bench-") as d:
        p = os.path.join(d, "bench.relax")
        import tvm

        tvm.get_global_func("ffi.ModuleWriteToFile")(mod, p, "")
        with open(p, "rb") as f:
            return f.read()


def _timeable(c: KernelCall) -> bool:
    return all(a[0] == "tensor" or (a[0] == "int" and -(2 ** 31) <= a[1] < 2 ** 31) for a in c.args) and \
        any(a[0] == "tensor" for a in c.args)


def per_op_remote(sess, rt_mod, devs, lib_path, manifest, runs):
    """(rows, note): each distinct kernel call timed on the board in isolation."""
    import tvm
    from tvm.runtime.vm import VirtualMachine

    calls = kernel_calls(lib_path, manifest)
    if not calls:
        return [], "per-op: the VM bytecode of main calls no kernels"
    timed = [c for c in calls if _timeable(c)]
    skipped = sorted({c.name for c in calls if not _timeable(c)})
    blob = _bench_executable(timed)
    loader = sess.get_function("ffi.Module.load_from_bytes.relax.VMExecutable")
    bench = loader(bytearray(blob))
    bench.import_module(rt_mod)
    vm = VirtualMachine(bench, list(devs))
    dev = devs[0]
    repeat = max(5, min(int(runs), 30))

    pool: dict = {}

    def remote_args(c):
        out, slots = [], {}
        for a in c.args:
            if a[0] != "tensor":
                continue
            _, shape, dtype, data = a
            if data is not None:  # non-float: its own upload, recorded values
                out.append(tvm.runtime.tensor(np.ascontiguousarray(data), dev))
                continue
            slot = slots.get((shape, dtype), 0)
            slots[(shape, dtype)] = slot + 1
            key = (shape, dtype, slot)  # distinct buffers within one call, shared between calls
            if key not in pool:
                pool[key] = tvm.runtime.tensor(np.zeros(shape, dtype=dtype), dev)
            out.append(pool[key])
        return out

    acc: dict = {}
    for i, c in enumerate(timed):
        fname = f"bdp_k{i}"
        vm.save_function(fname, fname + "_t", *remote_args(c), include_return=False)
        vm[fname + "_t"]()  # warm-up (the evaluator also discards one call)
        res = vm.time_evaluator(fname + "_t", dev, number=1, repeat=repeat)()
        per_call_ms = float(np.median(np.asarray(res.results))) * 1e3
        a = acc.setdefault(c.name, [0, 0.0])
        a[0] += c.calls
        a[1] += per_call_ms * c.calls
    total = sum(v[1] for v in acc.values()) or 1.0
    rows = [{"op": k, "calls": v[0], "total_ms": v[1], "share": v[1] / total} for k, v in acc.items()]
    rows.sort(key=lambda r: -r["total_ms"])
    note = (f"per-op: each distinct kernel call of main timed in isolation on the board (shapes from the bundle's "
            f"VM bytecode, median of {repeat} single calls); kernels sum to "
            f"{sum(r['total_ms'] for r in rows):.3f} ms per run")
    if skipped:
        note += f"; not timed (non-tensor arguments): {', '.join(skipped)}"
    return rows, note


def profile_remote(bundle_dir=".", device="local", rpc=None, tracker=None, key=None, runs=50, warmup=5) -> dict:
    """Profile BUNDLE_DIR on a board over TVM RPC; returns the dict ``profile_local`` returns."""
    from bdp.toolchain.bundle.format import LIBRARY, _safe_rel, read_manifest
    from .timing import summarize

    if runs < 1:
        raise InputError("--runs must be at least 1")
    if warmup < 0:
        raise InputError("--warmup must be 0 or more")
    ep = resolve_device(device, rpc=rpc, tracker=tracker, key=key)
    manifest = read_manifest(bundle_dir)
    target = manifest["target"]
    lib_path = _safe_rel(bundle_dir, LIBRARY)
    need = needed_host_arch(manifest)
    built_for = f"{target.get('arch')} ({target.get('name')})"

    preflight(ep)  # refused / unreachable / unknown key: one line, before TVM is imported

    import tvm
    from tvm.runtime.vm import VirtualMachine

    sess = connect(ep)
    where = ep.describe()
    info = remote_info(sess)
    if info["arch"] and need and info["arch"] != need:
        raise InputError(f"{bundle_dir}: the bundle is built for {built_for} but the board behind {where} is "
                         f"{info['arch']} ({info['triple']}); compile for that board or choose another device")
    spec = spec_of_manifest(target)
    if spec is not None and spec.is_gpu:
        devs = [sess.cuda(0), sess.cpu(0)]
        try:
            has_gpu = bool(devs[0].exist)
        except (RuntimeError, ValueError, OSError):  # TVM's (and RPC's) errors: said just below
            has_gpu = False
        if not has_gpu:
            raise InputError(f"{bundle_dir}: a CUDA bundle, but the board behind {where} has no CUDA device "
                             f"(or its TVM runtime lacks CUDA)")
    else:
        devs = [sess.cpu(0)]

    sha = str(manifest["files"][LIBRARY].get("sha256", ""))[:12] or "model"
    remote_name = f"bdp-{sha}-{LIBRARY}"
    try:
        sess.upload(lib_path, remote_name)
    except Exception as e:
        raise InputError(f"cannot upload {LIBRARY} to the board behind {where}: {first_line(e)}") from None
    try:
        try:
            rt_mod = sess.load_module(remote_name)
        except Exception as e:
            arch = info["arch"] or "unknown (the server does not say)"
            raise InputError(f"{bundle_dir}: the board behind {where} (arch {arch}) could not load {LIBRARY} built "
                             f"for {built_for}: {first_line(e)}") from None
        try:
            vm = VirtualMachine(rt_mod, list(devs))
        except Exception as e:
            raise InputError(f"{bundle_dir}: the board behind {where} could not start the bundle's VM "
                             f"(TVM runtime version mismatch? the bundle needs TVM {manifest.get('tvm_version')}): "
                             f"{first_line(e)}") from None

        inp = manifest["input"]
        shape = tuple(int(s) for s in inp["shape"])
        x = np.random.default_rng(0).standard_normal(shape).astype(inp.get("dtype", "float32"))
        x_dev = tvm.runtime.tensor(x, devs[0])
        try:
            vm.save_function("main", "bdp_main", x_dev, include_return=False)
            for _ in range(int(warmup)):
                vm["bdp_main"]()
            res = vm.time_evaluator("bdp_main", devs[0], number=1, repeat=int(runs))()
        except Exception as e:
            mcpu = (target.get("tvm") or {}).get("mcpu") if isinstance(target.get("tvm"), dict) else None
            raise RuntimeError(f"the board behind {where} failed while running the bundle (built for "
                               f"{built_for}{', mcpu ' + mcpu if mcpu else ''}; board cpu {info['cpu'] or 'unknown'}): "
                               f"{first_line(e)}") from None
        times_ms = [float(t) * 1e3 for t in res.results]
        lat = summarize(times_ms)

        try:
            per_op, per_op_note = per_op_remote(sess, rt_mod, devs, lib_path, manifest, runs)
        except Exception as e:  # never fake a breakdown
            per_op, per_op_note = [], f"per-op breakdown not available over RPC for this bundle: {first_line(e)}"
        if per_op:
            per_op_note += f" (end-to-end median {lat['median_ms']:.3f} ms)"
        threads = remote_threads(sess)
    finally:
        try:
            sess.remove(remote_name)
        except (RuntimeError, ValueError, OSError):  # the board's temporary folder keeps a copy; harmless
            pass

    result = {
        "device": ep.name,
        "host": {"cpu": info["cpu"] or info["arch"] or "unknown board", "cores": None,  # not visible over RPC
                 "machine": info["arch"], "triple": info["triple"], "address": where},
        "bundle": os.path.abspath(bundle_dir),
        "target": target["name"],
        "input_shape": list(shape),
        "threads": threads,
        "latency": lat,
        "per_op": per_op,
        "per_op_note": per_op_note,
        "fp32_onnxruntime": None,
        "fp32_note": "not measured on remote boards (onnxruntime does not run over TVM RPC); "
                     "`bdp profile --device local` measures it on the host that runs bdp",
        "remote": {"rpc": fmt_address(ep.rpc) if ep.rpc else None, "tracker": fmt_address(ep.tracker) if ep.tracker else None,
                   "key": ep.key, "timer": "board clock (VM time_evaluator)"},
    }
    return result
