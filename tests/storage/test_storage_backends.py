"""Both backends pass the same contract; S3-specific behaviour against a real moto server."""

from __future__ import annotations

import hashlib
import logging
import os

import pytest

from kubetune.runtime.storage import (
    LocalStorage,
    StorageError,
    StorageNotFoundError,
    open_storage,
)

from .support import TEST_KEY_ID, TEST_SECRET, free_port, make_bucket

# --- contract: both backends ---------------------------------------------------------------


def test_text_roundtrip_and_exists(storage):
    assert not storage.exists("a/b.txt")
    assert storage.stat("a/b.txt") is None
    storage.write_text("a/b.txt", "héllo\n")
    assert storage.exists("a/b.txt")
    assert storage.read_text("a/b.txt") == "héllo\n"
    assert storage.stat("a/b.txt").size == len("héllo\n".encode())
    storage.write_text("a/b.txt", "second")  # overwrite
    assert storage.read_text("a/b.txt") == "second"


def test_read_missing_object_is_not_found(storage, tmp_path):
    with pytest.raises(StorageNotFoundError) as e:
        storage.read_text("nope/LATEST")
    assert "nope/LATEST" in str(e.value)
    with pytest.raises(StorageNotFoundError):
        storage.get_file("nope/x.bin", tmp_path / "x.bin")


def test_file_roundtrip(storage, tmp_path):
    src = tmp_path / "src.bin"
    data = os.urandom(300_000)
    src.write_bytes(data)
    assert storage.put_file(src, "blobs/x.bin") == len(data)
    out = storage.get_file("blobs/x.bin", tmp_path / "deep" / "out.bin")
    assert out.read_bytes() == data


def test_put_dir_list_and_get_prefix(storage, tmp_path):
    src = tmp_path / "tree"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.txt").write_text("bb")
    (src / "sub" / "deeper" / "c.txt").write_text("ccc")
    written = storage.put_dir(src, "run/ckpt")
    assert sorted(o.key for o in written) == ["run/ckpt/a.txt", "run/ckpt/sub/b.txt",
                                              "run/ckpt/sub/deeper/c.txt"]
    listed = storage.list("run/ckpt")
    assert [(o.key, o.size) for o in listed] == [("run/ckpt/a.txt", 1), ("run/ckpt/sub/b.txt", 2),
                                                 ("run/ckpt/sub/deeper/c.txt", 3)]
    assert storage.list_dirs("run") == ["ckpt"]
    assert storage.list_dirs("run/ckpt") == ["sub"]
    dst = tmp_path / "copy"
    storage.get_prefix("run/ckpt", dst)
    assert (dst / "sub" / "deeper" / "c.txt").read_text() == "ccc"
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file()) == \
        ["a.txt", "sub/b.txt", "sub/deeper/c.txt"]
    with pytest.raises(StorageNotFoundError):
        storage.get_prefix("run/none", tmp_path / "none")


def test_prefixes_have_folder_semantics(storage):
    for name in ("checkpoint-1", "checkpoint-10", "checkpoint-100"):
        storage.write_text(f"c/{name}/f", name)
    assert [o.key for o in storage.list("c/checkpoint-1")] == ["c/checkpoint-1/f"]
    assert storage.delete_prefix("c/checkpoint-1") == 1
    assert [o.key for o in storage.list("c")] == ["c/checkpoint-10/f", "c/checkpoint-100/f"]
    assert storage.list_dirs("c") == ["checkpoint-10", "checkpoint-100"]


def test_delete(storage):
    storage.write_text("x/1", "1")
    storage.delete("x/1")
    storage.delete("x/1")  # missing is fine
    assert not storage.exists("x/1")
    with pytest.raises(ValueError):
        storage.delete_prefix("")  # never the whole root
    with pytest.raises(ValueError):
        storage.delete_prefix("/")


def test_keys_cannot_escape_the_root(storage):
    for bad in ("../x", "a/../../x", "", "a//b", "./a"):
        with pytest.raises(ValueError):
            storage.write_text(bad, "x")


def test_url_and_check(storage):
    assert storage.uri.endswith("/")
    assert storage.url("a/b") == storage.uri + "a/b"
    storage.check()  # reachable, bucket exists / folder writable


# --- factory ---------------------------------------------------------------------------------


