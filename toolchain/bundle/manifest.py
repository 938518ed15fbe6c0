"""The bundle manifest (``manifest.json``): one dataclass, one reader, one writer, one schema.

``manifest.json`` is the one file of a bundle that its sha256 list cannot cover (it holds the
list), so everything read from it is checked here before any other code sees it: types, ranges,
nesting depth, required keys, dtypes from a fixed list, shapes as lists of positive integers,
file and output names that are safe as file names. A fault is an :class:`InputError` naming
the key (exit code 2), never a ``KeyError`` or ``TypeError`` deeper down.

Use::

    man = Manifest.read(bundle_dir)           # parse + schema check (no hashes: see bundle.py)
    man.input.shape, man.outputs[0].name, man.target.arch, man.files["model.so"].sha256
    man.to_dict() / Manifest.from_dict(d)     # plain JSON-able dicts
    man.write(bundle_dir)                     # the bytes a signature covers

For code written against the older dict manifests, ``man["input"]["shape"]`` and
``man.get("verify")`` still read (from :meth:`to_dict`), read-only.

Keys ``bin/bdp-run`` (``targets/devices/runtime/bdp_run.cc``) reads: ``outputs[i].name`` and
``input.shape`` (``tests/test_hostile_manifest.py`` pins them).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

from bdp.errors import InputError
from bdp.targets.spec import arches

FORMAT = "bdp-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20
MAX_DEPTH = 12           # nesting of objects and lists, the whole document
MAX_RANK = 8
MAX_ELEMENTS = 1 << 31   # of one tensor (a 8 GiB float32 tensor is no bundle input)
MAX_OUTPUTS = 256
MAX_FILES = 10_000
DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")
TASKS = ("semseg", "depth", "normals", "edges", "unknown")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")
_OUTPUT_NAME = re.compile(r"[^/\\\x00-\x1f\x7f]{1,128}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return d


def _fail(where, what):
    raise InputError(f"{where}: manifest {what}")


def _depth(obj) -> int:
    """Nesting depth of a JSON value, without recursion."""
    best, todo = 0, [(obj, 1)]
    while todo:
        o, d = todo.pop()
        if isinstance(o, (dict, list)):
            best = max(best, d)
            if d > MAX_DEPTH:
                return d
            todo.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return best


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _text(where, key, v, limit=256, optional=False):
    if v is None and optional:
        return None
    if not isinstance(v, str) or len(v) > limit or any(ord(c) < 32 for c in v):
        _fail(where, f"'{key}' must be a string of at most {limit} printable characters, got {_show(v)}")
    return v


def _show(v):
    s = json.dumps(v) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def safe_name(where, key, name):
    """A name that is used as a file name (an output's ``<name>.npy``, ``<name>.png``)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
        _fail(where, f"'{key}' {_show(name)} is not a safe file name (letters, digits, _ . + -; at most 128)")
    return name


def safe_output_name(where, key, name):
    """An output name: also a file name (``<name>.npy`` of bin/bdp-run, ``<name>.png`` of --viz),
    so no '/', '\\', control characters, '.' or '..', at most 128 characters."""
    if not isinstance(name, str) or not _OUTPUT_NAME.fullmatch(name) or name in (".", ".."):
        _fail(where, f"'{key}' {_show(name)} cannot be used as a file name (no / or \\, not . or .., at most 128)")
    return name


def safe_relpath(where, key, rel):
    """A relative path inside the bundle: '/'-separated safe names, no '..', not absolute."""
    if not isinstance(rel, str) or not rel or len(rel) > 512:
        _fail(where, f"'{key}' names an unsafe path {_show(rel)}")
    parts = rel.split("/")
    if rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
        _fail(where, f"'{key}' names a path outside the bundle {_show(rel)}")
    for p in parts:
        safe_name(where, key, p)
    return rel


def _shape(where, key, v):
    if not isinstance(v, list) or len(v) > MAX_RANK or not all(_is_int(d) and d >= 1 for d in v):
        _fail(where, f"'{key}' must be a list of at most {MAX_RANK} positive integers, got {_show(v)}")
    n = 1
    for d in v:
        n *= d
    if n > MAX_ELEMENTS:
        _fail(where, f"'{key}' {_show(v)} has {n:,} elements (more than {MAX_ELEMENTS:,})")
    return list(v)


def _dtype(where, key, v):
    if v not in DTYPES:
        _fail(where, f"'{key}' {_show(v)} is not one of {', '.join(DTYPES)}")
    return v


def _obj(where, key, v, optional=False):
    if v is None and optional:
        return None
    if not isinstance(v, dict):
        _fail(where, f"'{key}' must be an object, got {_show(v)}")
    return v


class _DictRead:
    """``spec["key"]`` and ``spec.get("key")`` read the dict form (for code written against dicts)."""

    def __getitem__(self, key):
        d = self.to_dict()
        if key not in d:
            raise KeyError(key)
        return d[key]

    def get(self, key, default=None):
        return self.to_dict().get(key, default)

    def __contains__(self, key):
        return key in self.to_dict()


@dataclass
class Target(_DictRead):
    name: str
    arch: str
    tvm: dict = field(default_factory=dict)
    description: str = ""
    popcount: str | None = None
    run_on_hardware: bool = False
    note: str | None = None

    @classmethod
    def from_dict(cls, d, where="manifest"):
        d = _obj(where, "target", d)
        arch = d.get("arch")
        if arch not in arches():
            _fail(where, f"'target.arch' {_show(arch)} is not one of {', '.join(arches())}")
        roh = d.get("run_on_hardware", False)
        if not isinstance(roh, bool):
            _fail(where, f"'target.run_on_hardware' must be true or false, got {_show(roh)}")
        return cls(name=_text(where, "target.name", d.get("name"), 64), arch=arch,
                   tvm=_obj(where, "target.tvm", d.get("tvm", {})),
                   description=_text(where, "target.description", d.get("description", ""), 1024),
                   popcount=_text(where, "target.popcount", d.get("popcount"), 64, optional=True),
                   run_on_hardware=roh, note=_text(where, "target.note", d.get("note"), 1024, optional=True))

    def to_dict(self):
        d = {"name": self.name, "arch": self.arch, "tvm": self.tvm, "description": self.description,
             "popcount": self.popcount, "run_on_hardware": self.run_on_hardware}
        if self.note:
            d["note"] = self.note
        return d


def _preprocess(where, d):
    if d is None:
        return None
    d = _obj(where, "input.preprocess", d)
    out = dict(d)
    for k in ("kind", "layout", "channels"):
        if k in d:
            _text(where, f"input.preprocess.{k}", d[k], 32)
    if "resize" in d:
        _shape(where, "input.preprocess.resize", d["resize"])
        if len(d["resize"]) != 2:
            _fail(where, "'input.preprocess.resize' must be [H, W]")
    if "scale" in d and not _is_num(d["scale"]):
        _fail(where, f"'input.preprocess.scale' must be a finite number, got {_show(d['scale'])}")
    for k in ("mean", "std"):
        if k in d:
            v = d[k]
            if not isinstance(v, list) or not 1 <= len(v) <= 16 or not all(_is_num(x) for x in v):
                _fail(where, f"'input.preprocess.{k}' must be a list of finite numbers, got {_show(v)}")
    if "std" in d and any(x == 0 for x in d["std"]):
        _fail(where, "'input.preprocess.std' has a zero")
    return out


@dataclass
class InputSpec(_DictRead):
    name: str
    shape: list
    dtype: str = "float32"
    preprocess: dict | None = None

    @classmethod
    def from_dict(cls, d, where="manifest"):
        d = _obj(where, "input", d)
        return cls(name=_text(where, "input.name", d.get("name"), 256), shape=_shape(where, "input.shape", d.get("shape")),
                   dtype=_dtype(where, "input.dtype", d.get("dtype")), preprocess=_preprocess(where, d.get("preprocess")))

    def to_dict(self):
        d = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.preprocess is not None:
            d["preprocess"] = self.preprocess
        return d


@dataclass
class OutputSpec(_DictRead):
    name: str
    shape: list
    dtype: str = "float32"
    task: str = "unknown"
    classes: list | None = None  # semseg: the class names (for the pictures' legend)

    @classmethod
    def from_dict(cls, d, where="manifest", i=0):
        d = _obj(where, f"outputs[{i}]", d)
        task = d.get("task", "unknown")
        if task not in TASKS:
            _fail(where, f"'outputs[{i}].task' {_show(task)} is not one of {', '.join(TASKS)}")
        classes = d.get("classes")
        if classes is not None and (not isinstance(classes, list) or len(classes) > 4096
                                    or not all(isinstance(c, str) and len(c) <= 128 for c in classes)):
            _fail(where, f"'outputs[{i}].classes' must be a list of class names, got {_show(classes)}")
        return cls(name=safe_output_name(where, f"outputs[{i}].name", d.get("name")),
                   shape=_shape(where, f"outputs[{i}].shape", d.get("shape")),
                   dtype=_dtype(where, f"outputs[{i}].dtype", d.get("dtype", "float32")), task=task, classes=classes)

    def to_dict(self):
        d = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "task": self.task}
        if self.classes is not None:
            d["classes"] = list(self.classes)
        return d


