"""Where checkpoints come from, and failing fast with the fix when they cannot be had."""

import json
import socket

import pytest

from pipeline.config import ModelConfig, StorageConfig
from pipeline.model_source import ModelUnavailable, check_model, materialize


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_hub_fails_at_once_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelUnavailable) as err:
        check_model(ModelConfig(name="openbmb/MiniCPM-V-4.6", cache_dir=str(tmp_path)), StorageConfig())
    msg = str(err.value)
    assert "openbmb/MiniCPM-V-4.6" in msg and "unreachable" in msg
    assert "model.name=/models/" in msg and "s3://" in msg and "MODEL=tiny" in msg


def test_local_dir_without_config(tmp_path):
    with pytest.raises(ModelUnavailable, match="config.json not found"):
        check_model(ModelConfig(name=str(tmp_path)), StorageConfig())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "minicpmv4_6"}))
    assert check_model(ModelConfig(name=str(tmp_path)), StorageConfig())["model_type"] == "minicpmv4_6"
    assert materialize(ModelConfig(name=str(tmp_path)), StorageConfig()) == tmp_path


def test_tiny_is_built_once_per_cache(tmp_path):
    cfg = ModelConfig(name="tiny", cache_dir=str(tmp_path))
    assert check_model(cfg, StorageConfig()) == {"model_type": "minicpmv4_6"}
    first = materialize(cfg, StorageConfig())
    stamp = (first / "config.json").stat().st_mtime_ns
    assert materialize(cfg, StorageConfig()) == first and (first / "config.json").stat().st_mtime_ns == stamp
    assert (first / ".complete").exists()


def test_s3_prefix_missing_says_so(s3_server, s3_bucket):
    from pipeline.config import S3Config

    storage = StorageConfig(s3=S3Config(endpoint_url=s3_server.endpoint_url, access_key_id=s3_server.access_key,
                                        secret_access_key=s3_server.secret_key))
    with pytest.raises(ModelUnavailable) as err:
        check_model(ModelConfig(name=f"s3://{s3_bucket}/models/none"), storage)
    assert "config.json" in str(err.value) and s3_server.secret_key not in str(err.value)


def test_s3_checkpoint_is_downloaded_once(s3_server, s3_bucket, tmp_path):
    from pipeline.config import S3Config
    from pipeline.tiny import build_tiny

    src = build_tiny("minicpmv4_6", tmp_path / "src")
    import s3fs

    fs = s3fs.S3FileSystem(key=s3_server.access_key, secret=s3_server.secret_key,
                           client_kwargs={"endpoint_url": s3_server.endpoint_url})
    fs.put(str(src) + "/", f"{s3_bucket}/models/tiny46/", recursive=True)
    storage = StorageConfig(s3=S3Config(endpoint_url=s3_server.endpoint_url, access_key_id=s3_server.access_key,
                                        secret_access_key=s3_server.secret_key))
    cfg = ModelConfig(name=f"s3://{s3_bucket}/models/tiny46", cache_dir=str(tmp_path / "cache"))
    assert check_model(cfg, storage)["model_type"] == "minicpmv4_6"
    local = materialize(cfg, storage)
    assert (local / "config.json").exists() and (local / "model.safetensors").exists()
    assert materialize(cfg, storage) == local  # cached: no second download
