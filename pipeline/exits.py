"""What `cpmv` prints and returns when a command ends in an error: one `cpmv: ...` line, one status.

Every exception that reaches the CLI is turned into a message and an exit status here, so a user
sees one line (the traceback only with `--debug`) and a script can tell the kinds of failure apart.
Messages pass through `storage.redact`, so a credential inside an exception never reaches stderr.

Exit statuses (also in the README, "Exit statuses"):

    0    the command succeeded (a run: every source done; rows may still hold input errors)
    1    a run ended with status `failed` (the pipeline broke; published sources stay)
    2    usage or job error: bad flags, YAML, a field, a missing model, output prefix busy
    3    inputs not found: no file matches `input.uris`, the manifest is missing
    4    storage error: credentials absent or refused, bucket missing, endpoint unreachable
    5    the Ray cluster (`ray.address` / RAY_ADDRESS) cannot be reached
    70   internal error (a bug): the message asks for `--debug` and a report
    130  interrupted by SIGINT (Ctrl-C); 143 by SIGTERM
    141  stdout was closed by its reader (`cpmv inspect ... | head`), as SIGPIPE would give
"""

from __future__ import annotations

OK, RUN_FAILED, USAGE, INPUTS, STORAGE, CLUSTER, INTERNAL, SIGINT = 0, 1, 2, 3, 4, 5, 70, 130


class ClusterUnreachable(ConnectionError):
    """The configured Ray address does not answer (raised before `ray.init`, within seconds)."""


def _is_botocore(err: BaseException, *names: str) -> bool:
    # botocore is optional at import time (it comes with s3fs); compare by class name along the MRO.
    return any(c.__module__.startswith(("botocore", "aiobotocore")) and c.__name__ in names
               for c in type(err).__mro__)


_CREDENTIALS_HINT = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or storage.s3.access_key_id/"
                     "secret_access_key), or run where a role provides them (IRSA, instance profile)")


def describe(err: BaseException) -> tuple[int, str]:
    """(exit status, message without the `cpmv: ` prefix) for an exception that ended a command."""
    # Interrupts first, importing nothing: Ctrl-C may have left a module of ours half imported.
    if _interrupted(err):
        return SIGINT, "interrupted; the next run rolls forward or redoes what this one left"
    from pipeline.config import ConfigError
    from pipeline.storage import redact

    text = redact(err)
    if isinstance(err, ConfigError):
        return USAGE, text
    if isinstance(err, ClusterUnreachable) or _ray_connect_error(err):
        return CLUSTER, text
    if _is_botocore(err, "NoCredentialsError", "PartialCredentialsError", "NoAuthTokenError"):
        return STORAGE, f"no S3 credentials found: {_CREDENTIALS_HINT}"
    if _is_botocore(err, "EndpointConnectionError", "ConnectTimeoutError"):
        return STORAGE, f"cannot reach the S3 endpoint ({text}): check storage.s3.endpoint_url / AWS_ENDPOINT_URL"
    if isinstance(err, PermissionError) or _is_botocore(err, "ClientError"):
        return STORAGE, f"storage refused the request ({text}): check the credentials ({_CREDENTIALS_HINT})"
    if isinstance(err, FileNotFoundError):
        return INPUTS, text
    if isinstance(err, OSError):
        return STORAGE, f"storage error: {text}"
    if type(err).__name__ == "ModelUnavailable" or isinstance(err, ValueError):
        return USAGE, text
    return INTERNAL, (f"internal error: {type(err).__name__}: {text} (run again with --debug for the traceback, "
                      "and please report it)")


def _ray_connect_error(err: BaseException) -> bool:
    """Ray's own 'no cluster at this address' errors (a ConnectionError raised from ray's modules)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return isinstance(err, ConnectionError) and where.startswith("ray")


def _interrupted(err: BaseException) -> bool:
    """Ctrl-C, also when a library wrapped the KeyboardInterrupt (Python 3.11 wraps exceptions raised
    while a class is created, e.g. during a pydantic import, in RuntimeError)."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, KeyboardInterrupt):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False
