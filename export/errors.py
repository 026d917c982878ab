"""The expected failures of export, one class each, under one base: ``ExportError``.

``fineserve export`` prints an ``ExportError`` as one ``error: ...`` line and exits 1; anything
else is a bug and keeps its traceback. ``contract.ModelSpecError`` derives from it too, and the
failures of training's run folders from ``training.errors.TrainingError``. Standard library only:
the server imports this through ``export.contract``.
"""

from __future__ import annotations


class ExportError(Exception):
    """A failure the user can act on: a bad option, input, model or check; nothing was published."""


class UsageError(ExportError, ValueError):
    """A command-line value that cannot be used."""


class ExamplesError(ExportError, ValueError):
    """Examples that cannot be read or do not fit the model (unknown label, empty source)."""


class TokenizerError(ExportError, ValueError):
    """A tokenizer file the ``tokenizers`` library (and so the server) cannot load."""


class UnsupportedModelError(ExportError, ValueError):
    """A task or model this exporter does not know how to export."""


class OnnxExportError(ExportError, RuntimeError):
    """The exporter could not turn the model into an ONNX graph."""


class WrapError(ExportError, ValueError):
    """The ONNX file is unreadable or does not look like the classifier described."""


class PublishError(ExportError, RuntimeError):
    """The version could not be published (bad name, incomplete folder, file-system error)."""


class UnknownDefaultError(ExportError, ValueError):
    """A name given to ``--only`` that is not a default model."""


class TrainingFailedError(ExportError, RuntimeError):
    """The training subprocess for a default model exited non-zero."""


class ValidationError(ExportError):
    """A graph failed the gate (``export.validate``): nothing is published."""


class InputNamesError(ValidationError):
    """The graph's inputs are not the ones ``model.json`` declares."""


class OutputNamesError(ValidationError):
    """The graph's outputs are not the ones ``model.json`` declares."""


class DynamicAxesError(ValidationError):
    """An axis declared dynamic (-1) is fixed in the graph."""


class ShapeError(ValidationError):
    """A dtype, rank or fixed axis differs from the declaration, or a batch's output shape is wrong."""


class ValueMismatchError(ValidationError):
    """fp32 logits further from the reference than the tolerance."""


class TopOneMismatchError(ValidationError):
    """fp32 top-1 differs from the reference on at least one example."""


class Fp16AgreementError(ValidationError):
    """fp16 top-1 agrees with the reference on too few examples."""


class Int8AccuracyError(ValidationError):
    """int8 loses too much accuracy against the reference."""


class GraphLoadError(ValidationError):
    """onnxruntime refuses to load the graph (a variant converted into an invalid one, say)."""


class ExpectationError(ValidationError):
    """The PyTorch model itself gets a known example wrong (broken weights or preprocessing)."""