@dataclass
class FileEntry(_DictRead):
    sha256: str
    bytes: int

    @classmethod
    def from_dict(cls, d, where="manifest", rel=""):
        d = _obj(where, f"files[{rel}]", d)
        sha, n = d.get("sha256"), d.get("bytes")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            _fail(where, f"'files[{rel}].sha256' is not a sha256 (64 lowercase hex digits)")
        if not _is_int(n) or n < 0:
            _fail(where, f"'files[{rel}].bytes' must be a non-negative integer, got {_show(n)}")
        return cls(sha, n)

    def to_dict(self):
        return {"sha256": self.sha256, "bytes": self.bytes}


_KNOWN = ("format", "format_version", "bdp_version", "tvm_version", "target", "source", "input", "outputs",
          "stats", "library", "files", "compile_seconds", "options", "verify")


@dataclass
class Manifest(_DictRead):
    """A bundle's manifest. ``extra`` keeps keys this bdp does not know (same format version)."""

    target: Target
    input: InputSpec
    outputs: list
    files: dict = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    bdp_version: str = ""
    tvm_version: str = ""
    library: str = "model.so"
    source: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    compile_seconds: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)  # compile options that differ from the defaults
    verify: dict | None = None
    extra: dict = field(default_factory=dict)

    # ---- schema

    @classmethod
    def from_dict(cls, d, where="manifest") -> "Manifest":
        """Check D against the schema (InputError naming WHERE and the key) and build it."""
        if not isinstance(d, dict):
            _fail(where, "is not a JSON object")
        if _depth(d) > MAX_DEPTH:
            _fail(where, f"is nested more than {MAX_DEPTH} levels deep")
        fmt = d.get("format", FORMAT)
        if fmt != FORMAT:
            _fail(where, f"'format' is {_show(fmt)}, not {FORMAT!r}: not a bdp bundle")
        fv = d.get("format_version")
        if not _is_int(fv) or fv < 1:
            _fail(where, f"'format_version' must be a positive integer, got {_show(fv)}")
        if fv > FORMAT_VERSION:
            raise InputError(f"{where}: bundle format {fv} is newer than this bdp reads ({FORMAT_VERSION}); upgrade bdp")
        for key in ("target", "input", "outputs", "files"):
            if key not in d:
                _fail(where, f"has no '{key}'")
        outs = d["outputs"]
        if not isinstance(outs, list) or not 1 <= len(outs) <= MAX_OUTPUTS:
            _fail(where, f"'outputs' must be a list of 1 to {MAX_OUTPUTS} outputs, got {_show(outs)}")
        outputs = [OutputSpec.from_dict(o, where, i) for i, o in enumerate(outs)]
        names = [o.name for o in outputs]
        if len(set(names)) != len(names):
            _fail(where, "lists an output name twice")
        files = _obj(where, "files", d["files"])
        if len(files) > MAX_FILES:
            _fail(where, f"lists more than {MAX_FILES} files")
        entries = {safe_relpath(where, "files", rel): FileEntry.from_dict(v, where, rel) for rel, v in files.items()}
        if MANIFEST in entries:
            _fail(where, f"lists {MANIFEST} among its own files")
        library = safe_relpath(where, "library", d.get("library", "model.so"))
        if library not in entries:
            _fail(where, f"lists no {library}")
        verify = _obj(where, "verify", d.get("verify"), optional=True)
        cs = _obj(where, "compile_seconds", d.get("compile_seconds", {}))
        if not all(_is_num(v) for v in cs.values()):
            _fail(where, "'compile_seconds' must map stages to numbers")
        stats = _obj(where, "stats", d.get("stats", {}))
        for k in ("binary_convs", "fp_convs", "weights_bytes", "source_weights_bytes", "left_float"):
            if k in stats and (not _is_int(stats[k]) or stats[k] < 0):
                _fail(where, f"'stats.{k}' must be a non-negative integer, got {_show(stats[k])}")
        return cls(target=Target.from_dict(d["target"], where), input=InputSpec.from_dict(d["input"], where),
                   outputs=outputs, files=entries, format=FORMAT, format_version=fv,
                   bdp_version=_text(where, "bdp_version", d.get("bdp_version", ""), 64),
                   tvm_version=_text(where, "tvm_version", d.get("tvm_version", ""), 64), library=library,
                   source=_obj(where, "source", d.get("source", {})), stats=stats, compile_seconds=cs,
                   options=_obj(where, "options", d.get("options", {})),
                   verify=verify, extra={k: v for k, v in d.items() if k not in _KNOWN})

    def to_dict(self) -> dict:
        d = {"format": self.format, "format_version": self.format_version, "bdp_version": self.bdp_version,
             "tvm_version": self.tvm_version, "target": self.target.to_dict(), "source": self.source,
             "input": self.input.to_dict(), "outputs": [o.to_dict() for o in self.outputs], "stats": self.stats,
             "library": self.library, "compile_seconds": self.compile_seconds}
        if self.options:
            d["options"] = self.options
        if self.verify is not None:
            d["verify"] = self.verify
        d.update(self.extra)
        d["files"] = {k: v.to_dict() for k, v in sorted(self.files.items())}
        return d

    @property
    def output_names(self):
        return [o.name for o in self.outputs]

    # ---- one reader, one writer

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2) + "\n").encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes, where="manifest") -> "Manifest":
        if len(data) > MAX_MANIFEST_BYTES:
            _fail(where, f"is larger than {MAX_MANIFEST_BYTES // 1024} KiB")
        try:
            d = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
        except _DuplicateKey as e:
            _fail(where, f"has the key {_show(e.args[0])} twice in one object (which one counts is ambiguous)")
        except (ValueError, UnicodeDecodeError):
            raise InputError(f"{where}: corrupt manifest (not valid JSON)") from None
        except RecursionError:
            _fail(where, f"is nested more than {MAX_DEPTH} levels deep")
        return cls.from_dict(d, where)

    @classmethod
    def read(cls, bundle_dir) -> "Manifest":
        """Read and schema-check BUNDLE_DIR/manifest.json (the bytes as well: ``read_bytes``)."""
        return cls.from_bytes(read_bytes(bundle_dir), os.path.join(str(bundle_dir), MANIFEST))

    def write(self, bundle_dir) -> bytes:
        """Write BUNDLE_DIR/manifest.json; returns the bytes written (what a signature covers)."""
        data = self.to_bytes()
        with open(os.path.join(str(bundle_dir), MANIFEST), "wb") as f:
            f.write(data)
        return data


def read_bytes(bundle_dir) -> bytes:
    """The bytes of BUNDLE_DIR/manifest.json (at most MAX_MANIFEST_BYTES + 1); InputError when the
    folder or the file is missing or unreadable."""
    bundle_dir = str(bundle_dir)
    if not os.path.isdir(bundle_dir):
        if os.path.exists(bundle_dir):
            raise InputError(f"{bundle_dir}: is a file, not a bundle folder (a bundle is the folder bdp compile "
                             "wrote, holding manifest.json)")
        raise InputError(f"{bundle_dir}: no such bundle folder")
    mpath = os.path.join(bundle_dir, MANIFEST)
    if not os.path.isfile(mpath):
        raise InputError(f"{bundle_dir}: not a bdp bundle (no {MANIFEST})")
    try:
        with open(mpath, "rb") as f:
            return f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise InputError(f"{mpath}: cannot read ({e.strerror})") from None
