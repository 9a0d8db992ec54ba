"""Credentials given as fsspec options (`storage.options`) are masked wherever the config is shown or
stored: `cpmv validate`, the run record (checked with a real run in tests/integration/test_hostile_run.py),
and the text of errors (`storage.redact`)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from pipeline import storage as st
from pipeline.cli import main
from pipeline.config import MASK, load_job_data, public_dump

SECRETS = {"key": "AKIA-OPTION-KEY-0001", "secret": "option-secret-value-0002", "token": "tok-0003-abcdef",
           "password": "pw-0004-hunter2", "header": "Bearer header-0005", "nested": "sa-private-0006",
           "url": "url-password-0007"}


def job_data(out: str) -> dict:
    return {
        "input": {"uris": ["/tmp/nothing"]}, "output": {"uri": out}, "tasks": [{"name": "ocr", "max_new_tokens": 64}],
        "storage": {"options": {
            "s3": {"key": SECRETS["key"], "secret": SECRETS["secret"], "client_kwargs": {
                "endpoint_url": f"http://user:{SECRETS['url']}@127.0.0.1:1",
                "headers": {"Authorization": SECRETS["header"]}}},
            "gcs": {"token": {"private_key": SECRETS["nested"], "client_email": "svc@example.com"}},
            "sftp": {"password": SECRETS["password"], "host": "example.com"},
            "http": {"client_kwargs": {"auth_token": SECRETS["token"]}},
        }},
    }


def test_public_dump_masks_every_secret_like_option_at_any_depth() -> None:
    dump = public_dump(load_job_data(job_data("/tmp/out")))
    text = json.dumps(dump)
    assert not [name for name, value in SECRETS.items() if value in text]
    opts = dump["storage"]["options"]
    assert opts["s3"]["key"] == opts["s3"]["secret"] == opts["gcs"]["token"] == MASK
    assert opts["s3"]["client_kwargs"]["headers"]["Authorization"] == MASK
    # What is not a credential stays readable, including fields whose names merely contain "token".
    assert opts["sftp"]["host"] == "example.com" and dump["tasks"][0]["max_new_tokens"] == 64
    assert opts["s3"]["client_kwargs"]["endpoint_url"] == "http://***@127.0.0.1:1"


def test_validate_prints_no_secret(tmp_path: Path, capsys) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job_data(str(tmp_path / "out"))))
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr()
    assert MASK in out.out
    leaked = [name for name, value in SECRETS.items() if value in out.out + out.err]
    assert not leaked, leaked


def test_redact_knows_every_option_secret_including_nested_mappings() -> None:
    job = load_job_data(job_data("/tmp/out"))
    text = " | ".join(SECRETS.values())
    redacted = st.redact(text, job.storage)
    assert not [name for name, value in SECRETS.items() if value in redacted and name != "url"]
