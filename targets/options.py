"""Compile options: the switches that change how bdp lowers and schedules a model, as one typed
object passed down from ``bdp compile`` (``--option KEY=VALUE``) to the schedules. Defaults are
what bdp ships; the others exist to compare, to debug, and to work around a schedule."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from bdp.errors import InputError


@dataclass(frozen=True)
class CompileOptions:
    float_schedule: bool = True  # bdp's float CPU schedules and epilogue fusion (False: TVM's default pipeline)
    pack_apart: bool = True  # a binary conv fed by a concatenation/resize packs in a function of its own
    bits_in_tile: bool = True  # packed-bit outputs straight from the accumulator registers
    binary_orient: str = "auto"  # binary conv register tile: "auto", "x" (columns) or "k" (channels)
    binary_word: str = "auto"  # bits per packed word of binary convs: "auto" (per target and layer) or 8/16/32/64
    stack_buffers: bool = True  # small per-tile buffers (register tiles) on the stack, not TVM workspace calls
    byte_counters: bool = True  # AVX2: popcounts added in byte lanes, widened every 31 steps (bdp.targets.byte_counters)
    fast_exp: bool = True  # vector polynomial exp/sigmoid instead of one expf call per lane
    schedule_debug: bool = False  # raise a float schedule's error instead of falling back to a simpler one

    _CHOICES = {"binary_orient": ("auto", "x", "k"), "binary_word": ("auto", "8", "16", "32", "64")}

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in ("bool", bool) and not isinstance(v, bool):
                raise InputError(f"compile option {f.name}={v!r}: expected true or false")
        for name, choices in self._CHOICES.items():
            v = getattr(self, name)
            if str(v) not in choices:
                raise InputError(f"compile option {name}={v!r}: expected one of {', '.join(choices)}")

    @classmethod
    def parse(cls, pairs) -> "CompileOptions":
        """From ``["key=value", ...]`` (the CLI's ``--option``); InputError for anything else."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kw = {}
        for item in pairs or ():
            key, sep, value = str(item).partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in fields:
                raise InputError(f"--option {item!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
            if fields[key].type in ("bool", bool):
                low = value.strip().lower()
                if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise InputError(f"--option {item!r}: expected true or false")
                kw[key] = low in ("1", "true", "yes", "on")
            else:
                kw[key] = value.strip()
        return cls(**kw)

    @classmethod
    def of(cls, value) -> "CompileOptions":
        """None (the defaults), a CompileOptions, or a dict of fields (the Python API)."""
        if value is None:
            return DEFAULT
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            names = {f.name for f in dataclasses.fields(cls)}
            bad = sorted(set(value) - names, key=str)
            if bad:
                raise InputError(f"unknown compile option {bad[0]!r}; choose from {', '.join(sorted(names))}")
            return cls(**value)
        raise InputError(f"compile options must be a dict or CompileOptions, not {type(value).__name__}")

    def changed(self) -> dict:
        """The options that differ from the defaults (recorded in the bundle's manifest)."""
        default = CompileOptions()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}


DEFAULT = CompileOptions()
