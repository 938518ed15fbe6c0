"""Where bdp reaches into TVM's internals, and why: the one module that says so.

Everything else bdp adds to TVM goes through public extension points: Relax passes and
pipelines (``tvm.transform``, ``relax.transform.LegalizeOps`` with bdp's legalizations), the TIR
pipeline of CPU builds (``tvm.tirx.compilation_pipeline.register_tir_pipeline``, see
:mod:`bdp.targets.tir_pipeline`), intrinsic lowerings (``tirx.register_intrin_lowering``) and
the thread pool (``runtime.config_threadpool``, see :func:`bdp.targets.spec.configure_runtime_threads`).

Two places have none in TVM 0.27:

- **The ONNX frontend's converter table** (patched). ``tvm.relax.frontend.onnx.from_onnx`` looks
  every node up in ``onnx_frontend._get_convert_map()``, a private function, and takes no table
  of its own: the only way to convert bdp's ``bdp.BinaryConv`` op (and to replace TVM's
  ``Resize``, whose float rounding differs from onnxruntime's) is to put a function returning
  the extended table in its place. :func:`onnx_converters` does that for the duration of one
  import and restores TVM's function after, also on error. The patch is process-wide while it
  lasts: two threads importing ONNX at once would both see bdp's converters (which convert only
  bdp's ops and ``Resize``, identically for any caller).
- **TVM's default legalizations** (called, not patched). bdp's legalizations of
  ``conv2d_transpose``, ``conv2d`` and ``softmax`` (:mod:`bdp.targets.schedules.legalize`) hand
  every case they do not take back to TOPI's, through the private
  ``relax.transform.legalize_ops.nn._nn_conv2d_transpose`` / ``_nn_conv2d`` / ``_nn_softmax``.

``tests/test_tvm_patches.py`` pins :data:`TESTED_TVM` and checks that these names still exist and
that ``from_onnx`` still reads the table through ``_get_convert_map``; a TVM upgrade fails it
until someone has checked this module again.
"""

from __future__ import annotations

import contextlib

TESTED_TVM = "0.27.0"  # tvm.__version__ these were checked on (a .postN of it is the same source)
PRIVATE_LEGALIZERS = ("_nn_conv2d_transpose", "_nn_conv2d", "_nn_softmax")


def onnx_convert_map() -> dict:
    """TVM's ONNX converter table as ``from_onnx`` sees it now: {op type: converter class}."""
    from tvm.relax.frontend.onnx import onnx_frontend as fe

    return fe._get_convert_map()


@contextlib.contextmanager
def onnx_converters(extra: dict):
    """For the duration of the block, TVM's ONNX frontend converts the op types of EXTRA (``{op
    type: converter class}``) with those converters, TVM's table otherwise."""
    from tvm.relax.frontend.onnx import onnx_frontend as fe

    orig = fe._get_convert_map

    def patched():
        table = dict(orig())
        table.update(extra)
        return table

    fe._get_convert_map = patched
    try:
        yield
    finally:
        fe._get_convert_map = orig
