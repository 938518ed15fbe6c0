"""``bdp profile --device NAME``: profiling a bundle on a board over TVM RPC.

A board is reached either directly (``--rpc HOST:PORT``, a ``tvm.rpc`` server running on the
board) or through a TVM RPC tracker (``--tracker HOST:PORT --key KEY``). Boards have names in a
small user config file, so that ``bdp profile --device rpi4`` works as typed::

    ~/.config/bdp/devices.json      (BDP_DEVICES=path overrides; $XDG_CONFIG_HOME is honoured)
    {
      "rpi4":  {"rpc": "192.168.1.20:9090"},
      "farm":  {"tracker": "10.0.0.2:9190", "key": "rpi4", "timeout": 60}
    }

``--rpc`` / ``--tracker`` / ``--key`` on the command line override the file. ``timeout`` (seconds,
default 30, or ``BDP_RPC_TIMEOUT``) bounds how long we wait for the board: the connection, the
RPC handshake and, with a tracker, a free board.

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

import json
import os
import re
import socket
import struct
import tempfile
import threading
from dataclasses import dataclass

import numpy as np

from bdp.errors import InputError

DEFAULT_TIMEOUT = 30.0
CONFIG_ENV = "BDP_DEVICES"
TIMEOUT_ENV = "BDP_RPC_TIMEOUT"
_RPC_TRACKER_MAGIC = 0x2F271
_TRACKER_SUMMARY = 6  # tvm.rpc.base.TrackerCode.SUMMARY
_LIBRARY_BIN_SYMBOL = "__tvm_ffi__library_bin"
_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "aarch64_be": "aarch64"}


# ============================================================================ device config

def config_path() -> str:
    """The device config file: $BDP_DEVICES, else $XDG_CONFIG_HOME/bdp/devices.json, else
    ~/.config/bdp/devices.json."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return os.path.abspath(os.path.expanduser(env))
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "bdp", "devices.json")


def _how_to_add(name="NAME", path=None) -> str:
    return (f"add the board with `bdp devices add {name} --rpc HOST:PORT` (or --tracker HOST:PORT --key KEY), "
            f"or write {{\"{name}\": {{\"rpc\": \"HOST:PORT\"}}}} into {path or config_path()}")


def parse_address(text, what="--rpc") -> tuple[str, int]:
    """'HOST:PORT' (or '[v6]:PORT') -> (host, port); InputError naming WHAT otherwise."""
    if not isinstance(text, str) or ":" not in text:
        raise InputError(f"{what} '{text}': expected HOST:PORT")
    host, _, port_s = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_s)
    except ValueError:
        port = -1
    if not host or not 0 < port < 65536:
        raise InputError(f"{what} '{text}': expected HOST:PORT with a port in 1..65535")
    return host, port


