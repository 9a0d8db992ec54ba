"""The OpenAI-compatible HTTP engine (`engine.kind: openai`): a `vllm serve` or hosted MiniCPM-V API.

For users who already run a server: the engine loads no weights, it POSTs one
`/v1/chat/completions` request per `Request` and turns the answers into `Reply`s, in input order.

What goes over the wire, per request::

    {"model": <model>, "max_tokens": max_new_tokens, "temperature": temperature,
     "messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},  # one per image
         ...,
         {"type": "text", "text": prompt}]}],
     "mm_processor_kwargs": {...},  # only when the request carries processor options
     "response_format": {"type": "json_schema", ...},  # json_schema / choices tasks (_structured_fields)
     "chat_template_kwargs": {"enable_thinking": true}}  # thinking tasks

* Images are encoded (PNG by default, lossless; `image_format="jpeg"` for smaller bodies) in the
  worker threads, so at most `concurrency` encoded bodies exist at a time.
* **Video**: a clip (`Request.is_video`) is sent as its frames, one `image_url` item per frame, in
  order. The OpenAI API has no frame-list video item, and `video_url` would mean re-encoding the
  frames into a video file (lossy) for the server to decode and re-sample again. So the server
  sees N images, not one clip: each frame is processed like an image with the server's processor
  defaults (slicing, image-id tags), where vLLM's offline engine gives video frames 1 slice and no
  ids. Frames at or below the slice size (448 px) are not sliced
  either way; the prompt-length guard should budget clips as images for this engine.
* **Processor options** (`max_slice_nums`, `use_image_id`, `downsample_mode`) travel in the vLLM
  extension field `mm_processor_kwargs` (vLLM's server accepts extra body parameters). vLLM >= 0.32
  rejects per-request `mm_processor_kwargs` with HTTP 400 unless the server was started with
  `--trust-request-mm-kwargs`; a hosted API may reject or ignore the field. Requests without
  options send no such field and work with any server.
* MiniCPM-V <= 4.5 (vLLM's `minicpmv` model with remote code) needs the server started with
  `--trust-remote-code --chat-template-content-format string` (the default "openai" format renders
  the wrong image placeholder); 4.6+ work with the default. These generations take processor
  options per server only (`--mm-processor-kwargs '{"max_slice_nums": 9}'`): measured with vLLM
  0.32, one request whose `max_slice_nums` differs from the server's kills the server's engine
  (HTTP 500 "EngineCore encountered an issue", then connection refused for everyone). So when
  `family` names such a generation, a request with processor options becomes a ValueError reply
  and is never sent; with `family=None` options are sent as given.

Errors and retries. 429, 408, 5xx, connection errors and timeouts are retried up to `max_retries`
times with exponential backoff and jitter (`backoff_s * 2**attempt`, +-50 %, capped at 60 s; a
`Retry-After` header is honoured up to 300 s); when retries run out the request gets an error
reply (`http_<status>`, `connection_error`, `timeout`). Any other 4xx is that request's error reply
at once: `prompt_too_long` when the server says the context length is exceeded, else
`http_<status>` with the server's message. The API key (read from the environment variable named
by `api_key_env`) is sent as a Bearer token and never logged; every error message is scrubbed of it.

Only `requests` (a dependency of Ray, so present wherever the pipeline runs) and PIL are used, both
imported inside methods; vLLM is not needed on the client side.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from pipeline.engines.base import Engine, Reply, Request, check_stack

log = logging.getLogger(__name__)

_IMAGE_FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"), "jpg": ("JPEG", "image/jpeg"),
                  "webp": ("WEBP", "image/webp")}
_RETRY_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))
_MAX_BACKOFF_S = 60.0
_MAX_RETRY_AFTER_S = 300.0
_MAX_MESSAGE = 2000
# How servers say "the prompt does not fit": vLLM ("This model's maximum context length is N tokens"),
# OpenAI (code "context_length_exceeded"), others ("prompt is too long", "too many input tokens").
_TOO_LONG = re.compile(r"maximum context length|context[ _]length[ _]exceeded|prompt is too long|"
                       r"too many (input )?tokens|input is too long|exceeds the model'?s? context", re.I)


class _Failure(Exception):
    """One attempt's failure: `retry` says whether another attempt may help."""

    def __init__(self, error_type: str, message: str, retry: bool, retry_after: float | None = None):
        super().__init__(message)
        self.error_type, self.message, self.retry, self.retry_after = error_type, message, retry, retry_after


