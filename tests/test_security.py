"""cluster.security: a TLS scheduler accepts only clients with a certificate of its CA."""

from __future__ import annotations

import asyncio
import os
import stat

import pytest

from daskpath.config import load_config
from daskpath.errors import ConfigError
from daskpath.security import make_tls, security_from_config


def test_make_tls_writes_a_ca_and_private_keys(tmp_path):
    files = make_tls(tmp_path / "tls", hosts=["node01", "10.1.2.3"])
    for key in ("ca_file", "cert_file", "key_file", "ca_key_file"):
        assert files[key].is_file()
    for key in ("key_file", "ca_key_file"):
        assert stat.S_IMODE(os.stat(files[key]).st_mode) == 0o600
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(files["cert_file"].read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "node01" in san.get_values_for_type(x509.DNSName)
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1", "10.1.2.3"}
    ca = x509.load_pem_x509_certificate(files["ca_file"].read_bytes())
    cert.verify_directly_issued_by(ca)


def test_make_tls_refuses_a_foreign_folder(tmp_path):
    from daskpath.ownership import OutputFolderError

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputFolderError):
        make_tls(tmp_path)


def test_config_checks_tls_files_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="daskpath cluster tls"):
        load_config(None, ["cluster.security.kind=tls"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(None, ["cluster.security.kind=tls", f"cluster.security.dir={tmp_path}"])
    with pytest.raises(ConfigError, match="cluster.security.kind"):
        load_config(None, ["cluster.security.kind=plaintext"])
    make_tls(tmp_path / "tls")
    cfg = load_config(None, ["cluster.security.kind=tls", f"cluster.security.dir={tmp_path / 'tls'}"])
    assert security_from_config(cfg.cluster.security).require_encryption
    assert security_from_config(load_config(None).cluster.security) is None


def test_tls_scheduler_refuses_plain_and_foreign_clients(tmp_path):
    from distributed import Client, Scheduler
    from distributed.security import Security

    make_tls(tmp_path / "tls")
    cfg = load_config(None, ["cluster.security.kind=tls", f"cluster.security.dir={tmp_path / 'tls'}"])
    sec = security_from_config(cfg.cluster.security)

    async def main() -> dict[str, str]:
        out = {}
        async with Scheduler(host="127.0.0.1", port=0, protocol="tls", security=sec,
                             dashboard_address=None) as s:
            out["address"] = s.address
            async with Client(s.address, security=sec, asynchronous=True) as c:
                out["tls"] = str(await c.run_on_scheduler(lambda: "ok"))
            for name, addr, security in (
                ("plain", "tcp://" + s.address.split("://", 1)[1], None),
                ("foreign", s.address, Security.temporary()),
            ):
                try:
                    async with Client(addr, asynchronous=True, timeout="3s", security=security):
                        out[name] = "connected"
                except Exception as e:  # noqa: BLE001 - any refusal will do
                    out[name] = f"refused ({type(e).__name__})"
        return out

    out = asyncio.run(main())
    assert out["address"].startswith("tls://127.0.0.1:")
    assert out["tls"] == "ok"
    assert out["plain"].startswith("refused") and out["foreign"].startswith("refused")


def test_cli_cluster_tls(tmp_path, capsys):
    from daskpath.cli import main

    assert main(["cluster", "tls", str(tmp_path / "t"), "--host", "node01"]) == 0
    out = capsys.readouterr().out
    assert "cluster.security" in out and "DASKPATH_TLS_DIR" in out
    assert sorted(p.name for p in (tmp_path / "t").iterdir() if p.is_file()) == [
        "ca.pem", "cert.pem", "key.pem"]  # the CA key is not among the top-level files
    assert (tmp_path / "t" / "ca" / "ca-key.pem").is_file()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    assert main(["cluster", "tls", str(tmp_path / "mine")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0]
