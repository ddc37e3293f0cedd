"""A throwaway certificate authority for TLS tests, made with the openssl command.

    ca = TestCA(tmp_path / "ca")                     # CA key and certificate
    cert, key = ca.issue("dsbc", ips=["127.0.0.1"])  # a server (and client) certificate
    ca.cert                                          # the CA file peers verify against
    fingerprint(pem_path)                            # SHA-256 of a certificate, hex

ECDSA P-256 keys, SHA-256 signatures, serverAuth and clientAuth usage, IP and DNS
subjectAltNames.  Everything is written under the directory given; nothing is installed.
"""

from __future__ import annotations

import hashlib
import itertools
import ssl
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.peers.proc import PeerError, find_binary

__all__ = ["TestCA", "fingerprint", "openssl_available"]

_serial = itertools.count(1000)


def openssl_available() -> bool:
    return find_binary("openssl") is not None


def _run(*args: str, cwd: Path) -> None:
    r = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
    )
    if r.returncode != 0:
        raise PeerError(f"openssl {' '.join(args[:2])} failed: {r.stderr.strip()}")


def fingerprint(pem: Path | str | bytes) -> str:
    """SHA-256 of a certificate (a PEM file path, PEM text or DER bytes), hex."""
    if isinstance(pem, Path) or (isinstance(pem, str) and not pem.startswith("-----")):
        pem = Path(pem).read_text()
    der = ssl.PEM_cert_to_DER_cert(pem) if isinstance(pem, str) else pem
    return hashlib.sha256(der).hexdigest()


class TestCA:
    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, name: str = "dsbc test CA") -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = self.dir / "ca.key"
        self.cert = self.dir / "ca.pem"
        _run(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-sha256", "-nodes",
            "-days", "2", "-subj", f"/CN={name}", "-keyout", str(self.key), "-out", str(self.cert),
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=self.dir,
        )  # fmt: skip

    def issue(
        self,
        name: str,
        *,
        ips: Sequence[str] = ("127.0.0.1",),
        dns: Sequence[str] = ("localhost",),
        cert_path: Path | None = None,
        key_path: Path | None = None,
        days: int = 2,
    ) -> tuple[Path, Path]:
        """A certificate for ``name`` signed by this CA; returns (certificate, key) paths.
        Paths may be given to overwrite existing files (a certificate renewal)."""
        cert = cert_path or self.dir / f"{name}.pem"
        key = key_path or self.dir / f"{name}.key"
        csr = self.dir / f"{name}.csr"
        ext = self.dir / f"{name}.ext"
        san = ",".join([f"IP:{i}" for i in ips] + [f"DNS:{d}" for d in dns])
        ext.write_text(
            "basicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth,clientAuth\n"
            f"subjectAltName={san}\n"
        )
        tmp_key = key.with_suffix(".key.new")
        _run(
            "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN={name}",
            "-keyout", str(tmp_key), "-out", str(csr), cwd=self.dir,
        )  # fmt: skip
        tmp_cert = cert.with_suffix(".pem.new")
        _run(
            "x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key), "-sha256",
            "-days", str(days), "-set_serial", str(next(_serial)), "-extfile", str(ext), "-out", str(tmp_cert),
            cwd=self.dir,
        )  # fmt: skip
        # replace both files by rename, as a certificate manager does
        tmp_key.replace(key)
        tmp_cert.replace(cert)
        return cert, key

    def client_context(self, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
        """A client context that verifies servers against this CA (no host name check: the
        tests connect to IP addresses) and presents ``cert`` if given."""
        ctx = ssl.create_default_context(cafile=str(self.cert))
        ctx.check_hostname = False
        if cert is not None:
            ctx.load_cert_chain(str(cert[0]), str(cert[1]))
        return ctx

    def server_context(
        self, cert: tuple[Path, Path], verify_client: bool = False
    ) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.cert))
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
        ctx.verify_mode = ssl.CERT_REQUIRED if verify_client else ssl.CERT_NONE
        return ctx