class OpenAIEngine(Engine):
    """MiniCPM-V behind an OpenAI-compatible `/v1/chat/completions` endpoint."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 16,
        timeout_s: float = 600,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        family: str | None = None,
        image_format: str = "png",
    ) -> None:
        """`base_url` is the server root (`http://host:8000`) or its `/v1` root; `model` the name the
        server knows (`--served-model-name`). At most `concurrency` requests are in flight per engine."""
        if not base_url or urlsplit(base_url).scheme not in ("http", "https"):
            raise ValueError(f"base_url must be an http(s) URL, got {_strip_credentials(base_url)!r}")
        if not model:
            raise ValueError("model (the server's model name) is required")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if backoff_s < 0:
            raise ValueError(f"backoff_s must be >= 0, got {backoff_s}")
        if image_format.lower() not in _IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {sorted(_IMAGE_FORMATS)}, got {image_format!r}")
        _check_family_served(family)

        parts = urlsplit(base_url)
        root = parts.path.rstrip("/")
        path = root + ("/chat/completions" if root.endswith("/v1") else "/v1/chat/completions")
        self.base_url = urlunsplit((parts.scheme, parts.netloc, root, parts.query, ""))
        self.url = urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))  # query kept: ?api-version=
        self._shown_url = _strip_credentials(self.url)  # for messages and logs
        self.model = model
        self.family = family
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.timeout_s = float(timeout_s)
        self.max_retries = max_retries
        self.backoff_s = float(backoff_s)
        self.image_format = image_format.lower()
        self._api_key = os.environ.get(api_key_env) or None  # never logged, never in a message
        if self._api_key is None:
            log.info("no API key in $%s: requests go without an Authorization header", api_key_env)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="openai-engine")
        self._local = threading.local()
        self._sessions: list[Any] = []
        self._sessions_lock = threading.Lock()
        self._rng = random.Random()
        self._options_per_request = _takes_request_options(family)

    # -- public API -------------------------------------------------------------------------------

    def generate(self, requests: list[Request]) -> list[Reply]:
        """Answer every request, in input order, with at most `concurrency` in flight.

        Every failure that concerns one request (bad input, HTTP error, retries exhausted) comes
        back as that request's error reply; nothing here raises for a single request.
        """
        if self._pool is None:
            raise RuntimeError("OpenAIEngine is closed")
        futures = [self._pool.submit(self._answer, request) for request in requests]
        return [f.result() for f in futures]

    @property
    def per_request_slices(self) -> bool:
        """Whether a request may carry its own max_slice_nums (the prompt guard's re-slicing needs it).
        False for MiniCPM-V <= 4.5; for 4.6+ the server must also run with --trust-request-mm-kwargs."""
        return self._options_per_request

    def model_info(self) -> dict[str, str]:
        info = {"engine": self.name, "model": self.model, "base_url": _strip_credentials(self.base_url)}
        if self.family:
            info["family"] = self.family
        return info

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

    # -- one request ------------------------------------------------------------------------------

    def _answer(self, request: Request) -> Reply:
        """Worker thread: build the body, POST it with retries, parse the reply. Never raises."""
        try:
            body = self._body(request)
        except Exception as exc:  # noqa: BLE001 - bad input is this request's error
            return Reply(error_type=type(exc).__name__, error_message=self._redact(str(exc) or repr(exc)))
        try:
            return self._post_with_retries(body)
        except Exception as exc:  # noqa: BLE001 - a bug here must not take the batch down
            log.exception("unexpected error in the OpenAI engine")
            return Reply(error_type=type(exc).__name__, error_message=self._redact(str(exc) or repr(exc)))

    def _user_turn(self, images: Any, text: str) -> dict[str, Any]:
        content: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": self._data_url(image)}} for image in images
        ]
        content.append({"type": "text", "text": text})
        return {"role": "user", "content": content}

    def _body(self, request: Request) -> bytes:
        _check_request(request)
        if request.examples and self.family is not None and _one_image_per_prompt(self.family):
            raise ValueError(f"{self.family} takes one image per prompt: few-shot examples with images cannot go "
                             f"before the unit; remove tasks[].examples")
        # Few-shot examples are earlier user/assistant turns; the server's chat template renders them.
        messages: list[dict[str, Any]] = []
        for ex in request.examples:
            messages += [self._user_turn(ex.images, ex.prompt), {"role": "assistant", "content": ex.answer}]
        messages.append(self._user_turn(request.images, request.prompt))
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": int(request.max_new_tokens),
            "temperature": float(request.temperature),
        }
        options = {k: v for k, v in request.processor_kwargs.items() if v is not None}
        if options and not self._options_per_request:
            raise ValueError(
                f"{self.family} through a vLLM server takes processor options per server, not per request "
                f"(a per-request {sorted(options)} kills vLLM's engine): start the server with "
                f"--mm-processor-kwargs '{json.dumps(options)}' and leave them out of the job"
            )
        if options:
            body["mm_processor_kwargs"] = options
        body.update(_structured_fields(request, self.family))
        return json.dumps(body).encode("utf-8")

    def _data_url(self, image: np.ndarray) -> str:
        from PIL import Image

        fmt, mime = _IMAGE_FORMATS[self.image_format]
        buf = io.BytesIO()
        kwargs: dict[str, Any] = {"quality": 95} if fmt in ("JPEG", "WEBP") else {"compress_level": 1}
        Image.fromarray(image).save(buf, format=fmt, **kwargs)
        return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"

    def _post_with_retries(self, body: bytes) -> Reply:
        attempt = 0
        while True:
            try:
                return self._post(body)
            except _Failure as failure:
                if not failure.retry or attempt >= self.max_retries:
                    suffix = f" (after {attempt + 1} attempts)" if failure.retry and attempt else ""
                    return Reply(error_type=failure.error_type,
                                 error_message=self._redact(failure.message + suffix)[:_MAX_MESSAGE])
                delay = self._backoff(attempt, failure.retry_after)
                log.warning("%s from %s, retry %d/%d in %.2fs", failure.error_type, self._shown_url, attempt + 1,
                            self.max_retries, delay)
                time.sleep(delay)
                attempt += 1

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), _MAX_RETRY_AFTER_S)
        # Jitter (+-50 %): requests (and replicas) that failed together do not come back together.
        return min(self.backoff_s * (2**attempt) * self._rng.uniform(0.5, 1.5), _MAX_BACKOFF_S)

    def _post(self, body: bytes) -> Reply:
        """One attempt; raises _Failure on anything that is not a usable completion."""
        import requests

        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        try:
            response = self._session().post(self.url, data=body, headers=headers,
                                             timeout=(min(30.0, self.timeout_s), self.timeout_s))
        except requests.Timeout as exc:
            raise _Failure("timeout", f"no answer from {self._shown_url} within {self.timeout_s:g}s: {type(exc).__name__}",
                           retry=True) from None
        except requests.RequestException as exc:  # connection refused/reset, DNS, TLS, ...
            raise _Failure("connection_error", f"{type(exc).__name__}: {exc}", retry=True) from None

        status = response.status_code
        if not 200 <= status < 300:
            message = _server_message(response)
            if status in _RETRY_STATUSES:
                raise _Failure(f"http_{status}", f"HTTP {status}: {message}", retry=True,
                               retry_after=_retry_after(response.headers.get("Retry-After")))
            error_type = "prompt_too_long" if status in (400, 413, 422) and _TOO_LONG.search(message) else f"http_{status}"
            raise _Failure(error_type, f"HTTP {status}: {message}", retry=False)
        try:
            payload = response.json()
        except ValueError:
            raise _Failure("bad_response", f"response is not JSON: {response.text[:500]!r}", retry=False) from None
        choices = payload.get("choices") if isinstance(payload, dict) else None
        if not choices or not isinstance(choices[0], dict):
            if isinstance(payload, dict) and payload.get("error"):  # an error inside a 200 answer
                message = _error_text(payload["error"])
                raise _Failure("prompt_too_long" if _TOO_LONG.search(message) else "server_error", message,
                               retry=False)
            raise _Failure("bad_response", f"no choices in the response: {response.text[:500]!r}", retry=False)
        choice = choices[0]
        message = choice.get("message") or {}
        text = message.get("content") or ""
        if isinstance(text, list):  # some servers answer with content parts
            text = "".join(part.get("text", "") for part in text if isinstance(part, dict))
        usage = payload.get("usage") or {}
        # vLLM's reasoning parsers (and others) return the thinking apart: `reasoning_content`, `reasoning`.
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        return Reply(
            reasoning=str(reasoning) if reasoning else None,
            text=str(text).strip(),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            finish_reason=choice.get("finish_reason"),
        )

    def _session(self) -> Any:
        """One `requests.Session` per worker thread (keep-alive; sessions are not thread-safe)."""
        session = getattr(self._local, "session", None)
        if session is None:
            import requests

            session = requests.Session()
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def _redact(self, text: str) -> str:
        if self._api_key and self._api_key in text:
            text = text.replace(self._api_key, "***")
        return text


def _check_family_served(family: str | None) -> None:
    """Refuse a generation no OpenAI-compatible vLLM server can serve (MiniCPM-V 2.0: see the
    family's `note`), before any request fails with HTTP 400 on the server."""
    if family is None:
        return
    from pipeline.models import FAMILIES

    spec = FAMILIES.get(family)
    if spec is not None and "openai" not in spec.engines:
        raise ValueError(f"engine openai does not serve {spec.display}: {spec.note or 'see `cpmv models`'}")


def _takes_request_options(family: str | None) -> bool:
    """False for the generations vLLM serves through its `minicpmv` model (MiniCPM-V <= 4.5)."""
    if family is None:
        return True
    from pipeline.models import FAMILIES  # the one table of generations (no heavy imports)

    spec = FAMILIES.get(family)
    return spec is None or spec.hf_model_type != "minicpmv"


def _one_image_per_prompt(family: str) -> bool:
    """Whether `family` takes one image per prompt (1.0/2.0: their `<用户>` format, no chat template)."""
    from pipeline.models import FAMILIES

    spec = FAMILIES.get(family)
    return spec is not None and spec.chat_format == "minicpm_v2"


def _structured_fields(request: Request, family: str | None) -> dict[str, Any]:
    """Body fields of a json_schema, choices or thinking request (none for others).

    A schema goes as the OpenAI API's `response_format` `json_schema` (strict); choices as the same
    with a string `enum` schema, so any server that does structured outputs constrains them (the reply
    is then a JSON string, `"label"`, which the reply check decodes). Thinking is vLLM's
    `chat_template_kwargs: {"enable_thinking": true}` (a hosted API may ignore it); a family without
    a thinking mode is refused before anything is sent.
    """
    from pipeline.structured import choices_schema

    fields: dict[str, Any] = {}
    schema: Any = json.loads(request.json_schema) if request.json_schema is not None else (
        choices_schema(request.choices) if request.choices else None)
    if schema is not None:
        fields["response_format"] = {"type": "json_schema",
                                     "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    if request.thinking:
        if family is not None:
            from pipeline.models import check_thinking

            check_thinking(family, ["(this request)"])
        fields["chat_template_kwargs"] = {"enable_thinking": True}
    return fields


def _check_request(request: Request) -> None:
    """Cheap checks that catch bad input before it costs an HTTP round trip."""
    check_stack(request, supported=False)  # frames travel as separate images: no 4.6 video layout
    if request.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
    if request.temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {request.temperature}")
    if request.examples and request.is_video:
        raise ValueError("few-shot examples are images: they cannot go before a video clip")
    for k, image in enumerate(request.all_images()):
        if not isinstance(image, np.ndarray):
            raise TypeError(f"image {k}: expected a numpy array, got {type(image).__name__}")
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
            raise ValueError(f"image {k}: expected an RGB HxWx3 array, got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"image {k}: expected dtype uint8, got {image.dtype}")


def _server_message(response: Any) -> str:
    """The error text a server sent: OpenAI/vLLM `{"error": {"message": ...}}`, else the raw body."""
    try:
        payload = response.json()
    except ValueError:
        return (response.text or response.reason or "").strip()[:_MAX_MESSAGE]
    if isinstance(payload, dict):
        if "error" in payload:
            return _error_text(payload["error"])[:_MAX_MESSAGE]
        if "detail" in payload:  # FastAPI-style errors
            return str(payload["detail"])[:_MAX_MESSAGE]
    return json.dumps(payload)[:_MAX_MESSAGE]


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        text = str(error.get("message") or error)
        code = error.get("code")
        if isinstance(code, str) and code not in text:  # e.g. OpenAI's "context_length_exceeded"
            text = f"{text} ({code})"
        return text
    return str(error)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds form; an HTTP date is ignored)."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _strip_credentials(url: str) -> str:
    """`url` without user:password@ and query (provenance and messages must not carry secrets)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))
