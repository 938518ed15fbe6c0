"""Boards by name: the device config file ``bdp profile --device NAME`` and ``bdp devices`` use.

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
RPC handshake and, with a tracker, a free board. Imports neither TVM nor torch.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass

from bdp.errors import InputError, first_line

DEFAULT_TIMEOUT = 30.0


CONFIG_ENV = "BDP_DEVICES"


TIMEOUT_ENV = "BDP_RPC_TIMEOUT"


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
        why = first_line(e, None)
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
            return f"RPC server {fmt_address(self.rpc)}"
        return f"tracker {fmt_address(self.tracker)} key '{self.key}'"


def fmt_address(addr) -> str:
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
        return Endpoint(name or f"rpc:{fmt_address(addr)}", rpc=addr, timeout=timeout)
    if tracker:
        addr = parse_address(tracker, "--tracker")
        k = key or entry.get("key") or name
        if not k:
            raise InputError("--tracker needs --key KEY (the device key the board registered with)")
        return Endpoint(name or f"tracker:{fmt_address(addr)}/{k}", tracker=addr, key=k, timeout=timeout)
    if key and not entry.get("tracker"):
        raise InputError("--key goes with --tracker HOST:PORT")
    if entry.get("rpc"):
        return Endpoint(name, rpc=parse_address(entry["rpc"]), timeout=timeout)
    if entry.get("tracker"):
        return Endpoint(name, tracker=parse_address(entry["tracker"]), key=key or entry["key"], timeout=timeout)
    raise InputError(f"--device local is this host; name a board from {config_path()} or give --rpc / --tracker")
