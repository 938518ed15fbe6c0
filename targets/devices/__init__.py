"""Device packaging: what makes a bundle run on its board without Python.

A target whose :class:`bdp.targets.spec.TargetSpec` names a ``device`` gets that device's files
added to its bundle at compile time, and ``bdp run`` on a host that cannot load the library
itself runs the bundle through the device's own runner (natively on such a board, under an
emulator elsewhere). Each device module provides::

    CROSS_CXX                      C++ compiler that links a library for the device
    APT_HINT                       how to install the tools it needs
    tools_available() -> (ok, why) can this host build (and emulate) for the device?
    add_device_files(bundle_dir)   runtime libraries, native runner, device README
    run_bundle(bundle_dir, x, output_names) -> {name: array}   run through the native runner

A new board (a RISC-V one, say) is one module here and one entry in :data:`DEVICES`.
"""

from __future__ import annotations

import importlib

DEVICES = {"aarch64": "bdp.targets.devices.aarch64"}


def get_device(name: str):
    """The device module NAME (a key of :data:`DEVICES`)."""
    return importlib.import_module(DEVICES[name])
