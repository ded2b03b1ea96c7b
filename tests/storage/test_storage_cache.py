"""Fetch-to-cache of s3:// inputs against a real moto server."""

from __future__ import annotations

import hashlib
import logging

import pytest

from kubetune.runtime.storage import (
    StorageError,
    StorageIntegrityError,
    StorageNotFoundError,
    fetch_to_cache,
)

from .support import boto_client


@pytest.fixture
def put(moto_server, bucket):
    client = boto_client(moto_server.endpoint)

    def put(key: str, body: bytes) -> None:
        client.put_object(Bucket=bucket, Key=key, Body=body)

    put.delete = lambda key: client.delete_object(Bucket=bucket, Key=key)
    return put


@pytest.fixture
def fetch(moto_server, tmp_path):
    def fetch(uri, **kw):
        return fetch_to_cache(uri, cache_dir=tmp_path / "cache", endpoint=moto_server.endpoint,
                              **kw)
    return fetch


def ident(path):
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_object_is_downloaded_once_and_again_when_it_changes(put, fetch, bucket, tmp_path):
    put("datasets/identity.json", b'[{"instruction": "hi"}]')
    path = fetch(f"s3://{bucket}/datasets/identity.json")
    assert path == tmp_path / "cache" / "s3" / bucket / "datasets" / "identity.json"
    assert path.read_bytes() == b'[{"instruction": "hi"}]'
    first = ident(path)

    assert fetch(f"s3://{bucket}/datasets/identity.json") == path
    assert ident(path) == first  # cache hit: not rewritten

    put("datasets/identity.json", b'[{"instruction": "yo"}]')  # same size, new content
    assert fetch(f"s3://{bucket}/datasets/identity.json").read_bytes() == \
        b'[{"instruction": "yo"}]'
    assert ident(path) != first


def test_damaged_cached_copy_is_replaced(put, fetch, bucket):
    put("d/x.bin", b"0123456789" * 100)
    path = fetch(f"s3://{bucket}/d/x.bin")
    path.write_bytes(b"truncated")  # size differs: always detected
    assert fetch(f"s3://{bucket}/d/x.bin").read_bytes() == b"0123456789" * 100
    path.write_bytes(b"X" * 1000)  # same size: detected by verify=True (re-hash)
    assert fetch(f"s3://{bucket}/d/x.bin", verify=True).read_bytes() == b"0123456789" * 100


def test_sha256_sidecar_is_checked(put, fetch, bucket, tmp_path):
    body = b"weights" * 1000
    put("m/model.bin", body)
    put("m/model.bin.sha256", (hashlib.sha256(body).hexdigest() + "  model.bin\n").encode())
    assert fetch(f"s3://{bucket}/m/model.bin").read_bytes() == body

    put("m/bad.bin", body)
    put("m/bad.bin.sha256", hashlib.sha256(b"other").hexdigest().encode())
    with pytest.raises(StorageIntegrityError, match="does not match its .sha256 sidecar"):
        fetch(f"s3://{bucket}/m/bad.bin")
    assert not (tmp_path / "cache" / "s3" / bucket / "m" / "bad.bin").exists()


def test_prefix_is_mirrored_into_a_folder(put, fetch, bucket, caplog):
    put("models/tiny/config.json", b"{}")
    put("models/tiny/model.safetensors", b"w" * 5000)
    put("models/tiny/model.safetensors.sha256", hashlib.sha256(b"w" * 5000).hexdigest().encode())
    put("models/tiny/tokenizer/tokenizer.json", b'{"v": 1}')
    put("models/tiny-other/x", b"not part of the prefix")
    folder = fetch(f"s3://{bucket}/models/tiny")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == ["config.json", "model.safetensors", "tokenizer/tokenizer.json"]
    assert fetch(f"s3://{bucket}/models/tiny/") == folder  # trailing slash: same folder
    before = {f: ident(folder / f) for f in files}

    caplog.set_level(logging.INFO, logger="kubetune")
    assert fetch(f"s3://{bucket}/models/tiny") == folder
    assert {f: ident(folder / f) for f in files} == before  # nothing downloaded again
    assert "0 of 3 files downloaded" in caplog.text

    put.delete("models/tiny/tokenizer/tokenizer.json")
    put("models/tiny/config.json", b'{"a": 1}')
    put("models/tiny/generation_config.json", b"{}")
    fetch(f"s3://{bucket}/models/tiny")
    files2 = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files2 == ["config.json", "generation_config.json", "model.safetensors"]
    assert (folder / "config.json").read_bytes() == b'{"a": 1}'
    assert ident(folder / "model.safetensors") == before["model.safetensors"]
    assert not (folder / "tokenizer").exists()


def test_missing_inputs(fetch, moto_server, bucket, tmp_path):
    with pytest.raises(StorageNotFoundError, match="does not exist"):
        fetch(f"s3://{bucket}/nothing/here")
    with pytest.raises(StorageError, match="'kt-no-bucket' does not exist"):
        fetch("s3://kt-no-bucket/data.json")
    local = tmp_path / "local.json"
    local.write_text("[]")
    assert fetch(str(local)) == local  # local inputs are used in place
    assert fetch(local.as_uri()) == local
    with pytest.raises(StorageNotFoundError):
        fetch(str(tmp_path / "missing.json"))
