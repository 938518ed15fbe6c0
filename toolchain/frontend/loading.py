"""Load a MODEL in any of the contract's three forms and bring it to ONNX.

* ``.pt``: a bdp checkpoint, loaded with ``torch.load(weights_only=True)``;
* ``.pt2``: a ``torch.export`` program (``torch.export.save``);
* ``.onnx``: opset 13 or newer, standard ops, QONNX or ``bdp`` ops.

Every failure caused by the file (missing, truncated, random bytes, hostile pickle, wrong
kind) raises :class:`bdp.errors.InputError` with one line naming the file.
"""

from __future__ import annotations

import io
import os
import warnings

from bdp.errors import InputError, first_line

MIN_OPSET = 13
DEFAULT_SHAPE = (1, 3, 256, 320)
MAX_INPUT_BYTES = 1 << 30  # float32 input tensor of a compile
MAX_MODEL_BYTES = 1 << 30  # a model file


def available_memory():
    """Bytes of memory this process can still have: the machine's MemAvailable, or less when an
    address-space limit (``ulimit -v``) leaves less; None when unknown."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            with open("/proc/self/status") as f:
                used = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmSize:"))
            left = max(0, soft - used)
            avail = left if avail is None else min(avail, left)
    except (OSError, ValueError, StopIteration, ImportError):
        pass
    return avail


def check_memory(need_bytes, what):
    """InputError when WHAT needs more memory than this machine has available."""
    avail = available_memory()
    if avail is not None and need_bytes > avail:
        raise InputError(f"{what} needs about {need_bytes / 2**30:.1f} GiB of memory for its activations, this "
                         f"process has {avail / 2**30:.1f} GiB available (free memory, ulimit -v); use a smaller "
                         "--input-shape")


def model_kind(path) -> str:
    path = str(path)
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a folder, expected a .pt, .pt2 or .onnx file")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".pt", ".pth"):
        return "checkpoint"
    if ext == ".pt2":
        return "exported-program"
    if ext == ".onnx":
        return "onnx"
    raise InputError(f"{path}: unknown model format '{ext}' (expected .pt, .pt2 or .onnx)")


def load_checkpoint(path):
    """The torch.nn.Module of a bdp checkpoint, in eval mode."""
    from bdp.models.checkpoint import load_checkpoint as _load

    return _load(str(path))


def load_onnx(path):
    import onnx

    path = str(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_MODEL_BYTES:  # from the file's size: nothing is read or parsed
                raise InputError(f"{path}: the model file is {size / 2**30:.1f} GiB, over the "
                                 f"{MAX_MODEL_BYTES / 2**30:.0f} GiB limit for a model file")
            data = f.read(MAX_MODEL_BYTES + 1)  # a pipe or device has no size: read at most the limit
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    if len(data) > MAX_MODEL_BYTES:
        raise InputError(f"{path}: the model file is over the {MAX_MODEL_BYTES / 2**30:.0f} GiB limit for a model file")
    if not data:
        raise InputError(f"{path}: empty file")
    try:
        model = onnx.load_model_from_string(data)
    except Exception:
        raise InputError(f"{path}: not a valid ONNX model (cannot parse protobuf; truncated or corrupt?)") from None
    if not model.graph.node and not model.graph.output:
        raise InputError(f"{path}: not a valid ONNX model (no graph)")
    # external data would be a path on disk that the model names: refuse anything leaving its folder
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), "")
            if os.path.isabs(loc) or ".." in loc.replace("\\", "/").split("/"):
                raise InputError(f"{path}: initializer '{t.name}' names external data outside its folder ({loc})")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        try:
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
        except Exception as e:
            raise InputError(f"{path}: cannot load external data ({first_line(e, 160)})") from None
    _drop_bdp_functions(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset < MIN_OPSET:
        raise InputError(f"{path}: ONNX opset {opset} is older than {MIN_OPSET}; re-export with opset_version>={MIN_OPSET}")
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise InputError(f"{path}: ONNX opset {opset} is newer than this bdp's onnx reads ({newest}); re-export with "
                         f"opset_version<={newest}")
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        tt = vi.type.tensor_type
        if vi.name not in inits and (not vi.type.HasField("tensor_type") or tt.elem_type not in _FLOAT_TYPES):
            kind = onnx.TensorProto.DataType.Name(tt.elem_type) if vi.type.HasField("tensor_type") else "not a tensor"
            raise InputError(f"{path}: input '{vi.name}' is {kind}; bdp compiles dense predictors with a float32 input")
    try:
        from bdp.passes.ops import register_schemas

        register_schemas()
        onnx.checker.check_model(model)
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise InputError(f"{path}: invalid ONNX model ({(msg[0] if msg else type(e).__name__)[:200]})") from None
    return model


_FLOAT_TYPES = (1,)  # FLOAT: the bundle input is float32 (manifest, bin/bdp-run)


def _drop_bdp_functions(model):
    """Remove the function bodies a file carries for ``bdp`` ops: bdp has their schemas and
    attaches its own bodies whenever it writes or runs a graph, so a file's copies (stale, of
    another opset, or hostile) are never used; onnx.checker refuses bodies whose opset differs
    from the model's (bdp's own exports at opset 20 carried opset-18 bodies)."""
    from bdp.passes.ops import DOMAIN

    keep = [f for f in model.functions if f.domain != DOMAIN]
    if len(keep) != len(model.functions):
        del model.functions[:]
        model.functions.extend(keep)


def load_exported_program(path, trust=False):
    """The ExportedProgram of a ``.pt2`` file, inspected first so that no code from the file runs
    (see :mod:`bdp.toolchain.frontend.pt2`); ``trust=True`` loads it with ``torch.export.load`` as is."""
    from .pt2 import load_exported_program as _load

    return _load(path, trust=trust)


def parse_shape(text):
    """'1,3,256,320' -> (1, 3, 256, 320) (any rank from 1 to 8: images N,C,H,W, but also [N, K]
    for an MLP or [N, T, K] for a sequence); InputError on anything else."""
    if text is None:
        return None
    what = f"--input-shape '{text}': expected positive integers separated by commas (N,C,H,W for images)"
    try:
        shape = tuple(int(s) for s in str(text).replace("x", ",").split(","))
    except ValueError:
        raise InputError(what) from None
    if not 1 <= len(shape) <= 8 or any(s <= 0 for s in shape):
        raise InputError(what)
    check_input_size(shape, f"--input-shape {text}")
    return shape


def check_input_size(shape, what):
    n = 1
    for s in shape:
        n *= int(s)
    if n * 4 > MAX_INPUT_BYTES:
        raise InputError(f"{what}: the input alone is {n * 4 / 2**30:.1f} GiB (float32, {n:,} values); bdp compiles "
                         f"inputs up to {MAX_INPUT_BYTES / 2**30:.0f} GiB")


def export_torch(module_or_program, input_shape, output_names=None):
    """ONNX ModelProto of a torch module (eval mode) or ExportedProgram, via torch.onnx (dynamo)."""
    import logging

    import torch

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    import onnx

    x = torch.zeros(input_shape)
    for optimize in (True, False):
        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(module_or_program, (x,), dynamo=True, verbose=False, optimize=optimize,
                                     input_names=["input"], external_data=False)
        model = prog.model_proto
        try:  # the exporter's optimizer has written graphs that name a constant it dropped (torch 2.13,
            onnx.checker.check_model(model)  # the same clamp written twice): then export without it
            break
        except onnx.checker.ValidationError:
            if not optimize:
                raise
    if output_names:
        rename_outputs(model, output_names)
    return model


class _quiet:
    """Silence the exporter's progress prints (it writes to stdout)."""

    def __enter__(self):
        import contextlib

        self._buf = io.StringIO()
        self._cm = contextlib.redirect_stdout(self._buf)
        self._cm.__enter__()

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)


