"""TLS for the Dask clusters daskpath starts or joins.

A Dask scheduler runs whatever a connected client sends it, as the user who started it. On a
shared cluster network, plain ``tcp://`` means anyone who can reach the port can run code as
you. ``cluster.security`` turns on mutual TLS (``tls://``; the scheduler, the workers and the
client each present a certificate signed by one CA, and the scheduler refuses anything else):

* ``kind: temporary`` - a throw-away CA and certificate made in memory for this run
  (:meth:`distributed.security.Security.temporary`); enough for ``local`` and ``local-cuda``
  clusters and for SLURM through dask-jobqueue, which hands the files to its jobs.
* ``kind: tls`` with ``dir`` - the files ``daskpath cluster tls DIR`` made (``ca.pem``,
  ``cert.pem``, ``key.pem``) or the site's own (``ca_file``, ``cert_file``, ``key_file``);
  needed when a scheduler is started outside daskpath (the SLURM scripts in ``cluster/slurm``,
  a Kubernetes secret).

:func:`make_tls` writes such a folder with the ``cryptography`` package (which distributed
itself uses for ``Security.temporary``): a CA, and one certificate for the scheduler, the workers
and the client (``serverAuth`` + ``clientAuth``), valid for the host names given and
``localhost``. Keys are written with mode 0600; the CA's key goes to ``ca/ca-key.pem`` (keep
it; it signs new certificates, and anyone holding it can join the cluster).
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from daskpath.errors import ConfigError

__all__ = ["TLS_FILES", "make_tls", "tls_files", "security_from_config"]

#: File names in a folder made by :func:`make_tls`.
TLS_FILES = {"ca_file": "ca.pem", "cert_file": "cert.pem", "key_file": "key.pem"}


def _name(common: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "daskpath"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_tls(folder: str | os.PathLike[str], hosts: Iterable[str] = (), *, days: int = 365,
             force: bool = False) -> dict[str, Path]:
    """Create a CA and one certificate for scheduler, workers and client in ``folder``.

    Parameters
    ----------
    folder : path-like
        Created when missing; an existing folder must be daskpath's (or ``force``).
    hosts : iterable of str
        Host names or IP addresses the scheduler is reached by (``localhost`` and
        ``127.0.0.1`` are always included).
    days : int
        Validity of the certificates.
    force : bool
        Write into a non-empty folder daskpath did not make (see :mod:`daskpath.ownership`).

    Returns
    -------
    dict
        ``ca_file``, ``cert_file``, ``key_file`` (paths), plus ``ca_key_file``.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from daskpath.ownership import claim_folder

    out = Path(folder)
    claim_folder(out, force=force, made_by="cluster tls")
    now = _dt.datetime.now(_dt.timezone.utc)
    until = now + _dt.timedelta(days=int(days))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("daskpath CA")).issuer_name(_name("daskpath CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - _dt.timedelta(minutes=5)).not_valid_after(until)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    names: list[x509.GeneralName] = []
    for h in ["localhost", "127.0.0.1", *hosts]:
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(h))
        except ValueError:
            entry = x509.DNSName(h)
        if entry not in names:
            names.append(entry)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("daskpath")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5)).not_valid_after(until)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    plain = serialization.NoEncryption()
    files = {k: out / v for k, v in TLS_FILES.items()}
    # the CA key in a sub-folder, so `kubectl create secret generic --from-file=DIR` (which
    # takes the folder's top-level files only) never ships it to the pods
    (out / "ca").mkdir(mode=0o700, exist_ok=True)
    files["ca_key_file"] = out / "ca" / "ca-key.pem"
    files["ca_file"].write_bytes(ca.public_bytes(pem))
    files["cert_file"].write_bytes(cert.public_bytes(pem))
    _write_private(files["key_file"], key.private_bytes(pem, serialization.PrivateFormat.PKCS8, plain))
    _write_private(files["ca_key_file"],
                   ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, plain))
    return files


def tls_files(sec: Any) -> dict[str, str]:
    """The CA, certificate and key files of a ``cluster.security`` block of kind ``tls``.

    Raises
    ------
    ConfigError
        A file is missing, or neither ``dir`` nor all three files are given.
    """
    files: dict[str, str] = {}
    for key, default in TLS_FILES.items():
        value = getattr(sec, key, None)
        if value is None and getattr(sec, "dir", None):
            value = str(Path(sec.dir).expanduser() / default)
        if value is None:
            raise ConfigError(f"cluster.security.kind: tls needs cluster.security.dir (made by "
                              f"`daskpath cluster tls DIR`) or cluster.security.{key}")
        p = Path(value).expanduser()
        if not p.is_file():
            raise ConfigError(f"cluster.security: {key.replace('_file', '')} file {p} not found; "
                              "run `daskpath cluster tls DIR` or fix the path")
        files[key] = str(p)
    return files


def security_from_config(sec: Any) -> Any:
    """A :class:`distributed.security.Security` for ``cluster.security``, or None (kind none).

    Encryption is required (``require_encryption=True``): a plain ``tcp://`` peer is refused.
    """
    kind = getattr(sec, "kind", "none") if sec is not None else "none"
    if kind == "none":
        return None
    from distributed.security import Security

    if kind == "temporary":
        return Security.temporary()
    f = tls_files(sec)
    return Security(
        tls_ca_file=f["ca_file"],
        tls_client_cert=f["cert_file"], tls_client_key=f["key_file"],
        tls_scheduler_cert=f["cert_file"], tls_scheduler_key=f["key_file"],
        tls_worker_cert=f["cert_file"], tls_worker_key=f["key_file"],
        require_encryption=True,
    )
