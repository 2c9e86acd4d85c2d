"""Sign an artifact and verify its signature with the OpenSSF `model-signing` package (key-pair mode).

`sign_artifact(path, private_key)` hashes every file of the artifact (manifest.json included) with
model-signing and signs that list with an elliptic-curve private key (P-256, P-384 or P-521, PEM);
the result, a Sigstore bundle, is written atomically to `SIGNATURE_NAME` inside the artifact. The
signature file is left out of what it signs (model-signing records it as an ignored path) and out of
the manifest. `verify_signature(path, public_key)` checks the artifact's manifest and hashes first,
then the signature against the public key and every file against what was signed: a file added,
removed or changed after signing fails. No network is used: key-pair mode needs no transparency log.

model-signing (and pyOpenSSL, which it imports without declaring it) are imported inside the
functions, so `import inferforge` and `import inferforge.kernels` never need them.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from inferforge.errors import ArtifactError, UserInputError
from inferforge.fileio import atomic_write_bytes
from inferforge.manifest import SIGNATURE_NAME, verify_artifact

SUPPORTED_CURVES = ("secp256r1", "secp384r1", "secp521r1")   # what model-signing's key signer accepts
_KEYGEN_HINT = ("make a key pair with `openssl ecparam -name prime256v1 -genkey -noout -out private.pem` and "
                "`openssl ec -in private.pem -pubout -out public.pem`")


def _read_key_file(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise UserInputError(f"{what} {path}: no such file; give the PEM file ({_KEYGEN_HINT})")
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserInputError(f"{what} {path}: cannot be read ({e.strerror}); check its permissions") from None


def _check_private_key(path: Path) -> None:
    """A PEM elliptic-curve private key on a supported curve, without a password, or a UserInputError."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    data = _read_key_file(path, "signing key")
    try:
        key = load_pem_private_key(data, password=None)
    except TypeError:
        raise UserInputError(f"signing key {path}: the key is encrypted, and inferforge sign takes an unencrypted "
                             "PEM key; write one with `openssl ec -in ENCRYPTED.pem -out private.pem` and keep it "
                             "private") from None
    except ValueError:
        hint = " (this is a public key: give the private one)" if b"PUBLIC KEY" in data else ""
        raise UserInputError(f"signing key {path}: not a PEM private key{hint}; {_KEYGEN_HINT}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in SUPPORTED_CURVES:
        raise UserInputError(f"signing key {path}: not an elliptic-curve key on {', '.join(SUPPORTED_CURVES)}; "
                             f"{_KEYGEN_HINT}")


def _check_public_key(path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    data = _read_key_file(path, "public key")
    try:
        key = load_pem_public_key(data)
    except ValueError:
        hint = " (this is a private key: give the public one)" if b"PRIVATE KEY" in data else ""
        raise UserInputError(f"public key {path}: not a PEM public key{hint}; write it from the private key with "
                             "`openssl ec -in private.pem -pubout -out public.pem`") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in SUPPORTED_CURVES:
        raise UserInputError(f"public key {path}: not an elliptic-curve key on {', '.join(SUPPORTED_CURVES)}; "
                             f"{_KEYGEN_HINT}")


def _mismatch_summary(detail: str) -> str:
    """model-signing's "Signature mismatch: [...]" as the files that differ: "changed: a, b; added: c"."""
    detail = detail.replace("\\'", "'")   # the list is printed with repr(): quotes may come escaped
    changed = re.findall(r"Hash mismatch for '([^']+)'", detail)
    added = re.findall(r"Extra files found in model '[^']*': ([^'\"\]]+)", detail)
    removed = re.findall(r"Missing files in model '[^']*': ([^'\"\]]+)", detail)
    parts = [f"{what}: {', '.join(names)}" for what, names in
             (("changed", changed), ("added", added), ("removed", removed)) if names]
    return "; ".join(parts) or detail[:200]


def sign_artifact(path: str | Path, private_key: str | Path) -> Path:
    """Sign the artifact directory `path` with the PEM elliptic-curve `private_key`; returns the
    signature file (`path / SIGNATURE_NAME`), replacing an earlier signature.

    The artifact is verified first (manifest digest and every file's sha256): a damaged or edited
    artifact is refused rather than signed. Raises `ArtifactError` or `UserInputError` (bad key).
    """
    from model_signing import hashing, signing

    path, private_key = Path(path), Path(private_key)
    verify_artifact(path)
    _check_private_key(private_key)
    hashing_config = hashing.Config().set_ignored_paths(paths=[SIGNATURE_NAME], ignore_git_paths=False)
    config = signing.Config().set_hashing_config(hashing_config).use_elliptic_key_signer(private_key=private_key)
    # model-signing writes the signature itself: let it write outside the artifact (a temporary file
    # inside would be hashed), then move the bytes into place atomically.
    with tempfile.TemporaryDirectory(prefix="inferforge-sign-") as scratch:
        scratch_signature = Path(scratch) / SIGNATURE_NAME
        config.sign(path, scratch_signature)
        data = scratch_signature.read_bytes()
    return atomic_write_bytes(path / SIGNATURE_NAME, data)


def verify_signature(path: str | Path, public_key: str | Path) -> dict:
    """Check the artifact `path` (manifest and hashes) and its signature against the PEM `public_key`;
    returns the manifest. Raises `ArtifactError` when the signature is missing, was made with another
    key, or any file was added, removed or changed after signing; `UserInputError` for a bad key file.
    """
    from cryptography.exceptions import InvalidSignature
    from model_signing import verifying

    path, public_key = Path(path), Path(public_key)
    manifest = verify_artifact(path)
    _check_public_key(public_key)
    signature = path / SIGNATURE_NAME
    if not signature.is_file():
        raise ArtifactError(f"{path}: not signed (no {SIGNATURE_NAME}); sign it with `inferforge sign {path} --key "
                            "PRIVATE.pem`, or load it without signature verification")
    config = verifying.Config().use_elliptic_key_verifier(public_key=public_key)
    try:
        config.verify(path, signature)
    except InvalidSignature:
        raise ArtifactError(f"{path}: the signature in {SIGNATURE_NAME} does not verify with {public_key}; it was made "
                            "with another key or altered: get the signer's public key, or re-sign the artifact") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        detail = " ".join(str(e).split())
        if detail.startswith("Signature mismatch"):
            raise ArtifactError(f"{path}: files changed after signing ({_mismatch_summary(detail)}); restore them, "
                                f"or re-sign the artifact with `inferforge sign {path} --key PRIVATE.pem`") from None
        if detail.startswith("Key mismatch"):
            raise ArtifactError(f"{path}: {SIGNATURE_NAME} was made with another key than {public_key}; get the "
                                "signer's public key, or re-sign the artifact") from None
        raise ArtifactError(f"{path}: {SIGNATURE_NAME} is not a valid signature ({detail[:200] or type(e).__name__}); "
                            f"re-sign the artifact with `inferforge sign {path} --key PRIVATE.pem`") from None
    return manifest
