"""Loading ``torch.export`` programs (``.pt2``) without running code from the file.

``torch.export.load`` is not safe on an untrusted file (its own docstring says so):

* a payload whose safe load (``weights_only=True``) fails is loaded again with
  ``weights_only=False`` (sample inputs), and weights or constants marked ``use_pickle`` are
  loaded that way from the start: any pickle runs;
* custom and opaque objects are unpickled (``torch._C._pickle_load_obj``, ``pickle.loads``);
* every symbolic size in the program's JSON (``expr_str``) goes through ``sympy.sympify``,
  which evaluates the string as Python;
* ``guards_code`` strings are compiled with ``exec`` when the program is turned into a module;
* node targets are looked up by name under ``torch``, ``operator`` and ``math`` and called when
  the graph is traced (``torch.os.system`` is such a name);
* AOTInductor members are shared libraries that get loaded.

So bdp inspects the archive before torch sees it and refuses anything outside what
``torch.export.save`` writes for a plain tensor program:

* the zip's directory must read the same through Python's ``zipfile`` and torch's own reader
  (no duplicate or hidden members), within :data:`MAX_ARCHIVE_BYTES` uncompressed;
* members only from a fixed list (program JSON, weight / constant configs and raw tensor
  records, sample inputs, format files); no pickled weights or constants, no custom objects,
  no AOTInductor, ExecuTorch or legacy members;
* every symbolic expression is plain arithmetic of symbols and integers, checked on its Python
  syntax tree (calls only to sympy's arithmetic classes, ``Symbol('s0', ...)`` with literal
  arguments); every guard likewise (sizes of named inputs, arithmetic, comparisons);
* every node calls an ATen operator (not ``from_file`` or ``_print``) or one of Python's
  arithmetic / ``getitem`` operators; no sub-graphs, operators as arguments, custom objects or
  named-tuple types;
* the sample inputs must load with ``weights_only=True``; they are saved again by bdp, so torch
  only ever reads bytes bdp wrote for them.

The archive torch finally reads is a new one written by bdp from the checked records (nothing
the inspection did not see reaches torch). ``trust=True`` (``bdp compile --trust-model``) skips
all this and calls ``torch.export.load``: only for files the user trusts.
"""

from __future__ import annotations

import ast
import io
import json
import logging
import re
import warnings
import zipfile

from bdp.errors import InputError

MAX_ARCHIVE_BYTES = 1 << 30  # uncompressed, all members
MAX_RECORDS = 100_000
MAX_EXPR_CHARS = 20_000

_REFUSE_HINT = "bdp does not run code from model files; pass --trust-model only if you trust this file"

_ALLOWED_RECORDS = [re.compile(p) for p in (
    r"archive_format", r"archive_version", r"byteorder", r"\.data/version", r"\.data/serialization_id",
    r"models/model\.json", r"data/weights/model_weights_config\.json", r"data/weights/weight_[0-9]{1,9}",
    r"data/constants/model_constants_config\.json", r"data/constants/tensor_[0-9]{1,9}",
    r"data/sample_inputs/model\.pt",
)]

# Python-level callables a program may name besides ATen operators (sym-int arithmetic)
_PY_TARGETS = {f"_operator.{n}" for n in (
    "getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pos", "pow", "eq", "ne", "lt", "le",
    "gt", "ge", "and_", "or_", "not_", "abs")} | {f"torch.{n}" for n in (
    "sym_max", "sym_min", "sym_not", "sym_float", "sym_int", "sym_ite", "sym_sqrt", "sym_sum")} | {
    "math.ceil", "math.floor", "math.trunc", "math.sqrt"}
_DENIED_ATEN = {"from_file", "_print"}
_FORBIDDEN_KEYS = {"as_custom_obj", "as_graph", "as_operator", "custom_obj"}