def _read_config(path, missing_ok, name="NAME") -> dict:
    if not os.path.exists(path):
        if missing_ok:
            return {}
        raise InputError(f"no device config at {path}; {_how_to_add(name, path)}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: corrupt device config ({why}); fix or delete it, then "
                         f"{_how_to_add(name, path)}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise InputError(f"{path}: corrupt device config (expected {{\"NAME\": {{\"rpc\": \"HOST:PORT\"}}, ...}}); "
                         f"fix or delete it, then {_how_to_add(name, path)}")
    return data


def list_devices(path=None) -> dict:
    """{name: entry} from the device config (empty when the file does not exist)."""
    return _read_config(path or config_path(), missing_ok=True)


def _check_entry(name, entry, path):
    if entry.get("rpc") and entry.get("tracker"):
        raise InputError(f"{path}: device '{name}' has both 'rpc' and 'tracker'; keep one")
    if not entry.get("rpc") and not entry.get("tracker"):
        raise InputError(f"{path}: device '{name}' has neither 'rpc' nor 'tracker'; {_how_to_add(name, path)}")
    if entry.get("rpc"):
        parse_address(entry["rpc"], f"{path}: device '{name}' rpc")
    if entry.get("tracker"):
        parse_address(entry["tracker"], f"{path}: device '{name}' tracker")
        if not entry.get("key"):
            raise InputError(f"{path}: device '{name}' has a tracker but no 'key'")
    if "timeout" in entry:
        t = entry["timeout"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0:
            raise InputError(f"{path}: device '{name}': 'timeout' must be a positive number of seconds")


def _write_config(path, data):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".devices.", suffix=".tmp", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _check_name(name):
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name or ""):
        raise InputError(f"device name '{name}': use letters, digits, '.', '_' and '-'")
    if name == "local":
        raise InputError("'local' is this host, not a board; choose another device name")


def add_device(name, rpc=None, tracker=None, key=None, timeout=None, path=None) -> str:
    """Add or replace board NAME in the device config; returns the config path.

    Exactly one of ``rpc`` ('HOST:PORT' of a TVM RPC server) or ``tracker`` ('HOST:PORT' of a
    TVM RPC tracker, with ``key``, which defaults to NAME) is required."""
    path = os.path.abspath(path) if path else config_path()
    _check_name(name)
    if bool(rpc) == bool(tracker):
        raise InputError(f"device '{name}': give exactly one of an RPC server address (HOST:PORT) or a tracker address")
    entry = {}
    if rpc:
        parse_address(rpc, "rpc")
        entry["rpc"] = rpc.strip()
        if key:
            raise InputError(f"device '{name}': a key is used with a tracker only")
    else:
        parse_address(tracker, "tracker")
        entry["tracker"] = tracker.strip()
        entry["key"] = key or name
    if timeout is not None:
        entry["timeout"] = float(timeout)
    _check_entry(name, entry, path)
    data = _read_config(path, missing_ok=True)
    data[name] = entry
    _write_config(path, data)
    return path


def remove_device(name, path=None) -> str:
    """Remove board NAME from the device config; InputError if it is not there."""
    path = os.path.abspath(path) if path else config_path()
    data = _read_config(path, missing_ok=True)
    if name not in data:
        raise InputError(f"unknown device '{name}' in {path}" + (f" (known: {', '.join(sorted(data))})" if data else ""))
    del data[name]
    _write_config(path, data)
    return path


@dataclass
class Endpoint:
    """Where a board is: a direct RPC server address or a tracker address plus a key."""

    name: str
    rpc: tuple | None = None
    tracker: tuple | None = None
    key: str | None = None
    timeout: float = DEFAULT_TIMEOUT

    def describe(self) -> str:
        if self.rpc:
            return f"RPC server {_fmt(self.rpc)}"
        return f"tracker {_fmt(self.tracker)} key '{self.key}'"


def _fmt(addr) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _env_timeout():
    v = os.environ.get(TIMEOUT_ENV)
    if not v:
        return None
    try:
        t = float(v)
        assert t > 0
        return t
    except (ValueError, AssertionError):
        raise InputError(f"{TIMEOUT_ENV}='{v}': expected a positive number of seconds") from None


def resolve_device(device="local", rpc=None, tracker=None, key=None) -> Endpoint:
    """Combine the device config with the command line (which wins) into an Endpoint."""
    if rpc and tracker:
        raise InputError("give either --rpc HOST:PORT or --tracker HOST:PORT --key KEY, not both")
    entry = {}
    if device and device != "local":
        path = config_path()
        if not (rpc or tracker):
            data = _read_config(path, missing_ok=False, name=device)
            if device not in data:
                known = f" (known: {', '.join(sorted(data))})" if data else ""
                raise InputError(f"unknown device '{device}' in {path}{known}; {_how_to_add(device, path)}")
            entry = data[device]
            _check_entry(device, entry, path)
        else:  # the command line gives the address; the file may still hold key / timeout
            try:
                entry = _read_config(path, missing_ok=True).get(device, {})
            except InputError:
                entry = {}
    t = entry.get("timeout")
    timeout = _env_timeout() or (float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0
                                 else DEFAULT_TIMEOUT)
    name = device if device and device != "local" else None
    if rpc:
        if key:
            raise InputError("--key goes with --tracker; --rpc connects to the server directly")
        addr = parse_address(rpc, "--rpc")
        return Endpoint(name or f"rpc:{_fmt(addr)}", rpc=addr, timeout=timeout)
    if tracker:
        addr = parse_address(tracker, "--tracker")
        k = key or entry.get("key") or name
        if not k:
            raise InputError("--tracker needs --key KEY (the device key the board registered with)")
        return Endpoint(name or f"tracker:{_fmt(addr)}/{k}", tracker=addr, key=k, timeout=timeout)
    if key and not entry.get("tracker"):
        raise InputError("--key goes with --tracker HOST:PORT")
    if entry.get("rpc"):
        return Endpoint(name, rpc=parse_address(entry["rpc"]), timeout=timeout)
    if entry.get("tracker"):
        return Endpoint(name, tracker=parse_address(entry["tracker"]), key=key or entry["key"], timeout=timeout)
    raise InputError(f"--device local is this host; name a board from {config_path()} or give --rpc / --tracker")


# ============================================================================ connecting

def _run_with_timeout(fn, timeout, on_timeout):
    """Run fn() in a daemon thread; raise InputError(on_timeout) if it does not finish in time."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, name="bdp-rpc-connect", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise InputError(on_timeout)
    if "error" in box:
        raise box["error"]
    return box["value"]


def _open_socket(addr, timeout, what):
    host, port = addr
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as e:
        raise InputError(f"cannot resolve the host of {what} {_fmt(addr)} ({e.strerror or e})") from None
    except ConnectionRefusedError:
        hint = ("`python -m tvm.exec.rpc_server --host 0.0.0.0 --port PORT`" if "server" in what
                else "`python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port PORT`")
        raise InputError(f"cannot connect to {what} {_fmt(addr)}: connection refused (is {hint} running there?)") from None
    except (socket.timeout, TimeoutError):
        raise InputError(f"cannot connect to {what} {_fmt(addr)}: no answer within {timeout:g} s") from None
    except OSError as e:
        raise InputError(f"cannot connect to {what} {_fmt(addr)}: {e.strerror or e}") from None


def _first_line(e) -> str:
    s = str(e).strip()
    lines = [ln.strip() for ln in s.splitlines() if ln.strip()]
    # TVM errors start with a banner line ("RPCError: Error caught from RPC call:"); keep the cause
    for ln in reversed(lines):
        if not ln.startswith(("File ", "Traceback", "  ")) and not ln.endswith("Error caught from RPC call:"):
            return ln[:300]
    return (lines[0] if lines else type(e).__name__)[:300]


def _recv_exact(sock, n):
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            raise ConnectionResetError("connection closed")
        got += chunk
    return got


def _tracker_summary(ep: Endpoint) -> dict:
    """Talk to the tracker (its JSON protocol, with our timeout): check it is one, get its summary."""
    sock = _open_socket(ep.tracker, ep.timeout, "the TVM RPC tracker at")
    try:
        sock.settimeout(ep.timeout)
        sock.sendall(struct.pack("<i", _RPC_TRACKER_MAGIC))
        if struct.unpack("<i", _recv_exact(sock, 4))[0] != _RPC_TRACKER_MAGIC:
            raise InputError(f"{_fmt(ep.tracker)} is not a TVM RPC tracker (wrong handshake)")
        msg = json.dumps([_TRACKER_SUMMARY]).encode()
        sock.sendall(struct.pack("<i", len(msg)) + msg)
        (size,) = struct.unpack("<i", _recv_exact(sock, 4))
        value = json.loads(_recv_exact(sock, size).decode())
        if not isinstance(value, list) or len(value) != 2 or value[0] != 0 or not isinstance(value[1], dict):
            raise InputError(f"the TVM RPC tracker at {_fmt(ep.tracker)} gave an unexpected answer to a summary request")
        return value[1]
    except (socket.timeout, TimeoutError):
        raise InputError(f"the TVM RPC tracker at {_fmt(ep.tracker)} did not answer within {ep.timeout:g} s") from None
    except (OSError, ValueError, struct.error) as e:
        raise InputError(f"{_fmt(ep.tracker)} does not speak the TVM RPC tracker protocol ({e})") from None
    finally:
        sock.close()


def preflight(ep: Endpoint):
    """Fail fast, before TVM is even imported: is anything listening, is the tracker a tracker,
    does it know the key? InputError naming the address otherwise."""
    if ep.rpc:
        _open_socket(ep.rpc, ep.timeout, "the TVM RPC server at").close()
        return
    summary = _tracker_summary(ep)
    keys = sorted({str(s.get("key", "")).split(":", 1)[-1] for s in summary.get("server_info", [])
                   if isinstance(s, dict)} - {""})
    if ep.key not in keys:
        raise InputError(f"no board is registered under key '{ep.key}' at the tracker {_fmt(ep.tracker)} "
                         f"(keys there: {', '.join(keys) or 'none'})")


def connect(ep: Endpoint):
    """Open an RPC session to the board (after ``preflight``); InputError naming the address on
    failure, including when the handshake or a free board takes longer than the timeout."""
    from tvm import rpc

    if ep.rpc:
        host, port = ep.rpc
        what = f"the TVM RPC server at {_fmt(ep.rpc)}"
        try:
            return _run_with_timeout(lambda: rpc.connect(host, port), ep.timeout,
                                     f"{what} did not complete the RPC handshake within {ep.timeout:g} s "
                                     f"(busy with another session, or not a TVM RPC server)")
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"cannot open an RPC session with {what}: {_first_line(e)}") from None

    def request():
        tr = rpc.connect_tracker(*ep.tracker)
        try:
            return tr.request(ep.key, priority=1, session_timeout=0, max_retry=1)
        finally:
            tr.close()

    try:
        return _run_with_timeout(request, ep.timeout,
                                 f"the TVM RPC tracker at {_fmt(ep.tracker)} gave no free board with key '{ep.key}' "
                                 f"within {ep.timeout:g} s (all busy?)")
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"cannot get a board with key '{ep.key}' from the tracker {_fmt(ep.tracker)}: "
                         f"{_first_line(e)}") from None


# ============================================================================ the remote side

def _norm_arch(a) -> str | None:
    if not a:
        return None
    a = str(a).split("-")[0].lower()
    return _ARCH_ALIASES.get(a, a)


def remote_info(sess) -> dict:
    """What the remote says about itself; fields it cannot tell are None."""
    info = {"triple": None, "cpu": None, "arch": None, "threads": None}
    for key, fname in (("triple", "target.llvm_get_system_triple"), ("cpu", "target.llvm_get_system_cpu")):
        try:
            info[key] = str(sess.get_function(fname)())
        except Exception:  # a runtime-only server (e.g. the C++ tvm_rpc) has no LLVM helpers
            pass
    info["arch"] = _norm_arch(info["triple"])
    info["threads"] = _remote_threads(sess)
    return info


def _remote_threads(sess):
    try:
        return int(sess.get_function("runtime.NumThreads")())
    except Exception:
        return None


def _needed_host_arch(manifest) -> str | None:
    arch = manifest.get("target", {}).get("arch")
    if arch == "cuda":
        return "x86_64"  # the cuda target's host code is built for the compiling x86-64 machine
    return _norm_arch(arch)


# ============================================================================ kernel calls (per-op)

def _elf_symbol_offset(data: bytes, name: str) -> int | None:
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
    off = _elf_symbol_offset(data, _LIBRARY_BIN_SYMBOL)
    if off is None:
        raise ValueError(f"{os.path.basename(lib_path)} carries no {_LIBRARY_BIN_SYMBOL} (not a TVM library?)")
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
        gpu = manifest.get("target", {}).get("arch") == "cuda"
        vm = VirtualMachine(ex, [tvm.cpu(0), tvm.cpu(0)] if gpu else tvm.cpu(0))
        vm.set_instrument(zero_allocations)
        inp = manifest["input"]
        x = tvm.runtime.tensor(np.zeros(tuple(inp["shape"]), dtype=inp.get("dtype", "float32")), tvm.cpu())
        vm["main"](x)
    finally:
        for k in registered:
            try:
                tvm_ffi.remove_global_func(k)
            except Exception:
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


# ============================================================================ profile

def profile_remote(bundle_dir=".", device="local", rpc=None, tracker=None, key=None, runs=50, warmup=5) -> dict:
    """Profile BUNDLE_DIR on a board over TVM RPC; returns the dict ``profile_local`` returns."""
    from .bundle import LIBRARY, _safe_rel, read_manifest
    from .profile import summarize

    if runs < 1:
        raise InputError("--runs must be at least 1")
    if warmup < 0:
        raise InputError("--warmup must be 0 or more")
    ep = resolve_device(device, rpc=rpc, tracker=tracker, key=key)
    manifest = read_manifest(bundle_dir)
    target = manifest["target"]
    lib_path = _safe_rel(bundle_dir, LIBRARY)
    need = _needed_host_arch(manifest)
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
    if target.get("arch") == "cuda":
        devs = [sess.cuda(0), sess.cpu(0)]
        try:
            has_gpu = bool(devs[0].exist)
        except Exception:
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
        raise InputError(f"cannot upload {LIBRARY} to the board behind {where}: {_first_line(e)}") from None
    try:
        try:
            rt_mod = sess.load_module(remote_name)
        except Exception as e:
            arch = info["arch"] or "unknown (the server does not say)"
            raise InputError(f"{bundle_dir}: the board behind {where} (arch {arch}) could not load {LIBRARY} built "
                             f"for {built_for}: {_first_line(e)}") from None
        try:
            vm = VirtualMachine(rt_mod, list(devs))
        except Exception as e:
            raise InputError(f"{bundle_dir}: the board behind {where} could not start the bundle's VM "
                             f"(TVM runtime version mismatch? the bundle needs TVM {manifest.get('tvm_version')}): "
                             f"{_first_line(e)}") from None

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
                               f"{_first_line(e)}") from None
        times_ms = [float(t) * 1e3 for t in res.results]
        lat = summarize(times_ms)

        try:
            per_op, per_op_note = per_op_remote(sess, rt_mod, devs, lib_path, manifest, runs)
        except Exception as e:  # never fake a breakdown
            per_op, per_op_note = [], f"per-op breakdown not available over RPC for this bundle: {_first_line(e)}"
        if per_op:
            per_op_note += f" (end-to-end median {lat['median_ms']:.3f} ms)"
        threads = _remote_threads(sess)
    finally:
        try:
            sess.remove(remote_name)
        except Exception:
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
        "remote": {"rpc": _fmt(ep.rpc) if ep.rpc else None, "tracker": _fmt(ep.tracker) if ep.tracker else None,
                   "key": ep.key, "timer": "board clock (VM time_evaluator)"},
    }
    return result
