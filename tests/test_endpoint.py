"""The evaluation's --endpoint client (and the CMB-Clin judge's) is the official `openai` package: a real HTTP
server on 127.0.0.1 answers 429, then 500, then 200, and the evaluation gets the answer; a wrong key is one line and
exit 2, with the key taken from --endpoint_api_key or OPENAI_API_KEY; a server that is not there is one line."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from medtune.cli import main
from medtune.errors import MedtuneError
from medtune.eval.backends import EndpointBackend, openai_base_url

from .conftest import send_json

ANSWER = "逐项分析后，所以答案是C。"


class ScriptedServer(BaseHTTPRequestHandler):
    """Replies with the next status of `script` (the last one repeats); records each request's path and key."""

    script: list[int] = []
    seen: list[tuple[str, str | None]] = []
    key: str | None = None  # when set, any other Authorization is refused with 401

    def do_POST(self):  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append((self.path, self.headers.get("Authorization")))
        status = self.script[min(len(self.seen), len(self.script)) - 1]
        if self.key is not None and self.headers.get("Authorization") != f"Bearer {self.key}":
            status = 401
        if status == 200:
            body = {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": ANSWER}}]}
        else:
            body = {"error": {"message": f"scripted {status}", "type": "test", "code": status}}
        send_json(self, status, body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    handler = type("Handler", (ScriptedServer,), {"script": [200], "seen": [], "key": None})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    httpd.url = f"http://127.0.0.1:{httpd.server_port}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def evaluate(url: str, output_dir, *extra: str) -> int:
    return main(["eval", "safety", "--endpoint", url, "--output_dir", str(output_dir), "--limit", "1",
                 "--cot", "true", *extra])


def test_429_then_500_are_retried_and_the_evaluation_gets_the_answer(server, tmp_path, capsys):
    server.RequestHandlerClass.script = [429, 500, 200]
    assert evaluate(server.url, tmp_path) == 0, capsys.readouterr().err
    assert [path for path, _ in server.RequestHandlerClass.seen] == ["/v1/chat/completions"] * 3
    answers = json.loads((tmp_path / "answers.json").read_text(encoding="utf-8"))
    assert [a["model_answer"] for a in answers] == ["C"]


def test_a_refused_key_is_one_line_and_exit_2_and_the_key_comes_from_the_option_or_openai_api_key(
        server, tmp_path, capsys, monkeypatch):
    server.RequestHandlerClass.key = "right-key"
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert evaluate(server.url, tmp_path / "none") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("medtune: error:") == 1  # (after the progress bar's last state)
    assert err.split("medtune: error: ")[1].split("\n")[0] == (
        f"{server.url}/v1: HTTP 401 unauthorized (scripted 401); pass the server's key with --endpoint_api_key or "
        "OPENAI_API_KEY")
    assert len(server.RequestHandlerClass.seen) == 1  # a 401 is not retried

    assert evaluate(server.url, tmp_path / "option", "--endpoint_api_key", "right-key") == 0
    monkeypatch.setenv("OPENAI_API_KEY", "right-key")
    assert evaluate(server.url, tmp_path / "environment") == 0
    assert [key for _, key in server.RequestHandlerClass.seen] == ["Bearer EMPTY", "Bearer right-key",
                                                                   "Bearer right-key"]
    capsys.readouterr()

    judge = EndpointBackend(server.url, api_key="wrong", key_option="--judge_api_key")
    with pytest.raises(MedtuneError, match=r"HTTP 401 unauthorized .*--judge_api_key or OPENAI_API_KEY$"):
        judge.generate([[{"role": "user", "content": "评分"}]], 16)


def test_a_server_that_is_not_there_is_one_line(tmp_path):
    with socket.socket() as probe:  # a free port with nothing listening once it is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = EndpointBackend(f"http://127.0.0.1:{port}", max_retries=0)
    with pytest.raises(MedtuneError) as error:
        backend.generate([[{"role": "user", "content": "你好"}]], 8)
    message = str(error.value)
    assert message.startswith(f"http://127.0.0.1:{port}/v1: cannot connect (") and "\n" not in message
    assert message.endswith("is the server running (e.g. `medtune serve`) at that address?")


@pytest.mark.parametrize("written", ["http://h:8000", "http://h:8000/", "http://h:8000/v1", "http://h:8000/v1/",
                                     "http://h:8000/v1/chat/completions"])
def test_every_usual_way_of_writing_the_endpoint_reaches_the_same_base_url(written):
    assert openai_base_url(written) == "http://h:8000/v1"
