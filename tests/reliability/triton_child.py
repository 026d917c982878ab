"""tritonclient calls for a child process (tritonclient's protos clash with ours in one process;
see tests/server/kserve_harness.py). Imports tritonclient lazily; returns plain data."""

from __future__ import annotations

from typing import Any

import numpy as np


def infer_text_over_tls(
    url: str, ca: str, client_cert: str, client_key: str, token: str | None
) -> tuple[Any, ...]:
    """One ``texts`` request to tiny-text over mutual TLS, with a bearer token if given."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(
        url, ssl=True, root_certificates=ca, private_key=client_key, certificate_chain=client_cert
    )
    texts = grpcclient.InferInput("texts", [1], "BYTES")
    texts.set_data_from_numpy(np.array([b"a good movie"], dtype=np.object_))
    headers = {"authorization": f"Bearer {token}"} if token else None
    try:
        result = client.infer("tiny-text", [texts], headers=headers)
        return ("ok", result.as_numpy("probabilities").tolist())
    except Exception as err:
        status = getattr(err, "status", lambda: None)() or "UNKNOWN"
        message = err.message() if hasattr(err, "message") else str(err)
        return ("error", str(status).removeprefix("StatusCode."), message)
    finally:
        client.close()
