"""Export: trained checkpoints -> validated ONNX graphs in a versioned model repository.

Importing this package must stay cheap and torch-free: the server imports
``fineserve.export.contract`` to read what export publishes.
"""
