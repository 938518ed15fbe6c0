"""Signed bundles: Ed25519 over the exact bytes of ``manifest.json`` (with ``cryptography``).

The manifest lists every other file of the bundle with its sha256, so one signature over its
bytes covers the whole bundle: a verifier checks the signature, then every file's hash, and only
then loads a library. The signature lives beside the manifest in ``manifest.sig``: one line, the
64-byte Ed25519 signature in base64 (it is not listed in the manifest, which it signs).

Keys are standard PEM files, readable by OpenSSL (``openssl pkey -in KEY.pub -pubin -text``):
``NAME.key`` the private key (PKCS#8, unencrypted, mode 0600), ``NAME.pub`` the public key
(SubjectPublicKeyInfo). ``bdp keys new NAME`` makes a pair; ``bdp compile --sign NAME.key``
signs; ``bdp run/profile --trust NAME.pub``, ``bdp.load(path, trust=...)`` and
``bin/bdp-run --trust NAME.pub`` refuse a bundle whose signature does not verify. A trust key
may also be configured with ``BDP_TRUST=path/to/NAME.pub``; without one, unsigned bundles load
as before.
"""

from __future__ import annotations

import base64
import os
import re

from bdp.errors import InputError

SIGNATURE = "manifest.sig"
TRUST_ENV = "BDP_TRUST"
MAX_KEY_BYTES = 16 << 10
# a .pub file: one PEM block and nothing else but white space around it
_ONE_PUBLIC_PEM = re.compile(rb"[ \t\r\n]*-----BEGIN PUBLIC KEY-----\r?\n[A-Za-z0-9+/=\r\n]+"
                             rb"-----END PUBLIC KEY-----[ \t\r\n]*")


def _read_key_file(path, what):
    path = str(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such {what} file")
    from bdp.files import read_limited

    return read_limited(path, MAX_KEY_BYTES, f"too large for a {what}")


def load_private_key(path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = _read_key_file(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise InputError(f"{path}: not an unencrypted PEM private key (make one with `bdp keys new`)") from None
    except Exception as e:  # cryptography raises UnsupportedAlgorithm for unknown key types
        raise InputError(f"{path}: unreadable private key ({type(e).__name__})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InputError(f"{path}: not an Ed25519 key (bdp signs with Ed25519; `bdp keys new` makes one)")
    return key


def load_public_key(path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    data = _read_key_file(path, "public key")
    if not _ONE_PUBLIC_PEM.fullmatch(data):  # OpenSSL reads the first block and ignores what follows
        raise InputError(f"{path}: not exactly one PEM public key (text before or after it, or several keys); "
                         "use the .pub file of `bdp keys new` as written")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise InputError(f"{path}: not a PEM public key (the .pub file of `bdp keys new`)") from None
    except Exception as e:
        raise InputError(f"{path}: unreadable public key ({type(e).__name__})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InputError(f"{path}: not an Ed25519 public key")
    return key


def new_key_pair(name, force=False) -> tuple[str, str]:
    """Write NAME.key (private, mode 0600) and NAME.pub; returns their paths. An existing key file
    is never overwritten without FORCE (a lost private key cannot be made again)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from bdp.files import atomic_path, check_output_file

    name = str(name)
    if name.endswith((".key", ".pub")):
        name = name[:-4]
    priv_path, pub_path = name + ".key", name + ".pub"
    for p in (priv_path, pub_path):
        check_output_file(p, "key file")
        if os.path.exists(p) and not force:
            raise InputError(f"{p}: exists; a key is never overwritten (choose another name, or pass --force)")
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with atomic_path(priv_path) as tmp:
        os.chmod(tmp, 0o600)
        with open(tmp, "wb") as f:
            f.write(priv)
    with atomic_path(pub_path) as tmp:
        with open(tmp, "wb") as f:
            f.write(pub)
    return priv_path, pub_path


def sign_manifest(bundle_dir, key_path, manifest_bytes: bytes):
    """Write BUNDLE_DIR/manifest.sig: the signature of MANIFEST_BYTES with the key at KEY_PATH."""
    key = load_private_key(key_path)
    sig = key.sign(manifest_bytes)
    with open(os.path.join(str(bundle_dir), SIGNATURE), "wb") as f:
        f.write(base64.b64encode(sig) + b"\n")


def trust_key_path(trust=None):
    """The configured trust key: TRUST, else $BDP_TRUST, else None (TRUST=False: none, for a
    bundle bdp has just built itself). A trust setting that is given but empty (``--trust ''``,
    ``BDP_TRUST=''``) is an InputError, never "no key": a check the user asked for never fails
    open."""
    if trust is False:
        return None
    if trust is not None:
        if not str(os.fspath(trust)).strip():
            raise InputError("the trust key is an empty path; give the .pub file of `bdp keys new`")
        return str(os.fspath(trust))
    env = os.environ.get(TRUST_ENV)
    if env is None:
        return None
    if not env.strip():
        raise InputError(f"${TRUST_ENV} is set but empty; set it to a public key file (.pub) or unset it")
    return env


def verify_manifest(bundle_dir, manifest_bytes: bytes, trust):
    """Raise InputError unless BUNDLE_DIR/manifest.sig is a valid signature of MANIFEST_BYTES by
    the public key at TRUST."""
    from cryptography.exceptions import InvalidSignature

    key = load_public_key(trust)
    sig_path = os.path.join(str(bundle_dir), SIGNATURE)
    if not os.path.isfile(sig_path):
        raise InputError(f"{bundle_dir}: not signed (no {SIGNATURE}) but a trust key is configured ({trust}); "
                         "sign it with `bdp compile --sign KEY`")
    try:
        with open(sig_path, "rb") as f:
            raw = f.read(1024)
        sig = base64.b64decode(raw.strip(), validate=True)
    except (OSError, ValueError):
        raise InputError(f"{sig_path}: not a bdp signature (one line of base64)") from None
    if len(sig) != 64:
        raise InputError(f"{sig_path}: not an Ed25519 signature ({len(sig)} bytes, expected 64)")
    try:
        key.verify(sig, manifest_bytes)
    except InvalidSignature:
        raise InputError(f"{bundle_dir}: the manifest's signature does not verify with {trust} "
                         "(tampered, or signed with another key)") from None
