"""Job configuration: validation, overrides, env interpolation, the shipped job files."""

from pathlib import Path

import pytest

from pipeline.config import ConfigError, JobConfig, load_job, load_job_data

JOBS = Path(__file__).resolve().parents[2] / "jobs"
MINIMAL = {"input": {"uris": ["data/"]}, "output": {"uri": "out"}}


def test_minimal_job_gets_defaults():
    job = load_job_data(MINIMAL)
    assert job.model.name == "openbmb/MiniCPM-V-4.6"
    assert [t.name for t in job.tasks] == ["ocr"]
    assert job.model.trust_remote_code is False


@pytest.mark.parametrize("path", sorted(JOBS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_job_files_validate(path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    job = load_job(path)
    assert isinstance(job, JobConfig)


def test_unknown_field_names_its_path():
    with pytest.raises(ConfigError) as err:
        load_job_data({**MINIMAL, "engine": {"batch_sise": 4}})
    assert "engine.batch_sise" in str(err.value) and "unknown field" in str(err.value)


def test_bad_literal_says_what_is_allowed():
    with pytest.raises(ConfigError) as err:
        load_job_data({**MINIMAL, "tasks": [{"name": "translate"}]})
    msg = str(err.value)
    assert "tasks.0.name" in msg and "'ocr'" in msg and "translate" in msg


def test_missing_inputs_fail_with_the_fix():
    with pytest.raises(ConfigError) as err:
        load_job_data({"input": {}, "output": {"uri": "o"}})
    assert "input.uris" in str(err.value) and "input.manifest" in str(err.value)


def test_duplicate_tasks_rejected():
    with pytest.raises(ConfigError, match="repeated: ocr"):
        load_job_data({**MINIMAL, "tasks": [{"name": "ocr"}, {"name": "ocr"}]})


def test_overrides_types_and_lists():
    job = load_job_data({**MINIMAL, "tasks": [{"name": "ocr"}]}, ["engine.batch_size=8", "model.use_image_id=false", "tasks.0.max_new_tokens=7",
                                  "input.uris=[a/, b/]", "model.name=tiny"])
    assert job.engine.batch_size == 8 and job.model.use_image_id is False
    assert job.tasks[0].max_new_tokens == 7 and job.input.uris == ["a/", "b/"] and job.model.name == "tiny"


def test_override_errors_are_clear():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_job_data(MINIMAL, ["engine.batch_size"])
    with pytest.raises(ConfigError, match="has no item 3"):
        load_job_data(MINIMAL, ["tasks.3.name=ocr"])
    with pytest.raises(ConfigError, match="engine.replicas"):
        load_job_data(MINIMAL, ["engine.replicas=0"])


def test_env_interpolation_and_secret_masking(monkeypatch):
    monkeypatch.setenv("MY_SECRET", "hunter2-very-secret")
    job = load_job_data({**MINIMAL, "storage": {"s3": {"secret_access_key": "${MY_SECRET}",
                                                         "endpoint_url": "${NOPE_UNSET:-}"}}})
    assert job.storage.s3.secret_access_key.get_secret_value() == "hunter2-very-secret"
    assert job.storage.s3.endpoint_url is None
    dumped = job.model_dump_json()
    assert "hunter2" not in dumped and "hunter2" not in repr(job)


def test_missing_env_var_names_it(monkeypatch):
    monkeypatch.delenv("CPMV_TEST_UNSET", raising=False)
    with pytest.raises(ConfigError, match=r"storage.s3.access_key_id: environment variable CPMV_TEST_UNSET"):
        load_job_data({**MINIMAL, "storage": {"s3": {"access_key_id": "${CPMV_TEST_UNSET}"}}})


def test_dpi_order_checked():
    with pytest.raises(ConfigError, match="min_dpi"):
        load_job_data({**MINIMAL, "pdf": {"min_dpi": 400, "max_dpi": 300}})


def test_job_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_job(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(bad)
