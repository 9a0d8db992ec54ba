"""Checks on the output location that run before any work: the bucket exists and is ours to write.

The URI itself is normalised or refused when the job is loaded (`config.normalize_output_uri`);
this module asks the store, once, at the start of a run, so that a typo in a bucket name, a missing
bucket or refused credentials end the run in seconds instead of after listing the inputs (object
stores such as SeaweedFS and MinIO create a bucket on the first write, so without this check a typo
would silently make a new bucket).
"""

from __future__ import annotations

import logging

from pipeline import storage
from pipeline.config import ConfigError, OutputConfig, StorageConfig

log = logging.getLogger(__name__)


def check_output(out: OutputConfig, st: StorageConfig) -> None:
    """Raise ConfigError when `out.uri`'s bucket is missing (unless `out.create_bucket`, which creates
    it); PermissionError / botocore's NoCredentialsError pass through when the store refuses us.

    Local outputs need no check: their directories are created on the first write.
    """
    protocol, _ = storage.split_uri(out.uri)
    if protocol == "file":
        return
    fs, path = storage.get_fs(out.uri, st)
    bucket = path.split("/", 1)[0]
    try:
        fs.info(bucket)  # one HEAD request; a listing of the bucket could page through millions of keys
        return
    except FileNotFoundError:
        pass
    except PermissionError as err:
        raise PermissionError(f"{protocol}://{bucket}: {storage.redact(err, st)}") from None
    if not out.create_bucket:
        raise ConfigError(f"output.uri {storage.redact(out.uri)}: bucket {bucket!r} does not exist: create it, "
                          "or set output.create_bucket: true to have the run create it")
    log.info("creating output bucket %s (output.create_bucket)", bucket)
    fs.mkdir(bucket)
