"""`inferforge sign` and signature verification with OpenSSF model-signing (key pairs made here, no network)."""

import json
import os
import socket

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

import inferforge
from inferforge.cli import main
from inferforge.errors import ArtifactError, UserInputError
from inferforge.manifest import SIGNATURE_NAME, verify_artifact, write_manifest
from inferforge.signing import sign_artifact, verify_signature


def write_key_pair(directory, name="key"):
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = directory / f"{name}-private.pem", directory / f"{name}-public.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture
def keys(tmp_path):
    return write_key_pair(tmp_path)


@pytest.fixture
def artifact(tmp_path):
    d = tmp_path / "artifact"
    (d / "sub").mkdir(parents=True)
    (d / "model.onnx").write_bytes(os.urandom(2048))
    (d / "sub" / "vocab.txt").write_text("a\nb\n")
    write_manifest(d, {"name": "t", "kind": "sentence-encoder", "passed": True, "accuracy_passed": True})
    return d


@pytest.fixture(scope="module")
def export_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny-onnx"
    assert main(["export", "tests.factories:tiny_bert", "--output", str(out), "-q", "--name", "tiny",
                 "--calibration-size", "8", "--held-out-size", "8"]) == 0
    return out


def test_sign_then_load_and_inspect_verify(export_artifact, tmp_path, keys, capsys):
    private, public = keys
    assert main(["sign", str(export_artifact), "--key", str(private)]) == 0
    assert f"signed: {export_artifact / SIGNATURE_NAME}" in capsys.readouterr().out
    bundle = json.loads((export_artifact / SIGNATURE_NAME).read_text())
    assert bundle["verificationMaterial"]["publicKey"]["hint"] and bundle["dsseEnvelope"]["signatures"]
    verify_artifact(export_artifact)                                   # the signature is not "a file not in manifest"
    model = inferforge.load(export_artifact, verify_signature=public)
    assert model(["a sentence"]).shape == (1, 64)
    assert main(["inspect", str(export_artifact), "--verify-signature", str(public)]) == 0
    assert "signature verified" in capsys.readouterr().out
    assert main(["inspect", str(export_artifact)]) == 0
    assert "signed (model.sig), not verified" in capsys.readouterr().out


def test_signature_covers_every_file_and_the_manifest(artifact, keys):
    private, public = keys
    sign_artifact(artifact, private)
    payload = json.loads((artifact / SIGNATURE_NAME).read_text())["dsseEnvelope"]["payload"]
    import base64

    statement = json.loads(base64.b64decode(payload))
    signed = {s["name"] for s in statement["predicate"]["resources"]}
    assert signed == {"manifest.json", "model.onnx", "sub/vocab.txt"}
    assert verify_signature(artifact, public)["name"] == "t"


def test_file_changed_after_signing_is_refused(artifact, keys, capsys):
    private, public = keys
    sign_artifact(artifact, private)
    (artifact / "model.onnx").write_bytes(os.urandom(2048))
    write_manifest(artifact, {"name": "t", "kind": "sentence-encoder", "passed": True, "accuracy_passed": True})
    verify_artifact(artifact)                                          # consistent hashes: only the signature can tell
    with pytest.raises(ArtifactError, match=r"files changed after signing \(changed: manifest.json, model.onnx\); "
                                            r"restore them, or re-sign"):
        verify_signature(artifact, public)
    assert main(["inspect", str(artifact), "--verify-signature", str(public)]) == 2
    err = capsys.readouterr().err
    assert "files changed after signing" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_added_file_after_signing_is_refused(artifact, keys):
    private, public = keys
    sign_artifact(artifact, private)
    (artifact / "extra.bin").write_bytes(b"x")
    write_manifest(artifact, {"name": "t", "kind": "sentence-encoder", "passed": True, "accuracy_passed": True})
    with pytest.raises(ArtifactError, match=r"changed: manifest.json; added: extra.bin"):
        verify_signature(artifact, public)


def test_missing_signature_and_other_key_are_refused(artifact, keys, tmp_path):
    private, public = keys
    with pytest.raises(ArtifactError, match=r"not signed \(no model.sig\); sign it with `inferforge sign"):
        verify_signature(artifact, public)
    with pytest.raises(ArtifactError, match="not signed"):
        inferforge.load(artifact, verify_signature=public)
    sign_artifact(artifact, private)
    _, other_public = write_key_pair(tmp_path, "other")
    with pytest.raises(ArtifactError, match="was made with another key"):
        verify_signature(artifact, other_public)