def test_open_storage_uri_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert isinstance(open_storage("rel/dir"), LocalStorage)
    assert open_storage("rel/dir").root == tmp_path / "rel" / "dir"
    assert open_storage(f"file://{tmp_path}/x").root == tmp_path / "x"
    s3 = open_storage("s3://bkt/some/prefix/", endpoint="http://127.0.0.1:1")
    assert s3.uri == "s3://bkt/some/prefix/"
    assert open_storage("s3://bkt").uri == "s3://bkt/"
    with pytest.raises(StorageError, match="unsupported storage URI"):
        open_storage("gs://bkt/x")
    with pytest.raises(StorageError, match="invalid S3 URI"):
        open_storage("s3:///nobucket")
    with pytest.raises(StorageError, match="endpoint"):
        open_storage("s3://bkt", endpoint="minio:9000")
    with pytest.raises(ValueError, match="addressing_style"):
        open_storage("s3://bkt", addressing_style="dns")


# --- S3 specifics ----------------------------------------------------------------------------


def test_multipart_upload_of_large_file(moto_server, bucket, tmp_path):
    store = open_storage(f"s3://{bucket}/big", endpoint=moto_server.endpoint)
    src = tmp_path / "model.safetensors"
    data = os.urandom(17 * 1024 * 1024 + 123)  # > the 16 MiB multipart threshold
    src.write_bytes(data)
    store.put_file(src, "model.safetensors")
    info = store.stat("model.safetensors")
    assert info.size == len(data)
    # A multipart object's ETag is "<md5 of part md5s>-<number of parts>".
    assert info.etag.endswith("-2"), info.etag
    out = store.get_file("model.safetensors", tmp_path / "back.bin")
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()


def test_small_file_is_single_part(moto_server, bucket, tmp_path):
    store = open_storage(f"s3://{bucket}", endpoint=moto_server.endpoint)
    src = tmp_path / "small"
    src.write_bytes(b"x" * 1000)
    store.put_file(src, "small")
    assert "-" not in store.stat("small").etag


def test_missing_bucket_is_a_clear_error(moto_server, tmp_path):
    store = open_storage("s3://no-such-bucket-kt/jobs/a", endpoint=moto_server.endpoint)
    src = tmp_path / "f"
    src.write_text("x")
    calls = [store.check, lambda: store.write_text("LATEST", "x"),
             lambda: store.put_file(src, "f"), lambda: store.read_text("LATEST"),
             lambda: store.stat("LATEST"), lambda: store.list("")]
    for call in calls:
        with pytest.raises(StorageError) as e:
            call()
        msg = str(e.value)
        assert "'no-such-bucket-kt' does not exist" in msg, msg
        assert moto_server.endpoint in msg
        assert not isinstance(e.value, StorageNotFoundError)
        assert e.value.retryable is False and e.value.exit_code == 42


def test_unreachable_endpoint_is_a_clear_retryable_error():
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = open_storage("s3://bkt/x", endpoint=endpoint, max_attempts=1, connect_timeout=1)
    with pytest.raises(StorageError) as e:
        store.write_text("LATEST", "x")
    assert f"cannot reach the S3 endpoint {endpoint}" in str(e.value)
    assert "s3://bkt/x/LATEST" in str(e.value)
    assert e.value.retryable is True


def test_a_local_disk_error_is_retryable_not_bad_input(moto_server, bucket, tmp_path):
    """A download that cannot be written (here: a folder stands where the file goes; in the wild
    a full disk, or a scratch folder emptied meanwhile) is the pod's disk, not the user's input:
    the stage fails with a retry, not with exit 42."""
    store = open_storage(f"s3://{bucket}", endpoint=moto_server.endpoint)
    store.write_text("ckpt/README.md", "hello")
    blocked = tmp_path / "README.md"
    (blocked / "not-empty").mkdir(parents=True)
    with pytest.raises(StorageError) as e:
        store.get_file("ckpt/README.md", blocked)
    assert "local I/O error while trying to" in str(e.value) and "ckpt/README.md" in str(e.value)
    assert e.value.retryable is True and e.value.exit_code != 42


def test_endpoint_userinfo_never_shown():
    endpoint = f"http://user:hunter2@127.0.0.1:{free_port()}"
    store = open_storage("s3://bkt", endpoint=endpoint, max_attempts=1, connect_timeout=1)
    assert "hunter2" not in repr(store)
    with pytest.raises(StorageError) as e:
        store.check()
    assert "hunter2" not in str(e.value)


