"""Before serving on an accelerator: run a one-node graph on its execution provider.

onnxruntime-gpu lists ``CUDAExecutionProvider`` whatever the host has; on a host whose GPU or CUDA
libraries are unusable each session quietly falls back to CPU (or fails), so without this check
every model would load FAILED under a server that says it serves on CUDA.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

CPU = "CPUExecutionProvider"
# y = x + x over float[2], opset 13: the smallest graph that makes the provider allocate, copy and
# run a kernel. Built by tests/server/test_device_probe.py (make_probe_graph) with onnx's helpers.
PROBE_GRAPH = bytes.fromhex(
    "0807120966696e6573657276653a4a0a0e0a01780a01781201792203416464121666696e6573657276652d646576"
    "6963652d70726f62655a0f0a0178120a0a08080112040a020802620f0a0179120a0a08080112040a02080242040a"
    "00100d"
)
_INPUT = np.array([1.5, -2.0], dtype=np.float32)


def probe(provider: str, options: dict[str, Any] | None = None) -> str | None:
    """Runs the probe graph on ``provider``; None when it ran there and answered right, otherwise
    why not, in one line."""
    providers: list[Any] = [(provider, options or {})] + ([CPU] if provider != CPU else [])
    try:
        session = ort.InferenceSession(PROBE_GRAPH, providers=providers)
    except Exception as err:  # onnxruntime raises its own (RuntimeError, Fail) for a provider that breaks
        return f"{provider} could not create a session ({_first_line(err)})"
    used = session.get_providers()[0]
    if used != provider:
        return (
            f"onnxruntime fell back to {used}: {provider}'s libraries or device are not usable here "
            "(onnxruntime's log above names what is missing)"
        )
    try:
        (answer,) = session.run(None, {"x": _INPUT})
    except Exception as err:  # as above: a kernel launch that fails raises onnxruntime's own errors
        return f"{provider} could not run a graph ({_first_line(err)})"
    expected = _INPUT + _INPUT
    if not np.array_equal(answer, expected):
        return f"{provider} ran the probe graph but answered {answer.tolist()}, not {expected.tolist()}"
    return None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__