# sympy classes a symbolic size may be made of (what torch's serializer writes with srepr)
_SYMPY_CALLS = {"Add", "Mul", "Pow", "Integer", "Rational", "Symbol", "Max", "Min", "Abs", "Mod", "Eq", "Ne",
                "Lt", "Le", "Gt", "Ge", "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan",
                "Equality", "Unequality", "And", "Or", "Not", "FloorDiv", "CeilDiv", "CleanDiv", "PythonMod",
                "ModularIndexing", "CeilToInt", "FloorToInt", "TruncToInt", "IntTrueDiv", "FloatTrueDiv",
                "PowByNatural", "IsNonOverlappingAndDenseIndicator", "Identity", "Where", "LShift", "RShift",
                "Float", "ToFloat", "BooleanTrue", "BooleanFalse"}
_SYMPY_NAMES = {"true", "false", "oo", "zoo", "nan", "int_oo", "true_", "false_"}
_SYMBOL_KWARGS = {"integer", "positive", "nonnegative", "real", "finite", "negative", "nonpositive", "zero",
                  "nonzero", "even", "odd", "rational", "extended_real"}
_SYMBOL_NAME = re.compile(r"[a-z][0-9]{1,9}")
_EXPR_CHARS = re.compile(r"[A-Za-z0-9_ (),'=+\-*/.<>!&|~]*")
_GUARD_CHARS = re.compile(r"[A-Za-z0-9_ ()\[\]',+\-*/%<>=!&|.]*")
_GUARD_CALLS = {"Max", "Min", "Abs", "abs", "min", "max"}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")


class _Refused(Exception):
    """A reason to refuse the archive (becomes an InputError naming the file)."""


# ------------------------------------------------------------------------------------ expressions

def _int_literal(node) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        node = node.operand
    return (isinstance(node, ast.Constant) and type(node.value) is int and abs(node.value) < 1 << 64)


def _check_sympy_node(node):
    if isinstance(node, ast.Expression):
        return _check_sympy_node(node.body)
    if _int_literal(node):
        return
    if isinstance(node, ast.Constant) and type(node.value) in (float, bool):
        return
    if isinstance(node, ast.Name):
        if node.id in _SYMPY_NAMES or _SYMBOL_NAME.fullmatch(node.id):
            return
        raise _Refused(f"names '{node.id}'")
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod,
                                                             ast.Div)):
        _check_sympy_node(node.left)
        _check_sympy_node(node.right)
        return
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return _check_sympy_node(node.operand)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS:
        fn = node.func.id
        if fn == "Symbol":
            if (len(node.args) != 1 or not isinstance(node.args[0], ast.Constant)
                    or not isinstance(node.args[0].value, str) or not _SYMBOL_NAME.fullmatch(node.args[0].value)):
                raise _Refused("has a Symbol(...) that is not a plain size symbol")
            for kw in node.keywords:
                if kw.arg not in _SYMBOL_KWARGS or not (isinstance(kw.value, ast.Constant)
                                                        and type(kw.value.value) is bool):
                    raise _Refused(f"has a Symbol(...) with an unexpected argument '{kw.arg}'")
            return
        if fn in ("Integer", "Rational", "Float"):
            if node.keywords or not all(_int_literal(a) or (isinstance(a, ast.Constant)
                                                            and type(a.value) is float) for a in node.args):
                raise _Refused(f"has {fn}(...) of something other than a number")
            return
        if node.keywords:
            raise _Refused(f"passes keywords to {fn}(...)")
        for a in node.args:
            _check_sympy_node(a)
        return
    raise _Refused(f"contains Python syntax '{type(node).__name__}'")


def check_sym_expr(text):
    """Refuse a symbolic size that is not plain arithmetic of symbols and integers (as sympy's
    ``srepr`` writes it, or infix). ``sympy.sympify`` evaluates the string as Python, so the
    check is on its syntax tree: only sympy's arithmetic classes are called, only size symbols
    and literal numbers appear."""
    if not isinstance(text, str) or not text or len(text) > MAX_EXPR_CHARS or not _EXPR_CHARS.fullmatch(text):
        raise _Refused(f"symbolic size {str(text)[:60]!r} is not plain arithmetic")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise _Refused(f"symbolic size {text[:60]!r} is not plain arithmetic") from None
    try:
        _check_sympy_node(tree)
    except _Refused as e:
        raise _Refused(f"symbolic size {text[:60]!r} is not plain arithmetic ({e})") from None
    except RecursionError:
        raise _Refused(f"symbolic size {text[:60]!r} is nested too deeply") from None


