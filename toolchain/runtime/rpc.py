"""Connecting to a board over TVM RPC (directly or through a tracker), with timeouts and one-line
errors, and asking the remote side what it is."""

from __future__ import annotations

import json
import socket
import struct
import threading

from bdp.errors import InputError

from .boards import Endpoint, fmt_address

_RPC_TRACKER_MAGIC = 0x2F271


_TRACKER_SUMMARY = 6  # tvm.rpc.base.TrackerCode.SUMMARY


_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "aarch64_be": "aarch64"}


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
        raise InputError(f"cannot resolve the host of {what} {fmt_address(addr)} ({e.strerror or e})") from None
    except ConnectionRefusedError:
        hint = ("`python -m tvm.exec.rpc_server --host 0.0.0.0 --port PORT`" if "server" in what
                else "`python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port PORT`")
        raise InputError(f"cannot connect to {what} {fmt_address(addr)}: connection refused (is {hint} running there?)") from None
    except (socket.timeout, TimeoutError):
        raise InputError(f"cannot connect to {what} {fmt_address(addr)}: no answer within {timeout:g} s") from None
    except OSError as e:
        raise InputError(f"cannot connect to {what} {fmt_address(addr)}: {e.strerror or e}") from None


def first_line(e) -> str:
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
            raise InputError(f"{fmt_address(ep.tracker)} is not a TVM RPC tracker (wrong handshake)")
        msg = json.dumps([_TRACKER_SUMMARY]).encode()
        sock.sendall(struct.pack("<i", len(msg)) + msg)
        (size,) = struct.unpack("<i", _recv_exact(sock, 4))
        value = json.loads(_recv_exact(sock, size).decode())
        if not isinstance(value, list) or len(value) != 2 or value[0] != 0 or not isinstance(value[1], dict):
            raise InputError(f"the TVM RPC tracker at {fmt_address(ep.tracker)} gave an unexpected answer to a summary request")
        return value[1]
    except (socket.timeout, TimeoutError):
        raise InputError(f"the TVM RPC tracker at {fmt_address(ep.tracker)} did not answer within {ep.timeout:g} s") from None
    except (OSError, ValueError, struct.error) as e:
        raise InputError(f"{fmt_address(ep.tracker)} does not speak the TVM RPC tracker protocol ({e})") from None
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
        raise InputError(f"no board is registered under key '{ep.key}' at the tracker {fmt_address(ep.tracker)} "
                         f"(keys there: {', '.join(keys) or 'none'})")


def connect(ep: Endpoint):
    """Open an RPC session to the board (after ``preflight``); InputError naming the address on
    failure, including when the handshake or a free board takes longer than the timeout."""
    from tvm import rpc

    if ep.rpc:
        host, port = ep.rpc
        what = f"the TVM RPC server at {fmt_address(ep.rpc)}"
        try:
            return _run_with_timeout(lambda: rpc.connect(host, port), ep.timeout,
                                     f"{what} did not complete the RPC handshake within {ep.timeout:g} s "
                                     f"(busy with another session, or not a TVM RPC server)")
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"cannot open an RPC session with {what}: {first_line(e)}") from None

    def request():
        tr = rpc.connect_tracker(*ep.tracker)
        try:
            return tr.request(ep.key, priority=1, session_timeout=0, max_retry=1)
        finally:
            tr.close()

    try:
        return _run_with_timeout(request, ep.timeout,
                                 f"the TVM RPC tracker at {fmt_address(ep.tracker)} gave no free board with key '{ep.key}' "
                                 f"within {ep.timeout:g} s (all busy?)")
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"cannot get a board with key '{ep.key}' from the tracker {fmt_address(ep.tracker)}: "
                         f"{first_line(e)}") from None


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
        except (RuntimeError, ValueError, AttributeError):  # a runtime-only server (e.g. the C++ tvm_rpc)
            pass  # has no LLVM helpers: the field stays None, and the caller says what it could not check
    info["arch"] = _norm_arch(info["triple"])
    info["threads"] = remote_threads(sess)
    return info


def remote_threads(sess):
    try:
        return int(sess.get_function("runtime.NumThreads")())
    except (RuntimeError, ValueError, AttributeError, TypeError):  # not told: the result says None
        return None


def needed_host_arch(manifest) -> str | None:
    """The machine a board must be to load the bundle's library (its target spec's
    ``library_arch``; for a target unknown here, the manifest's ``arch``)."""
    from bdp.targets.spec import spec_of_manifest

    target = manifest.get("target", {})
    spec = spec_of_manifest(target)
    return _norm_arch(spec.library_arch if spec is not None else target.get("arch"))
