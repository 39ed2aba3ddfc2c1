"""Signed exports: an Ed25519 signature over `deepcache.json`, which holds every file's size and SHA-256.

`export(..., sign_key=...)` writes `deepcache.json.sig` (the 64 signature bytes) beside the manifest;
`load_deepcache(dir, trusted_keys=[...])` and the C++ runtime (`--trusted-key`, `Engine(dir, device, keys)`)
verify the manifest's bytes against the trusted public keys before they parse it or open any other file, so a
package changed after signing (with or without a recomputed manifest), an edited manifest, a signature by
another key, a truncated one, or files swapped in from another signed export are all refused.

Keys are PEM files, made with the `openssl` command line:

    openssl genpkey -algorithm ed25519 -out signing.pem        # private: keep it where exports are built
    openssl pkey -in signing.pem -pubout -out signing.pub.pem  # public: ship it with the runtime

`cryptography` does the work in Python, OpenSSL's EVP interface in C++ (kernels/manifest.cpp).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .manifest import MANIFEST, ManifestError

__all__ = ["SIGNATURE", "sign_manifest", "verified_manifest_bytes"]

SIGNATURE = MANIFEST + ".sig"
_SIGNATURE_BYTES = 64


def sign_manifest(directory: str | Path, key) -> Path:
    """Signs `directory/deepcache.json` with an Ed25519 private key (a PEM file's path, or a cryptography
    `Ed25519PrivateKey`); writes and returns `deepcache.json.sig`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if not isinstance(key, Ed25519PrivateKey):
        loaded = serialization.load_pem_private_key(Path(key).read_bytes(), password=None)
        if not isinstance(loaded, Ed25519PrivateKey):
            raise ValueError(f"sign_key={key} is a {type(loaded).__name__}, not an Ed25519 key: make one with "
                             "`openssl genpkey -algorithm ed25519 -out signing.pem`")
        key = loaded
    directory = Path(directory)
    signature = directory / SIGNATURE
    signature.write_bytes(key.sign((directory / MANIFEST).read_bytes()))
    return signature


def verified_manifest_bytes(directory: Path, trusted_keys: Iterable[str | Path]) -> bytes:
    """The manifest's bytes, read once, after its signature verified against one of `trusted_keys` (PEM public
    key files); ManifestError naming what failed otherwise. The caller parses these bytes, not the file again."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    keys = []
    for path in trusted_keys:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"trusted key {path} is a {type(key).__name__}, not an Ed25519 public key")
        keys.append(key)
    if not keys:
        raise ValueError("trusted_keys is empty: pass the public key files exports must be signed with")
    manifest, signature = directory / MANIFEST, directory / SIGNATURE
    if not manifest.is_file():
        raise ManifestError(f"{manifest} is missing: not a deepcache_compile export (see dc.export)")
    if not signature.is_file():
        raise ManifestError(f"{signature} is missing: the export is not signed; export with sign_key=")
    data, signed = manifest.read_bytes(), signature.read_bytes()
    if len(signed) != _SIGNATURE_BYTES:
        raise ManifestError(f"{signature} has {len(signed)} bytes, an Ed25519 signature has {_SIGNATURE_BYTES}: "
                            "the signature is damaged")
    for key in keys:
        try:
            key.verify(signed, data)
            return data
        except InvalidSignature:
            continue
    raise ManifestError(f"{signature} does not verify with any trusted key: the export was signed by another key, "
                        "or its manifest changed after signing")
