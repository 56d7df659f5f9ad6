"""A tiny OpenAI-compatible chat server for tests: records every request body, answers a dialectic.

Standard library only, on 127.0.0.1 in a thread. `POST …/chat/completions` answers with the fake kimi's
dialectic for the last user message, as one JSON body or as SSE chunks when the request says
`"stream": true` (kimi does, with `stream_options.include_usage`). A `[[status:NNN]]` marker in the last
user message answers HTTP NNN with an OpenAI-style error body instead; `[[tool:NAME:ARGS-JSON]]` first
answers with a call of tool NAME (until the conversation holds a tool result), as a hostile model would.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .fake_kimi import dialectic


def last_user_text(body: dict) -> str:
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return "".join(p.get("text", "") for p in content if isinstance(p, dict))
            return str(content or "")
    return ""


class ChatServer:
    def __init__(self) -> None:
        self.requests: list[dict] = []  # {"path", "body"} of every POST
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                with server.lock:
                    server.requests.append({"path": self.path, "body": None})
                self._json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with server.lock:
                    server.requests.append({"path": self.path, "body": body})
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})
                    return
                prompt = last_user_text(body)
                if m := re.search(r"\[\[status:(\d{3})\]\]", prompt):
                    self._json(int(m.group(1)), {"error": {"message": f"test status {m.group(1)}", "type": "test"}})
                    return
                text = dialectic(prompt, tagged=True)
                usage = {"prompt_tokens": 50, "completion_tokens": 40, "total_tokens": 90}
                base = {"id": "chatcmpl-test", "created": int(time.time()), "model": body.get("model", "test")}
                tool = re.search(r"\[\[tool:(\w+):(\{.*?\})\]\]", prompt)
                if tool and not any(m.get("role") == "tool" for m in body.get("messages") or []):
                    call = {"id": "call_1", "type": "function",
                            "function": {"name": tool.group(1), "arguments": tool.group(2)}}
                    if not body.get("stream"):
                        self._json(200, {**base, "object": "chat.completion", "usage": usage, "choices": [
                            {"index": 0, "finish_reason": "tool_calls",
                             "message": {"role": "assistant", "content": None, "tool_calls": [call]}}]})
                        return
                    self._stream(base, [{"role": "assistant", "content": None,
                                         "tool_calls": [{"index": 0, **call}]}], "tool_calls", body, usage)
                    return
                if not body.get("stream"):
                    self._json(200, {**base, "object": "chat.completion", "usage": usage, "choices": [
                        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}]})
                    return
                chunks = [{"role": "assistant", "content": ""}] + [
                    {"content": text[i:i + 64]} for i in range(0, len(text), 64)]
                self._stream(base, chunks, "stop", body, usage)

            def _stream(self, base: dict, deltas: list[dict], finish: str, body: dict, usage: dict) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                for delta in deltas:
                    self._event({**base, "object": "chat.completion.chunk",
                                 "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
                self._event({**base, "object": "chat.completion.chunk",
                             "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
                if (body.get("stream_options") or {}).get("include_usage"):
                    self._event({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

            def _event(self, obj: dict) -> None:
                self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

            def _json(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def chat_bodies(self) -> list[dict]:
        with self.lock:
            return [r["body"] for r in self.requests if r["path"].rstrip("/").endswith("/chat/completions")]

    def __enter__(self) -> "ChatServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