def _check_guard_node(node):
    if isinstance(node, ast.Expression):
        return _check_guard_node(node.body)
    if _int_literal(node) or (isinstance(node, ast.Constant) and type(node.value) is bool):
        return
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod)):
        _check_guard_node(node.left)
        _check_guard_node(node.right)
        return
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
        return _check_guard_node(node.operand)
    if isinstance(node, ast.BoolOp):
        for v in node.values:
            _check_guard_node(v)
        return
    if isinstance(node, ast.Compare):
        _check_guard_node(node.left)
        for op, c in zip(node.ops, node.comparators):
            if not isinstance(op, (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)):
                raise _Refused(f"compares with {type(op).__name__}")
            _check_guard_node(c)
        return
    # L['x'].size()[2], L['x'].stride()[0], L['x'].storage_offset()
    if isinstance(node, ast.Subscript) and _int_literal(node.slice):
        node = node.value
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("size", "stride"):
            return _check_input_ref(node)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "storage_offset"):
        return _check_input_ref(node)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _GUARD_CALLS:
        if node.keywords:
            raise _Refused("passes keywords")
        for a in node.args:
            _check_guard_node(a)
        return
    raise _Refused(f"contains Python syntax '{type(node).__name__}'")


def _check_input_ref(call):
    """``L['name'].size()``: a size of a named program input, nothing else."""
    if call.args or call.keywords:
        raise _Refused("calls a size method with arguments")
    ref = call.func.value
    if not (isinstance(ref, ast.Subscript) and isinstance(ref.value, ast.Name) and ref.value.id == "L"
            and isinstance(ref.slice, ast.Constant) and isinstance(ref.slice.value, str)
            and _IDENT.fullmatch(ref.slice.value)):
        raise _Refused("reads something other than an input's size")


def check_guard(text):
    """Refuse a guard (``ExportedProgram.guards_code``, run with ``exec`` by torch) that is not
    a comparison of input sizes and integers."""
    if not isinstance(text, str) or len(text) > MAX_EXPR_CHARS or not _GUARD_CHARS.fullmatch(text):
        raise _Refused(f"guard {str(text)[:60]!r} is not plain arithmetic on input sizes")
    try:
        _check_guard_node(ast.parse(text, mode="eval"))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise _Refused(f"guard {text[:60]!r} is not plain arithmetic on input sizes") from None
    except _Refused as e:
        raise _Refused(f"guard {text[:60]!r} is not plain arithmetic on input sizes ({e})") from None


def check_target(target, node_name="?"):
    """Refuse a node that calls anything but an ATen operator or Python's arithmetic."""
    if not isinstance(target, str):
        raise _Refused(f"node '{node_name}' has no target name")
    if target in _PY_TARGETS:
        return
    parts = target.split(".")
    if (len(parts) == 5 and parts[:3] == ["torch", "ops", "aten"] and all(_IDENT.fullmatch(p) for p in parts[3:])
            and not any(p.startswith("__") for p in parts[3:]) and parts[3] not in _DENIED_ATEN):
        import torch

        packet = getattr(torch.ops.aten, parts[3], None)
        op = getattr(packet, parts[4], None) if packet is not None else None
        if isinstance(op, torch._ops.OpOverload) and op.namespace == "aten":
            return
    raise _Refused(f"node '{str(node_name)[:60]}' calls '{target[:80]}', which is not an ATen operator")


# ------------------------------------------------------------------------------------ archive

def _walk_program(obj, depth=0):
    """Check every symbolic expression, node target and argument kind in the program JSON."""
    if depth > 200:
        raise _Refused("program JSON is nested too deeply")
    if isinstance(obj, dict):
        bad = _FORBIDDEN_KEYS.intersection(obj)
        if bad:
            raise _Refused(f"program uses {sorted(bad)[0]} (custom objects, sub-graphs or operator arguments)")
        if "expr_str" in obj:
            check_sym_expr(obj["expr_str"])
        if "target" in obj and "inputs" in obj and "outputs" in obj:
            check_target(obj["target"], obj.get("name"))
        for v in obj.values():
            _walk_program(v, depth + 1)
    elif isinstance(obj, list):
        for v in obj:
            _walk_program(v, depth + 1)


