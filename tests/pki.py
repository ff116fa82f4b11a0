"""Certificates and tokens made at test time (``trustme``), written as the PEM files a server reads.

``make_pki(directory)`` returns a ``Pki``: a CA, a server certificate for
127.0.0.1, ::1 and localhost signed by it, a client certificate signed by it,
and a client certificate from a second, unrelated CA, plus a token file.
"""

from __future__ import annotations

import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class Pki:
    """Paths of every file, and the accepted token."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_client_cert: Path
    other_client_key: Path
    tokens: Path
    token: str

    def ssl_context(self, client: bool | str = False) -> ssl.SSLContext:
        """A client ``SSLContext`` trusting the CA; with ``client`` True (or ``"other"``) it
        also presents the CA-signed (or the other CA's) client certificate."""
        context = ssl.create_default_context(cafile=str(self.ca))
        if client == "other":
            context.load_cert_chain(self.other_client_cert, self.other_client_key)
        elif client:
            context.load_cert_chain(self.client_cert, self.client_key)
        return context


def make_pki(directory: Path) -> Pki:
    """Generate the CAs, certificates and a token file into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    other = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "::1", "localhost")
    client = ca.issue_cert("client@micrograd.test")
    stranger = other.issue_cert("stranger@micrograd.test")
    paths = {
        name: directory / name
        for name in (
            "ca.pem",
            "server.pem",
            "server.key",
            "client.pem",
            "client.key",
            "other.pem",
            "other.key",
            "tokens",
        )
    }
    ca.cert_pem.write_to_path(str(paths["ca.pem"]))
    for cert, pem, key in (
        (server, "server.pem", "server.key"),
        (client, "client.pem", "client.key"),
        (stranger, "other.pem", "other.key"),
    ):
        paths[pem].write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(paths[key]))
    token = secrets.token_hex(24)
    paths["tokens"].write_text(f"# accepted tokens\n{token}\n\nretired-but-still-listed-token\n")
    return Pki(
        ca=paths["ca.pem"],
        server_cert=paths["server.pem"],
        server_key=paths["server.key"],
        client_cert=paths["client.pem"],
        client_key=paths["client.key"],
        other_client_cert=paths["other.pem"],
        other_client_key=paths["other.key"],
        tokens=paths["tokens"],
        token=token,
    )
