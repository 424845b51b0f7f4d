"""A real OpenAI-compatible HTTP server that answers from a script, for the judge's tests and
benchmark (stdlib ``http.server``; its own process, loopback only).

    python -m tests.support.openai_script_server --port 0 --script SCRIPT.json --stats STATS.json \
        [--port-file PORT]

It speaks ``GET /v1/models``, ``GET /health``, ``GET /stats`` and ``POST /v1/chat/completions``
(the OpenAI response shape). The reply is chosen from the script by the conversation under review
(the content of the request's last user message):

    {"models": ["script-judge"],          # GET /v1/models; a request naming another model gets 404
     "default": "{\\"helpful\\": 4}",      # reply when no rule matches
     "delay_s": 0.05,                      # every request waits this long before it answers
     "rules": [{"match": "SUBSTRING",      # first rule whose substring is in the user message wins
                "reply": "text",           # the assistant's content
                "delay_s": 5,              # this rule's own delay (a time-out test)
                "status": 500,             # answer with this HTTP status instead ...
                "fail_times": 2,           # ... only for the first 2 requests of each sample
                "body": "not json"}]}      # a raw, non-JSON 200 body instead of a completion

Statistics, per sample key (sha256 of the user message content, ``sample_key``): requests received
and requests answered with a completion; the most requests ever in flight at once; requests that
carried a ``response_format``; the ``model`` each request named. They are rewritten atomically to
the stats file after every change, so a SIGKILLed server leaves its last counts behind.

``scripted_server(script, work_dir)`` (a context manager) starts one from a test or benchmark and
yields a ``ScriptedServer`` (``url``, ``stats()``, ``kill()``).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def sample_key(user_content: str) -> str:
    """The key the server counts a request under: sha256 of the reviewed conversation's text."""
    return hashlib.sha256(user_content.encode()).hexdigest()


class Stats:
    """Counters shared by the handler threads; saved to ``path`` after every change."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.in_flight = 0
        self.data = {"received": {}, "answered": {}, "max_in_flight": 0, "requests": 0,
                     "response_format": 0, "models": {}}
        self.save()

    def start(self, key: str, model: str, response_format: bool) -> int:
        """Count a request in; returns how many times this sample was received (1 = first)."""
        with self.lock:
            d = self.data
            self.in_flight += 1
            d["max_in_flight"] = max(d["max_in_flight"], self.in_flight)
            d["requests"] += 1
            d["received"][key] = d["received"].get(key, 0) + 1
            d["models"][model] = d["models"].get(model, 0) + 1
            d["response_format"] += int(response_format)
            self.save()
            return d["received"][key]

    def finish(self, key: str, answered: bool) -> None:
        with self.lock:
            self.in_flight -= 1
            if answered:
                self.data["answered"][key] = self.data["answered"].get(key, 0) + 1
            self.save()

    def save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self.path)

    def snapshot(self) -> dict:
        with self.lock:
            return json.loads(json.dumps(self.data))


def make_handler(script: dict, stats: Stats) -> type[BaseHTTPRequestHandler]:
    models = script.get("models") or ["script-judge"]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms stall

        def log_message(self, fmt: str, *args) -> None:  # quiet: tests read the stats instead
            pass

        def send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def send_json(self, status: int, obj: dict) -> None:
            self.send(status, json.dumps(obj).encode())

        def do_GET(self) -> None:
            if self.path == "/health":
                self.send_json(200, {"status": "ok"})
            elif self.path == "/v1/models":
                self.send_json(200, {"object": "list", "data": [
                    {"id": m, "object": "model", "created": 0, "owned_by": "script"} for m in models]})
            elif self.path == "/stats":
                self.send_json(200, stats.snapshot())
            else:
                self.send_json(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if self.path != "/v1/chat/completions":
                self.send_json(404, {"error": {"message": f"no route {self.path}"}})
                return
            body = json.loads(raw)
            users = [m.get("content") or "" for m in body.get("messages", []) if m.get("role") == "user"]
            user = users[-1] if users else ""
            key = sample_key(user)
            model = body.get("model") or ""
            nth = stats.start(key, model, "response_format" in body)
            answered = False
            try:
                if model not in models:
                    self.send_json(404, {"error": {"message": f"model {model!r} not found; "
                                                   f"this server has {models}", "code": 404}})
                    return
                rule = next((r for r in script.get("rules", []) if r["match"] in user), {})
                time.sleep(float(rule.get("delay_s", script.get("delay_s", 0))))
                status = rule.get("status")
                if status is not None and nth <= int(rule.get("fail_times", 10**9)):
                    self.send_json(int(status), {"error": {"message": f"scripted {status}"}})
                    return
                if "body" in rule:
                    self.send(200, rule["body"].encode(), "application/json")
                    return
                reply = rule.get("reply", script.get("default", ""))
                self.send_json(200, completion(model, reply, len(user)))
                answered = True
            except (BrokenPipeError, ConnectionResetError):
                answered = False  # the client gave up (a time-out): nothing was delivered
            finally:
                stats.finish(key, answered)

    return Handler


def completion(model: str, reply: str, prompt_chars: int) -> dict:
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion",
            "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": reply}}],
            "usage": {"prompt_tokens": prompt_chars, "completion_tokens": len(reply),
                      "total_tokens": prompt_chars + len(reply)}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=0, help="0: a free port")
    ap.add_argument("--script", type=Path, required=True)
    ap.add_argument("--stats", type=Path, help="file the counters are written to")
    ap.add_argument("--port-file", type=Path, help="file the chosen port is written to")
    args = ap.parse_args(argv)
    script = json.loads(args.script.read_text())
    stats = Stats(args.stats)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(script, stats))
    server.daemon_threads = True
    server.request_queue_size = 64
    port = server.server_address[1]
    if args.port_file:
        tmp = args.port_file.with_name(args.port_file.name + ".tmp")
        tmp.write_text(str(port))
        os.replace(tmp, args.port_file)
    print(port, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever(poll_interval=0.1)
    server.server_close()


class ScriptedServer:
    """A running script server: its ``url`` (no ``/v1``), its counters, and a way to kill it."""

    def __init__(self, proc: subprocess.Popen, url: str, stats_path: Path) -> None:
        self.proc, self.url, self.stats_path = proc, url, stats_path

    def stats(self) -> dict:
        """The counters as last saved (still readable after the server was killed)."""
        return json.loads(self.stats_path.read_text())

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-request, as a crashed judge would."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.contextmanager
def scripted_server(script: dict, work_dir: Path, name: str = "script-server",
                    timeout: float = 30) -> Iterator[ScriptedServer]:
    """Start ``python -m tests.support.openai_script_server`` over ``script``; stop it on exit."""
    work_dir.mkdir(parents=True, exist_ok=True)
    script_path, stats_path = work_dir / f"{name}.script.json", work_dir / f"{name}.stats.json"
    port_path = work_dir / f"{name}.port"
    script_path.write_text(json.dumps(script))
    port_path.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.openai_script_server", "--port", "0",
                             "--script", str(script_path), "--stats", str(stats_path),
                             "--port-file", str(port_path)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=open(work_dir / f"{name}.log", "a"))
    server = ScriptedServer(proc, "", stats_path)
    try:
        deadline = time.time() + timeout
        while not port_path.exists():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the script server did not start: "
                                   f"{(work_dir / f'{name}.log').read_text()[-2000:]}")
            time.sleep(0.02)
        server.url = f"http://127.0.0.1:{int(port_path.read_text())}"
        yield server
    finally:
        server.stop()


if __name__ == "__main__":
    main()
