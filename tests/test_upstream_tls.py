"""Trusting an https upstream behind a private CA: SSL_CERT_FILE / SSL_CERT_DIR (as httpx's
default transport reads them) and `Settings.upstream_ca_file` (TOLLGATE_UPSTREAM_CA_FILE)."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest

from proxy.config import Settings
from proxy.http1 import Http1Transport
from proxy.metrics import Metrics
from proxy.upstream import Upstream
from tests.test_http1 import OK, fetch, keep_answering, serving

pytestmark = pytest.mark.anyio


class Authority(NamedTuple):
    ca: Path  # the CA certificate (PEM), what a client must trust
    server: ssl.SSLContext  # a server context whose certificate that CA signed


def _openssl(*args: str, cwd: Path) -> str:
    done = subprocess.run(
        [shutil.which("openssl") or "openssl", *args],
        cwd=cwd, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return done.stdout


def private_authority(directory: Path) -> Authority:
    """A CA and a certificate for 127.0.0.1 it signed, made by the openssl CLI."""
    directory.mkdir()
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=Tollgate test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)  # fmt: skip
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost",
             cwd=directory)  # fmt: skip
    (directory / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "server.ext",
             cwd=directory)  # fmt: skip
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(directory / "server.pem", directory / "server.key")
    return Authority(directory / "ca.pem", server)


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return private_authority(tmp_path / "ca")


@pytest.fixture
def no_trust_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The test's own trust store: none of the machine's SSL_CERT_* variables."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    return monkeypatch


async def test_ssl_cert_file_is_the_trust_store(
    authority: Authority, tmp_path: Path, no_trust_env: pytest.MonkeyPatch
) -> None:
    async with serving(keep_answering(OK), tls=authority.server) as server:
        async with Http1Transport() as transport:  # certifi's store does not know the CA
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await fetch(transport, server.url)
        no_trust_env.setenv("SSL_CERT_FILE", str(authority.ca))
        async with Http1Transport() as transport:
            assert await fetch(transport, server.url) == (200, b"ok")
        async with Http1Transport(trust_env=False) as transport:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await fetch(transport, server.url)
        # As in httpx, the file wins over the directory.
        no_trust_env.setenv("SSL_CERT_DIR", str(tmp_path))
        async with Http1Transport() as transport:
            assert await fetch(transport, server.url) == (200, b"ok")


async def test_ssl_cert_dir_is_the_trust_store(
    authority: Authority, tmp_path: Path, no_trust_env: pytest.MonkeyPatch
) -> None:
    hashed = tmp_path / "hashed"
    hashed.mkdir()
    subject_hash = _openssl("x509", "-hash", "-noout", "-in", str(authority.ca), cwd=tmp_path)
    shutil.copy(authority.ca, hashed / f"{subject_hash.strip()}.0")
    no_trust_env.setenv("SSL_CERT_DIR", str(hashed))
    no_trust_env.setenv("SSL_CERT_FILE", "")  # empty is unset, as in httpx
    async with (
        serving(keep_answering(OK), tls=authority.server) as server,
        Http1Transport() as transport,
    ):
        assert await fetch(transport, server.url) == (200, b"ok")


async def test_upstream_ca_file_adds_to_the_default_trust_store(
    authority: Authority, tmp_path: Path, settings: Settings, no_trust_env: pytest.MonkeyPatch
) -> None:
    other = private_authority(tmp_path / "other")
    no_trust_env.setenv("SSL_CERT_FILE", str(other.ca))  # the default store: the other CA only
    async with (
        serving(keep_answering(OK), tls=authority.server) as private,
        serving(keep_answering(OK), tls=other.server) as public,
    ):
        for server in (private, public):
            configured = replace(settings, upstream_url=server.url, upstream_ca_file=authority.ca)
            upstream = Upstream(
                configured.upstream_configs()[0],
                configured,
                Metrics(key_label=False, known_models=set()),
            )
            try:
                response = await upstream.send("GET", "/models", headers=[], content=None)
                assert (response.status_code, await response.aread()) == (200, b"ok")
            finally:
                await upstream.aclose()


def test_unreadable_ca_file_fails_when_the_transport_is_built(tmp_path: Path) -> None:
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    with pytest.raises(ssl.SSLError):
        Http1Transport(ca_file=not_pem)


def test_ssl_context_and_ca_file_are_exclusive(authority: Authority) -> None:
    with pytest.raises(ValueError, match="ca_file"):
        Http1Transport(ssl_context=ssl.create_default_context(), ca_file=authority.ca)