def test_damaged_or_forged_signature_is_refused(artifact, keys, tmp_path):
    private, public = keys
    signature = sign_artifact(artifact, private)
    bundle = json.loads(signature.read_text())
    other_private, _ = write_key_pair(tmp_path, "other")
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(artifact, copy)
    sign_artifact(copy, other_private)
    forged = json.loads((copy / SIGNATURE_NAME).read_text())
    forged["verificationMaterial"] = bundle["verificationMaterial"]   # claims the right key, signed by another one
    signature.write_text(json.dumps(forged))
    with pytest.raises(ArtifactError, match="does not verify with"):
        verify_signature(artifact, public)
    signature.write_text("not json")
    with pytest.raises(ArtifactError, match="model.sig is not a valid signature"):
        verify_signature(artifact, public)


def test_resigning_replaces_the_signature(artifact, keys, tmp_path):
    private, public = keys
    sign_artifact(artifact, private)
    other_private, other_public = write_key_pair(tmp_path, "other")
    sign_artifact(artifact, other_private)                            # the old model.sig is not signed over
    verify_signature(artifact, other_public)
    assert sorted(p.name for p in artifact.iterdir()) == ["manifest.json", "model.onnx", SIGNATURE_NAME, "sub"]


def test_a_tampered_artifact_is_not_signed(artifact, keys):
    private, _ = keys
    (artifact / "model.onnx").write_bytes(b"changed")
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        sign_artifact(artifact, private)
    assert not (artifact / SIGNATURE_NAME).exists()


def _rsa_key(tmp_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "rsa.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _encrypted_key(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "encrypted.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(b"secret")))
    return path


@pytest.mark.parametrize("make_key, message", [
    (lambda t, k: t / "nope.pem", "no such file; give the PEM file"),
    (lambda t, k: t, "no such file"),
    (lambda t, k: (t / "text.pem").write_text("hello") and t / "text.pem", "not a PEM private key; make a key pair"),
    (lambda t, k: k[1], "not a PEM private key (this is a public key: give the private one)"),
    (lambda t, k: _rsa_key(t), "not an elliptic-curve key"),
    (lambda t, k: _encrypted_key(t), "the key is encrypted"),
])
def test_bad_signing_key_is_a_one_line_error(artifact, keys, tmp_path, capsys, make_key, message):
    key = make_key(tmp_path, keys)
    assert main(["sign", str(artifact), "--key", str(key)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (artifact / SIGNATURE_NAME).exists()


@pytest.mark.parametrize("make_key, message", [
    (lambda t, k: t / "nope.pem", "no such file"),
    (lambda t, k: k[0], "not a PEM public key (this is a private key: give the public one)"),
    (lambda t, k: (t / "text.pem").write_text("hello") and t / "text.pem", "not a PEM public key"),
])
def test_bad_public_key_is_a_one_line_error(artifact, keys, tmp_path, capsys, make_key, message):
    sign_artifact(artifact, keys[0])
    key = make_key(tmp_path, keys)
    assert main(["inspect", str(artifact), "--verify-signature", str(key)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    with pytest.raises(UserInputError, match="public key"):
        inferforge.load(artifact, verify_signature=key)


def test_signing_and_verifying_use_no_network(artifact, keys, monkeypatch):
    private, public = keys

    def no_network(*args, **kwargs):
        raise AssertionError("network access during signing or verification")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    sign_artifact(artifact, private)
    verify_signature(artifact, public)


def test_interrupted_signing_keeps_the_earlier_signature(artifact, keys, tmp_path, monkeypatch):
    private, public = keys
    before = sign_artifact(artifact, private).read_bytes()
    other_private, _ = write_key_pair(tmp_path, "other")

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sign_artifact(artifact, other_private)
    monkeypatch.undo()
    assert (artifact / SIGNATURE_NAME).read_bytes() == before          # the old signature, whole
    assert sorted(p.name for p in artifact.iterdir()) == ["manifest.json", "model.onnx", SIGNATURE_NAME, "sub"]
    verify_signature(artifact, public)
