"""An HTTPS proxy on 127.0.0.1 that serves stand-ins for web images, so that tests fetch them offline
through the same code a user's fetch runs (urllib's proxy and certificate handling included).

A client configured with the standard settings sends `CONNECT <host>:443`; the proxy answers 200,
terminates TLS with a certificate for `<host>` signed by a CA made when it starts, and answers GET and
HEAD for `https://<host>/<path>` from `root/<host>/<path>` (the twins' `web/` folder). It never reaches
the network: a host with no folder is refused (502 to the CONNECT), a missing file is a 404, a request
that is not tunnelled is a 502.

    https_proxy, HTTPS_PROXY   http://127.0.0.1:<port>
    no_proxy, NO_PROXY         127.0.0.1,localhost (the local hub and Gradio stay direct)
    SSL_CERT_FILE              the CA (OpenSSL's default verify paths: urllib's default context trusts it)

`install(proxy)` sets them in `os.environ` (the session's, inherited by notebook kernels and commands);
`without(env)` gives an environment as it was before, for what must reach the real network.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import mimetypes
import os
import ssl
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

log = logging.getLogger(__name__)

NAMES = ("https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY", "SSL_CERT_FILE")
DIRECT = ("127.0.0.1", "localhost")
_before: dict[str, str | None] = {}  # the variables as `install` found them


class Certificates:
    """A CA made here (in `folder/ca.pem`) and, per host, a server certificate it signs (cached)."""

    def __init__(self, folder: Path):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        self._x509, self._hashes, self._ser, self._ec = x509, hashes, serialization, ec
        self._eku, self._oid = ExtendedKeyUsageOID, NameOID
        self.folder = folder
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llava_nb tests' web proxy CA")])
        self._cert = (
            self._builder(self._name, self._key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(x509, key_cert_sign=True, crl_sign=True), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.ca_file = folder / "ca.pem"
        self.ca_file.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._lock = threading.Lock()

    def _builder(self, subject, public_key):
        x509 = self._x509
        now = datetime.datetime.now(datetime.timezone.utc)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        )

    def context(self, host: str) -> ssl.SSLContext:
        """A server context presenting a certificate for `host` (made on first use)."""
        with self._lock:
            if host not in self._contexts:
                x509, ser = self._x509, self._ser
                key = self._ec.generate_private_key(self._ec.SECP256R1())
                subject = x509.Name([x509.NameAttribute(self._oid.COMMON_NAME, host)])
                ca_ski = self._cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
                cert = (
                    self._builder(subject, key.public_key())
                    .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
                    .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                    .add_extension(_key_usage(x509, digital_signature=True), critical=True)
                    .add_extension(x509.ExtendedKeyUsage([self._eku.SERVER_AUTH]), critical=False)
                    .add_extension(
                        x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
                    )
                    .sign(self._key, self._hashes.SHA256())
                )
                pem = self.folder / f"{host}.pem"
                pem.write_bytes(
                    cert.public_bytes(ser.Encoding.PEM)
                    + key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
                )
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.load_cert_chain(pem)
                self._contexts[host] = context
            return self._contexts[host]


def _key_usage(x509, **on: bool):
    names = (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    )
    return x509.KeyUsage(**{name: on.get(name, False) for name in names})


def _handler(root: Path, certs: Certificates) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        host: str | None = None  # inside a tunnel: the host it was opened for
        tls: ssl.SSLSocket | None = None

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
            log.debug("web proxy: " + format, *args)

        def do_CONNECT(self) -> None:  # noqa: N802 - http.server's naming
            host = self.path.rpartition(":")[0] or self.path
            if (
                self.host is not None
                or not host
                or "/" in host
                or host.startswith(".")
                or not (root / host).is_dir()
            ):
                return self.send_error(502, f"no stand-in for {host} (the tests' proxy reaches no network)")
            self.send_response(200, "Connection established")
            self.end_headers()
            try:
                self.tls = certs.context(host).wrap_socket(self.connection, server_side=True)
            except (ssl.SSLError, OSError) as e:  # the client refused the certificate, or went away
                log.debug("web proxy: TLS with the client failed for %s: %s", host, e)
                self.close_connection = True
                return
            # handle() goes on reading requests, now from inside the tunnel (a CONNECT in HTTP/1.0 too)
            self.host, self.rfile, self.wfile = host, self.tls.makefile("rb"), self.tls.makefile("wb")
            self.close_connection = False

        def do_GET(self) -> None:  # noqa: N802
            self._serve(head=False)

        def do_HEAD(self) -> None:  # noqa: N802
            self._serve(head=True)

        def _serve(self, head: bool) -> None:
            if self.host is None:
                return self.send_error(502, "the tests' proxy serves https only (CONNECT), no network")
            name = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
            folder = (root / self.host).resolve()
            path = (folder / name).resolve()
            if not name or folder not in path.parents or not path.is_file():
                return self.send_error(404, f"https://{self.host}/{name} has no stand-in in {root}")
            payload = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", mimetypes.guess_type(name)[0] or "application/octet-stream")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if not head:
                self.wfile.write(payload)

        def finish(self) -> None:
            super().finish()
            if self.tls is not None:
                self.tls.close()

    return Handler


@dataclass(frozen=True)
class WebProxy:
    url: str  # http://127.0.0.1:<port>
    ca_file: Path  # the CA that signs every host's certificate

    def environ(self, env: Mapping[str, str] = os.environ) -> dict[str, str]:
        """The standard variables that send https through this proxy and trust its CA (keeping `env`'s
        no_proxy hosts)."""
        direct = [h for h in (env.get("no_proxy") or env.get("NO_PROXY") or "").split(",") if h.strip()]
        no_proxy = ",".join([*DIRECT, *(h for h in direct if h not in DIRECT)])
        return {
            "https_proxy": self.url,
            "HTTPS_PROXY": self.url,
            "no_proxy": no_proxy,
            "NO_PROXY": no_proxy,
            "SSL_CERT_FILE": str(self.ca_file),
        }


@contextlib.contextmanager
def serve(root: str | os.PathLike, port: int = 0) -> Iterator[WebProxy]:
    """Run the proxy for the files under `root` (`root/<host>/<path>`) in a thread, its CA in a temporary
    folder; yields its address and CA."""
    with tempfile.TemporaryDirectory(prefix="llava_nb-web-proxy-") as folder:
        certs = Certificates(Path(folder))
        server = ThreadingHTTPServer(("127.0.0.1", port), _handler(Path(root), certs))
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, name="web-proxy", daemon=True)
        thread.start()
        try:
            yield WebProxy(f"http://127.0.0.1:{server.server_address[1]}", certs.ca_file)
        finally:
            server.shutdown()
            server.server_close()


def install(proxy: WebProxy) -> None:
    """Point this process's environment (and so its children's) at `proxy`."""
    for name in NAMES:
        _before.setdefault(name, os.environ.get(name))
    os.environ.update(proxy.environ())


def without(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with the variables `install` set as they were before it (for what must reach the network)."""
    out = dict(env)
    for name, value in _before.items():
        if value is None:
            out.pop(name, None)
        else:
            out[name] = value
    return out
