"""``bdp devices``: the boards ``bdp profile --device NAME`` reaches over TVM RPC.

A click group with ``add``, ``list`` and ``remove``, kept in the device config file
(``~/.config/bdp/devices.json``; ``BDP_DEVICES`` overrides the path). Register it with
``main.add_command(devices)``. It imports neither TVM nor torch, and it does not import
``bdp.toolchain.cli`` (so there is no import cycle when cli.py registers it).
"""

from __future__ import annotations

import functools
import sys

import click

from bdp.errors import InputError, first_line


def _guarded(fn):
    """InputError -> exit 2 with one line; anything else -> exit 1 with one line (as cli.guarded)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            click.echo(f"bdp: error: {' '.join(str(e).splitlines())}", err=True)
            sys.exit(2)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except Exception as e:  # a fault of bdp itself
            import os

            if os.environ.get("BDP_DEBUG"):
                raise
            first = first_line(e, None, empty="")
            click.echo(f"bdp: error: internal error: {type(e).__name__}: {first[:300]} "
                       f"(set BDP_DEBUG=1 for the traceback)", err=True)
            sys.exit(1)

    return wrapper


@click.group("devices", context_settings={"help_option_names": ["-h", "--help"]})
def devices():
    """Boards for `bdp profile --device NAME` (TVM RPC servers or a tracker + key)."""


@devices.command("add")
@click.argument("name")
@click.option("--rpc", default=None, help="HOST:PORT of the TVM RPC server on the board")
@click.option("--tracker", default=None, help="HOST:PORT of a TVM RPC tracker")
@click.option("--key", default=None, help="device key at the tracker (default: NAME)")
@click.option("--timeout", type=float, default=None, help="seconds to wait for the board (default 30)")
@_guarded
def add_cmd(name, rpc, tracker, key, timeout):
    """Add (or replace) board NAME."""
    from .runtime.boards import add_device

    if timeout is not None and timeout <= 0:
        raise InputError("--timeout must be a positive number of seconds")
    path = add_device(name, rpc=rpc, tracker=tracker, key=key, timeout=timeout)
    where = f"RPC server {rpc}" if rpc else f"tracker {tracker} key '{key or name}'"
    click.echo(f"added {name}: {where} (in {path}); try `bdp profile BUNDLE --device {name}`")


@devices.command("list")
@_guarded
def list_cmd():
    """List the boards in the device config."""
    from .runtime.boards import config_path, list_devices

    path = config_path()
    data = list_devices(path)
    if not data:
        click.echo(f"no boards in {path}; add one with `bdp devices add NAME --rpc HOST:PORT`")
        return
    click.echo(f"{'name':<16} address")
    for name in sorted(data):
        e = data[name]
        if e.get("rpc"):
            where = f"rpc {e['rpc']}"
        elif e.get("tracker"):
            where = f"tracker {e['tracker']} key {e.get('key', name)}"
        else:
            where = "(no address)"
        if e.get("timeout"):
            where += f"  timeout {e['timeout']:g} s"
        click.echo(f"{name:<16} {where}")
    click.echo(f"({path})")


@devices.command("remove")
@click.argument("name")
@_guarded
def remove_cmd(name):
    """Remove board NAME."""
    from .runtime.boards import remove_device

    path = remove_device(name)
    click.echo(f"removed {name} from {path}")
