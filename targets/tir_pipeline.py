"""The TIR pipeline of CPU builds: TVM's default one, plus one pass before ``LowerTVMBuiltin``
that keeps small per-tile buffers on the stack and, on targets whose vector popcount counts bytes
(AVX2; pipeline ``bdp-cpu-bytes``), :mod:`bdp.targets.byte_counters` before it.

TVM lowers every ``local``-scope buffer of a CPU function (the register tiles of bdp's
schedules: a binary conv's accumulators, a pack stage's word, a float tile's accumulators), and
every ``global`` one of 1 KiB or more, to a ``TVMBackendAllocWorkspace`` / ``Free`` pair where it
is declared: inside a kernel's tile loop that is one pair per tile (about 2,600 per run of one
64-channel 3x3 layer at 64x80, 21,000 per run of bireal-tiny). Worse, a buffer behind a pointer
from a function call cannot be promoted to registers by LLVM, so the accumulators go through
memory. :func:`stack_buffers` marks such buffers ``disable_lower_builtin``: LLVM's code
generator then makes each a fixed ``alloca`` in its function's entry block (once per call, not
per tile), which SROA turns into registers where every index is a constant (unrolled tiles).

Bounds: a buffer of constant size up to :data:`STACK_BUFFER_MAX` bytes (32 KiB), and at most
:data:`STACK_FUNCTION_MAX` bytes per function (a binary conv's tiles take a few hundred bytes,
a float conv's padded band copy up to tens of KiB; the stacks of TVM's worker threads are the
platform default, 8 MiB on Linux). Larger or dynamic buffers stay workspaces (at 256x320 one
float conv of bi-mtdp-c copies a 720 KiB padded band per band iteration).
"""

from __future__ import annotations

STACK_BUFFER_MAX = 32 * 1024
STACK_FUNCTION_MAX = 128 * 1024
PIPELINE_NAME = "bdp-cpu"
_REGISTERED: set = set()
_DISABLE = "disable_lower_builtin"  # tvm::tirx::transform::kDisableLowerTVMBuiltin


def _nbytes(buf):
    import tvm

    n = 1
    for s in buf.shape:
        if not isinstance(s, tvm.tirx.IntImm):
            return None
        n *= int(s)
    dt = tvm.DataType(str(buf.dtype))
    return n * dt.bits * dt.lanes // 8


def stack_buffers(func):
    """FUNC (a PrimFunc of a CPU target) with its small tile buffers marked to stay on the stack:
    every ``local`` buffer, and every ``global`` buffer declared inside a loop, of constant size
    within the bounds above. Returns (new function, bytes placed on the stack)."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    state = {"loops": 0, "bytes": 0}

    def on_for(loop, mutator):
        state["loops"] += 1
        try:
            return mutator.default_mutate(loop)
        finally:
            state["loops"] -= 1

    def on_alloc(alloc, mutator):
        alloc = mutator.default_mutate(alloc)
        buf = alloc.buffer
        scope = buf.scope()
        if _DISABLE in alloc.annotations or not (scope == "local" or (scope == "global" and state["loops"])):
            return alloc
        size = _nbytes(buf)
        if size is None or size == 0 or size > STACK_BUFFER_MAX or state["bytes"] + size > STACK_FUNCTION_MAX:
            return alloc
        state["bytes"] += size
        ann = dict(alloc.annotations)
        ann[_DISABLE] = tvm.tirx.IntImm("int32", 1)
        return tirx.AllocBuffer(buf, ann)

    new = tvm_ffi.structural_mutate(func, [(tirx.For, on_for), (tirx.AllocBuffer, on_alloc)])
    return new, state["bytes"]


def _is_cpu(func) -> bool:
    target = func.attrs.get("target", None) if func.attrs is not None else None
    return target is not None and str(target.kind.name) in ("llvm", "c")


def stack_buffers_pass():
    from tvm import tirx

    def _run(func, _mod, _ctx):
        return stack_buffers(func)[0] if _is_cpu(func) else func

    return tirx.transform.prim_func_pass(_run, opt_level=0, name="BdpStackBuffers")


def _factory(byte_counts):
    def make():
        import tvm
        from tvm import tirx
        from tvm.s_tir import pipeline as s_tir_pipeline

        from .byte_counters import byte_counters_pass

        lower, _host, device = s_tir_pipeline.default_s_tir_pipeline()

        def host():
            first = [byte_counters_pass()] if byte_counts else []
            return tvm.ir.transform.Sequential(first + [stack_buffers_pass(), tirx.transform.LowerTVMBuiltin(),
                                                        tirx.transform.LowerIntrin()])

        return lower, host, device

    return make


def register(byte_counts: bool = False) -> str:
    """Register bdp's CPU TIR pipeline with TVM (once); returns its name for ``tvm.compile``'s
    ``tir_pipeline``. BYTE_COUNTS: with :mod:`bdp.targets.byte_counters` first (targets whose
    vector popcount counts bytes: AVX2)."""
    from tvm.tirx.compilation_pipeline import register_tir_pipeline

    name = PIPELINE_NAME + ("-bytes" if byte_counts else "")
    if name not in _REGISTERED:
        register_tir_pipeline(name, _factory(byte_counts))  # TVM's public registry of named TIR pipelines
        _REGISTERED.add(name)
    return name