def _check_program(prog):
    if not isinstance(prog, dict) or not isinstance(prog.get("graph_module"), dict):
        raise _Refused("models/model.json is not a torch.export program")
    gm = prog["graph_module"]
    if gm.get("treespec_namedtuple_fields"):
        raise _Refused("program defines named-tuple types")
    graph = gm.get("graph") if isinstance(gm.get("graph"), dict) else {}
    if graph.get("custom_obj_values"):
        raise _Refused("program holds custom objects")
    guards = prog.get("guards_code") or []
    if not isinstance(guards, list):
        raise _Refused("guards_code is not a list")
    for g in guards:
        check_guard(g)
    for k in (prog.get("range_constraints") or {}):
        if not _SYMBOL_NAME.fullmatch(str(k)):
            check_sym_expr(k)
    _walk_program(prog)


def _check_payload_config(cfg, kind, records):
    """Weights / constants: raw tensor records only (``use_pickle`` loads with weights_only=False)."""
    if not isinstance(cfg, dict) or not isinstance(cfg.get("config"), dict):
        raise _Refused(f"{kind} config is not a mapping")
    prefix = "data/weights/" if kind == "weights" else "data/constants/"
    for fqn, meta in cfg["config"].items():
        if not isinstance(meta, dict):
            raise _Refused(f"{kind} entry '{str(fqn)[:60]}' is not a mapping")
        if meta.get("use_pickle") is not False:
            raise _Refused(f"{kind} entry '{str(fqn)[:60]}' is a pickle")
        path = meta.get("path_name")
        if not isinstance(path, str) or prefix + path not in records:
            raise _Refused(f"{kind} entry '{str(fqn)[:60]}' names no record in the archive")
        tm = meta.get("tensor_meta")
        if not isinstance(tm, dict):
            raise _Refused(f"{kind} entry '{str(fqn)[:60]}' has no tensor description")
        numel = 1
        for d in tm.get("sizes") or []:
            v = d.get("as_int") if isinstance(d, dict) else None
            if type(v) is not int or v < 0:
                raise _Refused(f"{kind} entry '{str(fqn)[:60]}' has a size that is not a plain integer")
            numel *= v
        if numel * 8 > MAX_ARCHIVE_BYTES:
            raise _Refused(f"{kind} entry '{str(fqn)[:60]}' would take {numel * 8 / 2**30:.1f} GiB")
        _walk_program(meta)


