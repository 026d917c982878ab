"""fineserve: fine-tune pretrained backbones, export validated ONNX graphs, serve them over gRPC.

One import name. ``fineserve.server``, ``fineserve.training``, ``fineserve.export`` and
``fineserve.bench`` are the repository's top-level folders of the same names (this folder links
to them); ``fineserve.client`` calls a running server; ``fineserve.cli`` is the ``fineserve`` command.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fineserve")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