def rename_outputs(model, names):
    """Give graph outputs the names NAMES (renaming the tensors everywhere)."""
    outs = list(model.graph.output)
    if len(outs) != len(names):
        raise RuntimeError(f"model has {len(outs)} outputs, expected {len(names)} names")
    mapping = {o.name: n for o, n in zip(outs, names) if o.name != n}
    if not mapping:
        return model
    for node in model.graph.node:
        for i, t in enumerate(node.input):
            if t in mapping:
                node.input[i] = mapping[t]
        for i, t in enumerate(node.output):
            if t in mapping:
                node.output[i] = mapping[t]
    for o in model.graph.output:
        o.name = mapping.get(o.name, o.name)
    for vi in model.graph.value_info:
        vi.name = mapping.get(vi.name, vi.name)
    return model


def task_of(name: str) -> str:
    for t in ("semseg", "depth", "normals", "edges"):
        if name == t or name.startswith(t):
            return t
    return "unknown"


def is_module(obj) -> bool:
    """OBJ is a torch.nn.Module (without importing torch when it is a path)."""
    if isinstance(obj, (str, bytes, os.PathLike)):
        return False
    import torch

    return isinstance(obj, torch.nn.Module)


def model_name(obj) -> str:
    """How messages name a model: its path, or ``<ClassName module>``."""
    return f"<{type(obj).__name__} module>" if is_module(obj) else str(obj)


