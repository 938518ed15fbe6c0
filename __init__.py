"""bdp: binary dense prediction, from PyTorch to the robot.

The public Python API (see shared/CONTRACT.md)::

    import bdp
    bundle_dir = bdp.compile("model.onnx", target="x86", out="bundle/")
    model = bdp.load("bundle/")
    outputs = model(x)                 # {name: numpy array}
    net = bdp.load_model("model.pt")   # torch.nn.Module, eval mode

Heavy libraries (torch, TVM) are imported only when one of these is called.
"""

__version__ = "0.1.0"

__all__ = ["compile", "load", "load_model", "__version__"]


def compile(model, example_input=None, *, target="x86", out="bundle", **kwargs):  # noqa: A001 - the contract's name
    """Compile MODEL for TARGET into the bundle folder OUT; returns OUT.

    MODEL: a path (a bdp checkpoint ``.pt``, a ``torch.export`` program ``.pt2``, an ``.onnx``
    file) or a ``torch.nn.Module`` with EXAMPLE_INPUT, a tensor of the input's shape (the module
    is exported in eval mode with ``torch.export``, then compiled as a ``.pt2`` is). Keyword
    arguments: ``input_shape``, ``require_binary`` (refuse 1-bit layers left in float), ``verify``,
    ``options``, ``sign``, ``force``, ... (see ``bdp compile --help``)."""
    from bdp.toolchain.compile import compile_model

    return compile_model(model, target=target, out=out, example_input=example_input, **kwargs)


def load(bundle_dir, trust=None):
    """Load a bundle built for this host; returns a callable ``model(x) -> {name: array}``.

    TRUST: an Ed25519 public key file (``bdp keys new``); the bundle is refused unless its
    manifest is signed with the matching private key (default ``$BDP_TRUST``; without either,
    unsigned bundles load)."""
    from bdp.toolchain.bundle.format import load_bundle

    return load_bundle(bundle_dir, trust=trust)


def load_model(path):
    """The torch.nn.Module of a bdp checkpoint, in eval mode (loaded with weights_only=True)."""
    from bdp.toolchain.frontend.loading import load_checkpoint

    return load_checkpoint(path)