@pytest.fixture(scope="module")
def auth_server(start_moto_server):
    """A moto server that checks signatures: an IAM user with a key is created while auth is
    still off, then `/moto-api/reset-auth 0` turns authentication on for every request."""
    server = start_moto_server()
    import boto3

    iam = boto3.client("iam", endpoint_url=server.endpoint, region_name="us-east-1",
                       aws_access_key_id=TEST_KEY_ID, aws_secret_access_key=TEST_SECRET)
    iam.create_user(UserName="trainer")
    iam.put_user_policy(UserName="trainer", PolicyName="all", PolicyDocument=(
        '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}'))
    key = iam.create_access_key(UserName="trainer")["AccessKey"]
    bucket = make_bucket(server.endpoint)
    server.moto_api("reset-auth", b"0")
    return server, bucket, key["AccessKeyId"], key["SecretAccessKey"]


def test_wrong_credentials_are_a_clear_error(auth_server, tmp_path, monkeypatch, caplog):
    server, bucket, key_id, secret = auth_server
    caplog.set_level(logging.DEBUG, logger="kubetune")
    # The right key works: authentication is really on, so the failures below are real.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    good = open_storage(f"s3://{bucket}/x", endpoint=server.endpoint)
    good.write_text("ok", "1")
    assert good.read_text("ok") == "1"

    wrong_secret = "WRONG" + secret[5:]
    for kid, sec in ((key_id, wrong_secret), ("AKIAUNKNOWNKEY000000", TEST_SECRET)):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", kid)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", sec)
        bad = open_storage(f"s3://{bucket}/x", endpoint=server.endpoint)
        for call in (bad.check, lambda: bad.write_text("ok", "2"), lambda: bad.read_text("ok")):
            with pytest.raises(StorageError) as e:
                call()
            msg = str(e.value)
            assert "rejected the credentials" in msg, msg
            assert "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY environment variables" in msg
            assert sec not in msg and kid not in msg
            assert e.value.retryable is False
    assert secret not in caplog.text and wrong_secret not in caplog.text


def test_credentials_from_secret_directory(auth_server, tmp_path, monkeypatch):
    server, bucket, key_id, secret = auth_server
    secret_dir = tmp_path / "s3-secret"
    secret_dir.mkdir()
    (secret_dir / "accessKeyId").write_text(key_id + "\n")
    (secret_dir / "secretAccessKey").write_text(secret + "\n")
    # The env holds credentials the server rejects: success proves the directory won.
    monkeypatch.setenv("KUBETUNE_S3_CREDENTIALS_DIR", str(secret_dir))
    store = open_storage(f"s3://{bucket}", endpoint=server.endpoint)
    store.write_text("hello", "world")
    assert store.read_text("hello") == "world"
    assert secret not in repr(store)

    # A wrong secret in the directory: the message names the directory, not the value.
    (secret_dir / "secretAccessKey").write_text("not-the-secret")
    with pytest.raises(StorageError) as e:
        open_storage(f"s3://{bucket}", endpoint=server.endpoint).check()
    assert f"the Secret files in {secret_dir}" in str(e.value)
    assert "not-the-secret" not in str(e.value)

    # A missing key file is named.
    (secret_dir / "secretAccessKey").unlink()
    with pytest.raises(StorageError, match="secretAccessKey"):
        open_storage(f"s3://{bucket}", endpoint=server.endpoint)


def test_credentials_dir_argument_missing(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        open_storage("s3://b", credentials_dir=tmp_path / "missing")


def test_addressing_style_reaches_the_requests():
    # *.localhost does not resolve here, so the request fails; the URL it was sent to shows
    # where the bucket went (botocore's own before-send event; nothing is faked).
    port = free_port()
    urls = {}
    for style in ("virtual", "path"):
        store = open_storage("s3://kt-virt/p", endpoint=f"http://localhost:{port}",
                             addressing_style=style, max_attempts=1, connect_timeout=1)

        def record(request, style=style, **kw):
            urls.setdefault(style, request.url)  # returns None: the request goes ahead

        store.client.meta.events.register("before-send", record)
        with pytest.raises(StorageError):
            store.write_text("k", "v")
    assert urls["virtual"] == f"http://kt-virt.localhost:{port}/p/k"
    assert urls["path"] == f"http://localhost:{port}/kt-virt/p/k"