def module_to_onnx(module, example_input=None, input_shape=None):
    """(ONNX ModelProto, info) of a torch.nn.Module: exported in eval mode with ``torch.export``
    on EXAMPLE_INPUT (a tensor, or a tuple of one), then to ONNX by torch's dynamo exporter, as a
    ``.pt2`` file is. The module's own training mode is left as it was."""
    import torch

    name = model_name(module)
    if example_input is None and input_shape:
        example_input = torch.zeros(tuple(input_shape))
    if isinstance(example_input, (tuple, list)):
        if len(example_input) != 1:
            raise InputError(f"{name}: bdp compiles networks of one input tensor; got {len(example_input)} example inputs")
        example_input = example_input[0]
    if example_input is None:
        raise InputError(f"{name}: a torch.nn.Module needs an example input: bdp.compile(model, x, target=...)")
    if not isinstance(example_input, torch.Tensor):
        raise InputError(f"{name}: the example input is a {type(example_input).__name__}, expected a torch.Tensor")
    x = example_input.detach().to(torch.float32)
    shape = tuple(int(d) for d in x.shape)
    check_input_size(shape, f"{name}: example input of shape {','.join(map(str, shape))}")
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(x)
        prog = torch.export.export(module, (x,))
        model = export_torch(prog, shape)
    except InputError:
        raise
    except Exception as e:  # the user's module: whatever torch.export or the exporter refuses in it
        msg = str(e).strip().splitlines()
        raise InputError(f"{name}: cannot export this module to ONNX ({(msg[0] if msg else type(e).__name__)[:200]})") \
            from None
    finally:
        module.train(was_training)
    if isinstance(out, dict) and len(out) == len(model.graph.output) and all(isinstance(k, str) for k in out):
        rename_outputs(model, list(out.keys()))
    info = {"source": "module", "arch": getattr(module, "bdp_arch", None),
            "config": dict(getattr(module, "bdp_config", {}) or {}), "input_shape": shape}
    return model, info


def to_onnx(path, input_shape=None, trust_model=False, example_input=None):
    """(ONNX ModelProto, info) for MODEL at PATH in any supported form (or a torch.nn.Module with
    EXAMPLE_INPUT). TRUST_MODEL loads a ``.pt2`` without inspecting it first (``--trust-model``).

    info: {"source": kind, "arch": name or None, "input_shape": tuple, "config": dict}
    """
    if is_module(path):
        return module_to_onnx(path, example_input, input_shape)
    kind = model_kind(path)
    shape = tuple(input_shape) if input_shape else None
    info = {"source": kind, "arch": None, "config": {}}
    if kind == "checkpoint":
        module = load_checkpoint(path)
        shape = shape or DEFAULT_SHAPE
        from bdp.models.zoo import forward_bytes

        check_memory(forward_bytes(module, shape), f"{path} at input shape {','.join(map(str, shape))}")
        info["arch"] = getattr(module, "bdp_arch", None)
        info["config"] = dict(getattr(module, "bdp_config", {}))
        names = _output_names(module, shape)
        model = export_torch(module, shape, names)
    elif kind == "exported-program":
        prog = load_exported_program(path, trust=trust_model)
        if shape is None:
            shape = _program_input_shape(prog, path)
        try:
            model = export_torch(prog, shape)
        except InputError:
            raise
        except Exception as e:
            msg = str(e).strip().splitlines()
            raise InputError(f"{path}: cannot export this program to ONNX ({(msg[0] if msg else '')[:200]})") from None
        try:
            names = _program_output_names(prog)
            if names and len(names) == len(model.graph.output):
                rename_outputs(model, names)
        except (AttributeError, KeyError, IndexError, TypeError, ValueError, RuntimeError):  # a signature of another
            pass  # form: the outputs keep the exporter's names (the manifest lists them as they are)
    else:
        model = load_onnx(path)
    info["input_shape"] = shape
    return model, info


def _output_names(module, shape):
    import torch

    with torch.no_grad():
        out = module(torch.zeros(shape))
    if isinstance(out, dict):
        return list(out.keys())
    if isinstance(out, (tuple, list)):
        return [f"output{i}" for i in range(len(out))]
    return ["output"]


def _program_input_shape(prog, path):
    for spec in prog.graph_signature.input_specs:
        if spec.kind.name == "USER_INPUT":
            node = next(n for n in prog.graph.nodes if n.name == spec.arg.name)
            val = node.meta.get("val")
            if val is not None:
                try:
                    return tuple(int(s) for s in val.shape)
                except (TypeError, ValueError):
                    break
    raise InputError(f"{path}: the program's input shape is dynamic; pass --input-shape N,C,H,W")


def _program_output_names(prog):
    spec = prog.call_spec.out_spec
    if spec is not None and spec.context and isinstance(spec.context, (list, tuple)):
        return [str(k) for k in spec.context]
    return None
