"""FAULT INJECTION: an OpenAI-compatible chat server on 127.0.0.1 whose replies a test scripts.

Tests of the reply checks need replies that real tiny models do not give on demand (loops, empty,
`null` and reasoning-only content). `ChatStandIn(answer)` serves POST /chat/completions: it decodes
the first image of the request and returns what `answer(body, image)` says, as
`(message, finish_reason, usage)`; `answer` runs under a lock, so it may record what was sent.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Answer = Callable[[dict[str, Any], Any], "tuple[dict[str, Any], str, dict[str, int]]"]


class ChatStandIn:
    """A running stand-in; `url` is its base URL; `close()` stops it."""

    def __init__(self, answer: Answer) -> None:
        from PIL import Image

        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                url = body["messages"][0]["content"][0]["image_url"]["url"]
                image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
                with lock:
                    message, finish, usage = answer(body, image)
                data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", **message},
                                                "finish_reason": finish}], "usage": usage}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