def _json_record(reader, name):
    try:
        return json.loads(reader.get_record(name).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise _Refused(f"{name} is not valid JSON") from None
    except RecursionError:
        raise _Refused(f"{name} is nested too deeply") from None


def _zip_names(data):
    """Member names (without the archive's root folder) as Python's zipfile reads them."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError):
        raise _Refused("not a zip archive (truncated or corrupt?)") from None
    if not infos:
        raise _Refused("empty archive")
    if len(infos) > MAX_RECORDS:
        raise _Refused(f"{len(infos)} members (more than {MAX_RECORDS})")
    total = sum(i.file_size for i in infos)
    if total > MAX_ARCHIVE_BYTES:
        raise _Refused(f"unpacks to {total / 2**30:.1f} GiB (more than {MAX_ARCHIVE_BYTES / 2**30:.0f} GiB)")
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        raise _Refused("the archive lists a member twice")
    root = names[0].split("/", 1)[0]
    if not root or any(not n.startswith(root + "/") for n in names):
        raise _Refused("members are not all in one top folder")
    return {n[len(root) + 1:] for n in names}


def sanitize(data: bytes) -> bytes:
    """The archive DATA, checked (see the module docstring) and written again by bdp; raises
    _Refused with the reason."""
    import torch

    names = _zip_names(data)
    try:
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))
        records = set(reader.get_all_records())
    except RuntimeError:
        raise _Refused("torch cannot read the archive (truncated or corrupt?)") from None
    if records != names:
        raise _Refused("torch's zip reader and Python's see different members")
    for r in sorted(records):
        if not any(p.fullmatch(r) for p in _ALLOWED_RECORDS):
            raise _Refused(f"unexpected member '{r[:80]}' (only plain tensor programs are loaded)")
    for need in ("archive_format", "models/model.json", "data/weights/model_weights_config.json",
                 "data/constants/model_constants_config.json", "data/sample_inputs/model.pt"):
        if need not in records:
            raise _Refused(f"no {need} (not written by torch.export.save of this torch version?)")
    if reader.get_record("archive_format") != b"pt2":
        raise _Refused("archive_format is not 'pt2'")
    if "archive_version" in records and reader.get_record("archive_version") != b"0":
        raise _Refused("unsupported archive_version")
    if "byteorder" in records and reader.get_record("byteorder") not in (b"little", b"big"):
        raise _Refused("byteorder is neither little nor big")
    _check_program(_json_record(reader, "models/model.json"))
    wrecords = {r for r in records if r.startswith("data/weights/weight_")}
    crecords = {r for r in records if r.startswith("data/constants/tensor_")}
    _check_payload_config(_json_record(reader, "data/weights/model_weights_config.json"), "weights", wrecords)
    _check_payload_config(_json_record(reader, "data/constants/model_constants_config.json"), "constants", crecords)
    sample = _safe_sample_inputs(reader.get_record("data/sample_inputs/model.pt"))

    out = io.BytesIO()
    from torch.export.pt2_archive._package import PT2ArchiveWriter

    with PT2ArchiveWriter(out) as w:
        for r in sorted(records):
            if r.startswith(".data/"):
                continue  # the writer makes its own
            w.write_bytes(r, sample if r == "data/sample_inputs/model.pt" else reader.get_record(r))
    return out.getvalue()


def _safe_sample_inputs(blob: bytes) -> bytes:
    """Sample inputs loaded with weights_only=True (torch would retry with weights_only=False)
    and saved again: torch then reads bytes bdp wrote."""
    import torch

    if not blob:
        return blob
    try:
        obj = torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")
    except Exception as e:  # the weights-only unpickler raises several kinds on a refused pickle
        first = str(e).strip().splitlines()
        why = next((ln for ln in first if "GLOBAL" in ln), first[0] if first else type(e).__name__)
        raise _Refused(f"sample inputs are not plain tensors ({why.strip()[:120]})") from None
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ------------------------------------------------------------------------------------ loading

class _quiet_torch_logs:
    """torch.export logs tracebacks at WARNING when a load fails; bdp reports one line."""

    _names = ("torch.export", "torch._export", "torch._export.serde.serialize", "torch.export.pt2_archive")

    def __enter__(self):
        self._levels = [(logging.getLogger(n), logging.getLogger(n).level) for n in self._names]
        for lg, _ in self._levels:
            lg.setLevel(logging.CRITICAL)
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        self._w.__exit__(*exc)
        for lg, lvl in self._levels:
            lg.setLevel(lvl)


def read_archive(path) -> bytes:
    from bdp.files import read_limited

    return read_limited(path, MAX_ARCHIVE_BYTES, f"larger than {MAX_ARCHIVE_BYTES / 2**30:.0f} GiB; bdp does not "
                                                 "load model files this large")


def load_exported_program(path, trust=False):
    """The ExportedProgram in the ``.pt2`` file PATH; InputError when it is refused or broken."""
    import torch

    path = str(path)
    data = read_archive(path)
    if not trust:
        try:
            data = sanitize(data)
        except _Refused as e:
            raise InputError(f"{path}: refused: {e}; {_REFUSE_HINT}") from None
    try:
        with _quiet_torch_logs():
            if trust:
                return torch.export.load(io.BytesIO(data))
            from torch.export.pt2_archive._package import load_pt2

            contents = load_pt2(io.BytesIO(data))
    except Exception as e:  # torch's deserializer raises many kinds on a damaged program
        msg = str(e).strip().splitlines()
        raise InputError(f"{path}: cannot load torch.export program "
                         f"({(msg[0] if msg else type(e).__name__)[:200]})") from None
    prog = contents.exported_programs.get("model")
    if prog is None:
        raise InputError(f"{path}: the archive holds no program named 'model'")
    return prog
