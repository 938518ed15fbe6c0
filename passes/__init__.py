"""ONNX graph rewrites: each pass a pure, named ``ModelProto -> ModelProto`` function.

``bdp passes`` lists them; ``run_pipeline(model, "default")`` runs the default pipeline.
"""

from . import arith, binary_conv, canonicalize, conv1d, forms, layout, links, rewrites, shapes, sink, two_valued  # noqa: F401  (register the passes)
from .core import PASSES, PIPELINES, Pass, Report, register_pass, register_pipeline, run_pipeline
from .ops import DOMAIN, attach_functions, register_schemas

register_pipeline("canonicalize", ["name-nodes", "qonnx-to-standard", "fold-shapes", "cancel-terms", "fold-constants",
                                   "cancel-transposes", "fold-batchnorm"])
register_pipeline("default", ["name-nodes", "qonnx-to-standard", "fold-shapes", "cancel-terms", "fold-constants",
                              "cancel-transposes", "fold-batchnorm", "two-valued", "sink-binarizers", "factor-sample-scale", "binary-convtranspose", "binary-matmul",
                              "binary-conv1d", "cancel-transposes", "fuse-binary-conv",
                              "fold-binary-glue", "fold-sign-output", "batchnorm-to-affine", "report-float"])

__all__ = ["PASSES", "PIPELINES", "Pass", "Report", "register_pass", "register_pipeline", "run_pipeline",
           "DOMAIN", "attach_functions", "register_schemas"]
