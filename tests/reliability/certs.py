"""A throwaway certificate authority with server and client certificates, made by the openssl CLI."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    # A client certificate from a different CA: mutual TLS must refuse it.
    stranger_cert: Path
    stranger_key: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=60)


def _key(path: Path) -> None:
    _openssl(
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-out",
        path,
        cwd=path.parent,
    )


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    _key(key)
    _openssl(
        "req", "-x509", "-new", "-key", key, "-subj", f"/CN={name}", "-days", "2", "-out", cert, cwd=folder
    )
    return cert, key


def _signed(folder: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    key, csr, cert, ext = (folder / f"{name}{s}" for s in (".key", ".csr", ".pem", ".ext"))
    _key(key)
    _openssl("req", "-new", "-key", key, "-subj", f"/CN={name}", "-out", csr, cwd=folder)
    ext.write_text(extensions)
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
        "-days", "2", "-extfile", ext, "-out", cert, cwd=folder,
    )  # fmt: skip
    return cert, key


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(folder, "test-ca")
    server = _signed(
        folder, "server", ca, "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
    )
    client = _signed(folder, "client", ca, "extendedKeyUsage=clientAuth\n")
    stranger = _signed(folder, "stranger", _ca(folder, "other-ca"), "extendedKeyUsage=clientAuth\n")
    return Pki(ca[0], server[0], server[1], client[0], client[1], stranger[0], stranger[1])


def make_expired_cert(folder: Path) -> tuple[Path, Path]:
    """A self-signed localhost certificate valid for one day in 2020, and its key (``openssl ca``
    sets past dates, which ``req`` and ``x509`` cannot)."""
    folder.mkdir(parents=True, exist_ok=True)
    key, csr, cert = folder / "expired.key", folder / "expired.csr", folder / "expired.pem"
    _key(key)
    _openssl("req", "-new", "-key", key, "-subj", "/CN=localhost", "-out", csr, cwd=folder)
    (folder / "index.txt").write_text("")
    (folder / "serial").write_text("01\n")
    (folder / "ca.cnf").write_text(
        "[ca]\ndefault_ca = past\n[past]\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial\n"
        "default_md = sha256\npolicy = any\n[any]\ncommonName = supplied\n"
    )
    _openssl(
        "ca", "-batch", "-config", "ca.cnf", "-selfsign", "-keyfile", key, "-in", csr,
        "-startdate", "20200101000000Z", "-enddate", "20200102000000Z", "-out", cert, cwd=folder,
    )  # fmt: skip
    return cert, key
