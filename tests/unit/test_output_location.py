"""Output locations and run ids are checked when the job loads, before any work (issue 15, item 9),
and log records lose their credentials (item 10)."""

from __future__ import annotations

import logging

import pytest

from pipeline.config import ConfigError, load_job_data
from pipeline.logsafe import RedactingFilter

BASE = {"input": {"uris": ["in/"]}}


def out(uri: str) -> str:
    return load_job_data({**BASE, "output": {"uri": uri}}).output.uri


def test_local_paths_are_normalised():
    assert out("out/a/../x") == "out/x"  # today's behaviour created an empty out/a
    assert out("./out/") == "out"
    assert out("../sibling/out") == "../sibling/out"
    assert out("file:///tmp/o/") == "/tmp/o"


@pytest.mark.parametrize("uri, words", [
    ("", "is empty"), ("   ", "is empty"), ("s3://", "names no bucket"), ("s3://b/a/../x", "'..'"),
    ("s3://b/./x", "'..'"), ("s3://b//x", "empty segments"),
])
def test_unsafe_output_uris_are_refused(uri, words):
    with pytest.raises(ConfigError) as err:
        out(uri)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_remote_uri_keeps_its_form():
    assert out("s3://bucket/prefix/") == "s3://bucket/prefix"


@pytest.mark.parametrize("run_id", ["..", ".hidden", "_x", "a/b", "a" * 101, "a b"])
def test_unsafe_run_ids_fail_validation(run_id):
    with pytest.raises(ConfigError) as err:
        load_job_data({**BASE, "output": {"uri": "o"}, "run_id": run_id})
    assert "run_id" in str(err.value)


def test_safe_run_id_passes():
    assert load_job_data({**BASE, "output": {"uri": "o"}, "run_id": "nightly-2026.11_30"}).run_id


def test_redacting_filter_masks_botocore_headers(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEYID1234")
    record = logging.LogRecord(
        "botocore.endpoint", logging.DEBUG, __file__, 1,
        "Sending http request: <AWSPreparedRequest headers=%s>",
        ({"Authorization": b"AWS4-HMAC-SHA256 Credential=AKIAOTHERKEY99/20261130/us-east-1/s3/aws4_request, "
                           b"SignedHeaders=host, Signature=abcdef0123", "X-Amz-Security-Token": b"FQoGZXIvYXdzEJr"},),
        None)
    assert RedactingFilter().filter(record)
    text = record.getMessage()
    assert "AKIAOTHERKEY99" not in text and "abcdef0123" not in text and "FQoGZXIvYXdzEJr" not in text
    assert "Credential=***" in text and "Signature=***" in text
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "key %s", ("AKIAEXAMPLEKEYID1234",), None)
    RedactingFilter().filter(record)
    assert record.getMessage() == "key ***"
