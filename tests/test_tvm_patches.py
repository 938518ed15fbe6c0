"""bdp patches one TVM internal and calls three private functions (bdp.targets.tvm_patches says
which and why). This pins the TVM version they were checked on: an upgrade fails here until
someone has read the new TVM's frontend and legalizations and updated TESTED_TVM."""

import inspect

import pytest


def test_tvm_is_the_version_the_patches_were_checked_on():
    import tvm

    from bdp.targets.tvm_patches import TESTED_TVM

    assert tvm.__version__.split(".post")[0] == TESTED_TVM, (
        f"TVM {tvm.__version__}: re-check bdp/targets/tvm_patches.py against it, then set TESTED_TVM")


def test_the_frontend_still_reads_its_table_through_the_patched_function():
    from tvm.relax.frontend.onnx import onnx_frontend as fe

    from bdp.targets.tvm_patches import onnx_converters

    src = inspect.getsource(fe.ONNXGraphImporter)
    assert "_get_convert_map()" in src  # from_onnx looks each node up there, at call time
    before = fe._get_convert_map

    class Marker:
        pass

    with onnx_converters({"BdpMarker": Marker}):
        table = fe._get_convert_map()
        assert table["BdpMarker"] is Marker and "Conv" in table
    assert fe._get_convert_map is before  # restored
    with pytest.raises(RuntimeError), onnx_converters({"BdpMarker": Marker}):
        raise RuntimeError("a failed import")
    assert fe._get_convert_map is before  # restored on error too


def test_the_private_legalizers_bdp_falls_back_to_exist():
    from tvm.relax.transform.legalize_ops import nn

    from bdp.targets.tvm_patches import PRIVATE_LEGALIZERS

    for name in PRIVATE_LEGALIZERS:
        assert callable(getattr(nn, name, None)), name


def test_bdp_ops_import_through_the_patch_only_while_it_lasts():
    from tvm.relax.frontend.onnx import onnx_frontend as fe

    from bdp.targets.lower import supported_ops

    assert "BinaryConv" not in fe._get_convert_map()
    assert {"BinaryConv", "Conv", "Resize"} <= supported_ops()
