"""The frontend: a model in (a bdp checkpoint ``.pt``, a ``torch.export`` program ``.pt2``, an
``.onnx`` file), checked and exported to ONNX at a fixed input shape (:mod:`.loading`;
``.pt2`` files are read by :mod:`.pt2`, which runs none of their code)."""
