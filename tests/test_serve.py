"""`medtune serve`: the official openai client against a server started as a user starts it (a subprocess of the
CLI on a free port), the deployment guards (401/400/413/429), cancellation and batching against a server running
in a thread whose scheduler steps only when the test lets it, and the chat page in headless chromium."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from .conftest import REPO, run_medtune

API_KEY = "sk-medtune-test"
QUESTION = [{"role": "user", "content": "高血压患者可以喝咖啡吗？"}]
BODY_LIMIT = 20_000
TOKENS_LIMIT = 64


def wait_for(condition, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@contextlib.contextmanager
def serve_process(log, *options: str):
    """`medtune serve OPTIONS` in a subprocess logging to `log`, on a free port: the base URL it logs."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("MEDTUNE_API_KEY", None)
    with open(log, "w") as sink:
        process = subprocess.Popen([sys.executable, "-m", "medtune", "serve", "--port", "0", *options],
                                   cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        found = []
        wait_for(lambda: process.poll() is not None or found.extend(
            re.findall(r"listening on (http://\S+)", log.read_text())) or found, what="server start")
        assert found, log.read_text()
        yield found[0]
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def served(glm4_dir, tmp_path_factory):
    """`medtune serve` with a key and small limits: (base URL, its log file)."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with serve_process(log, "--model", str(glm4_dir), "--api-key", API_KEY, "--max_body_bytes", str(BODY_LIMIT),
                       "--max_tokens_limit", str(TOKENS_LIMIT)) as url:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
        yield url, log


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def backend(glm4_dir):
    """The evaluation's LocalBackend: the reference for greedy replies, and the model of in-thread servers."""
    from medtune.eval.backends import LocalBackend

    return LocalBackend(str(glm4_dir))


# -- the official openai client ---------------------------------------------------------------------------------


def test_greedy_chat_reply_is_the_evaluation_reply_with_exact_usage(client, backend):
    reply = client.chat.completions.create(model="any", messages=QUESTION, temperature=0, max_tokens=12)
    assert reply.choices[0].message.content.strip() == backend.generate([QUESTION], max_new_tokens=12)[0]
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == len(backend.template.prompt_ids(QUESTION))
    assert reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12


def test_streamed_reply_equals_the_plain_one(client):
    plain = client.chat.completions.create(model="any", messages=QUESTION, temperature=0, max_tokens=20)
    stream = client.chat.completions.create(model="any", messages=QUESTION, temperature=0, max_tokens=20,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # it arrived in pieces
    assert "".join(pieces) == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.model_dump() == plain.usage.model_dump()


def test_n_replies_follow_the_seed(client):
    asked = dict(model="any", messages=QUESTION, temperature=1.0, max_tokens=10, n=3, seed=7)
    first = [c.message.content for c in client.chat.completions.create(**asked).choices]
    again = [c.message.content for c in client.chat.completions.create(**asked).choices]
    assert first == again  # same seed, same replies
    assert len(set(first)) == 3  # reply k uses seed + k
    other = [c.message.content for c in client.chat.completions.create(**{**asked, "seed": 8}).choices]
    assert other[:2] == first[1:]  # seed 8's first reply is seed 7's second
    greedy = client.chat.completions.create(model="any", messages=QUESTION, temperature=0, max_tokens=10, n=2)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    assert greedy.usage.completion_tokens == 20


def test_stop_string_ends_the_reply_before_it(client):
    full = client.chat.completions.create(model="any", messages=QUESTION, temperature=0, max_tokens=20)
    text = full.choices[0].message.content
    stop = text[5:7]
    expected = text[:text.index(stop)]
    cut = client.chat.completions.create(model="any", messages=QUESTION, temperature=0, max_tokens=20, stop=[stop])
    assert cut.choices[0].message.content == expected
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="any", messages=QUESTION, temperature=0, max_tokens=20,
                                              stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected


@pytest.mark.parametrize("extra_body, special", [(None, True), ({"add_special_tokens": False}, False)],
                         ids=["default_as_vllm", "add_special_tokens_false"])
def test_text_completions_add_the_special_tokens_as_vllm_does_unless_asked_not_to(client, backend, extra_body,
                                                                                  special):
    import torch

    prompt = "高血压的常见症状有"
    plain = client.completions.create(model="any", prompt=prompt, temperature=0, max_tokens=8, extra_body=extra_body)
    streamed = client.completions.create(model="any", prompt=prompt, temperature=0, max_tokens=8, stream=True,
                                         extra_body=extra_body)
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text
    # by default the GLM-4 tokenizer's [gMASK]<sop> goes first (vLLM's add_special_tokens=True); false: the raw text
    raw = backend.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    fed = backend.tokenizer.convert_tokens_to_ids(["[gMASK]", "<sop>"]) + raw if special else raw
    assert plain.usage.prompt_tokens == len(fed) == len(raw) + 2 * special
    assert plain.usage.completion_tokens == 8
    with torch.no_grad():
        greedy = backend.model.generate(input_ids=torch.tensor([fed]), attention_mask=torch.ones(1, len(fed)),
                                        **backend.decoding_options(8))
    assert plain.choices[0].text == backend.decode(backend.reply_ids(greedy[0, len(fed):]))


@pytest.mark.parametrize("value", ["false", 0, None])
def test_add_special_tokens_that_is_not_a_bool_is_a_400(served, value):
    response = httpx.post(served[0] + "/v1/completions", json={"prompt": "头痛", "add_special_tokens": value},
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "add_special_tokens"


SYSTEM = "你是医生。"


def ipv6_loopback_works() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def served_with_system_prompt(glm4_dir, tmp_path_factory):
    """`medtune serve --system_prompt ...` on the IPv6 loopback ::1 where this machine has one (else 127.0.0.1):
    (base URL as logged, host)."""
    host = "::1" if ipv6_loopback_works() else "127.0.0.1"
    log = tmp_path_factory.mktemp("serve-system") / "server.log"
    with serve_process(log, "--model", str(glm4_dir), "--host", host, "--system_prompt", SYSTEM) as url:
        yield url, host


def test_system_prompt_goes_to_requests_without_a_system_message(served_with_system_prompt, backend):
    url, _ = served_with_system_prompt
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    given = [{"role": "system", "content": SYSTEM}, *QUESTION]
    own = [{"role": "system", "content": "你是药师。"}, *QUESTION]
    for asked, rendered in ((QUESTION, given), (own, own)):  # a request's own system message wins
        reply = client.chat.completions.create(model="any", messages=asked, temperature=0, max_tokens=6)
        assert reply.usage.prompt_tokens == len(backend.template.prompt_ids(rendered))
        assert reply.choices[0].message.content.strip() == backend.generate([rendered], max_new_tokens=6)[0]
    assert len(backend.template.prompt_ids(given)) != len(backend.template.prompt_ids(QUESTION))
    # the text completions route renders no chat template, so no system prompt either
    text = client.completions.create(model="any", prompt="高血压", temperature=0, max_tokens=2)
    assert text.usage.prompt_tokens == len(backend.tokenizer("高血压")["input_ids"])


def test_serve_listens_on_an_ipv6_address(served_with_system_prompt):
    url, host = served_with_system_prompt
    if host != "::1":
        pytest.skip("this machine cannot listen on the IPv6 loopback ::1")
    assert re.fullmatch(r"http://\[::1\]:\d+", url)
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_a_host_it_cannot_listen_on_is_one_clear_error(glm4_dir):
    result = run_medtune("serve", "--model", str(glm4_dir), "--host", "no-such-host.invalid", "--port", "0")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("medtune: error: --host no-such-host.invalid --port 0: "
                                                            "cannot listen there")


def test_an_empty_host_listens_on_every_ipv4_interface(glm4_dir, tmp_path):
    with serve_process(tmp_path / "server.log", "--model", str(glm4_dir), "--host", "") as url:
        port = re.fullmatch(r"http://0\.0\.0\.0:(\d+)", url).group(1)
        assert httpx.get(f"http://127.0.0.1:{port}/health").json()["status"] == "ok"


def test_a_connection_while_the_model_loads_is_refused_not_left_hanging(glm4_dir, monkeypatch):
    """The port is bound before the model loads (a busy port fails at once) but listens only once uvicorn serves."""
    import medtune.serve as serve
    from medtune.config import AdapterArguments, ModelArguments, ServeArguments

    bound, outcome = [], []
    bind = serve.bind
    monkeypatch.setattr(serve, "bind", lambda host, port: bound.append(bind(host, port)) or bound[-1])

    class StillLoading(Exception):
        pass

    def load_model(*_):
        try:
            socket.create_connection(("127.0.0.1", bound[0].getsockname()[1]), timeout=5).close()
            outcome.append("accepted")
        except ConnectionRefusedError:
            outcome.append("refused")
        raise StillLoading

    monkeypatch.setattr(serve, "build_engine", load_model)
    with pytest.raises(StillLoading):
        serve.run_serve(ModelArguments(model_name_or_path=str(glm4_dir)), AdapterArguments(), ServeArguments(port=0))
    assert outcome == ["refused"]
    assert bound[0].fileno() == -1  # a failed load closes the port


def test_models_and_health(client, served, glm4_dir):
    assert [m.id for m in client.models.list().data] == [glm4_dir.name]
    health = httpx.get(served[0] + "/health").json()  # no key needed: for load balancers
    assert health["status"] == "ok"


def test_log_has_no_content(client, served):
    client.chat.completions.create(model="any", messages=[{"role": "user", "content": "私密问题甲乙丙"}],
                                   temperature=0, max_tokens=4)
    log = served[1].read_text()
    assert "POST /v1/chat/completions prompt_tokens=" in log
    assert "私密问题甲乙丙" not in log


# -- deployment guards ------------------------------------------------------------------------------------------


def test_401_without_or_with_a_wrong_key(served):
    with pytest.raises(openai.AuthenticationError) as caught:
        openai.OpenAI(base_url=served[0] + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
    no_key = httpx.post(served[0] + "/v1/chat/completions", json={"messages": QUESTION})
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("body, param", [
    ({"messages": QUESTION, "max_tokens": TOKENS_LIMIT + 1}, "max_tokens"),
    ({"messages": [{"role": "doctor", "content": "你好"}]}, "messages.0.role"),
    ({"messages": []}, "messages"),
    ('{"messages": [{"role": "user", "content": "头痛', None),
], ids=["max_tokens_over_limit", "bad_role", "empty_messages", "malformed_json"])
def test_400_with_an_openai_error_body(served, body, param):
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(served[0] + "/v1/chat/completions", content=content.encode(),
                          headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert "Traceback" not in response.text


def test_413_over_the_body_limit(served):
    big = [{"role": "user", "content": "头" * BODY_LIMIT}]
    response = httpx.post(served[0] + "/v1/chat/completions", json={"messages": big},
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"


# -- in-thread servers whose scheduler steps when the test says -------------------------------------------------


class SteppedServer:
    """A server in this process whose engine runs one scheduler step per permit the test releases."""

    def __init__(self, backend, **options):
        import uvicorn

        from medtune.config import ServeArguments
        from medtune.serve.app import create_app
        from medtune.serve.engine import BatchingEngine

        self.args = ServeArguments(**options)
        self.template = backend.template
        self.engine = BatchingEngine(backend, max_batch_size=self.args.max_batch_size,
                                     batch_wait_ms=self.args.batch_wait_ms)
        self.permits = threading.Semaphore(0)
        step = self.engine.step

        def gated_step(arrivals):
            self.permits.acquire()
            step(arrivals)

        self.engine.step = gated_step
        self.app = create_app(self.engine, backend.template, "tiny", self.args)
        listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [listener]}, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, what="in-thread server")

    @property
    def in_flight(self) -> int:
        return self.app.state.service.in_flight

    def run_freely(self) -> None:
        self.permits.release(10**6)

    def close(self) -> None:
        self.run_freely()
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def stepped(backend):
    servers = []

    def start(**options):
        servers.append(SteppedServer(backend, **options))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def ask(url: str, content: str, max_tokens: int = 12) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": max_tokens})


def test_concurrent_requests_decode_in_one_batch_with_one_by_one_replies(stepped):
    server = stepped(max_batch_size=8)
    questions = ["头痛怎么办", "发烧了吃什么药？", "高血压患者能喝咖啡吗？", "孕妇感冒了能吃药吗"]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(ask, server.url, q) for q in questions]
        wait_for(lambda: server.in_flight == 4, what="4 requests admitted")
        server.run_freely()
        together = [f.result().json()["choices"][0]["message"]["content"] for f in futures]
    assert server.engine.stats.largest_batch == 4
    alone = stepped(max_batch_size=1)  # what batching switched off serves
    alone.run_freely()
    assert [ask(alone.url, q).json()["choices"][0]["message"]["content"] for q in questions] == together
    assert alone.engine.stats.largest_batch == 1


def test_429_when_the_queue_is_full(stepped):
    server = stepped(max_batch_size=1, max_queue=1)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(ask, server.url, q) for q in ("头痛", "发烧")]
        wait_for(lambda: server.in_flight == 2, what="2 requests admitted")
        refused = ask(server.url, "咳嗽")
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "rate_limit_error" and refused.headers["retry-after"]
        server.run_freely()
        assert [f.result().status_code for f in futures] == [200, 200]
    assert server.in_flight == 0


def test_client_disconnect_cancels_its_generation(stepped):
    server = stepped()
    server.permits.release(3)  # the first token, then two decode steps
    body = {"messages": QUESTION, "temperature": 0, "max_tokens": TOKENS_LIMIT, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if '"content": "' in line and '"role"' not in line:
                break  # a token arrived; now leave
    wait_for(lambda: server.in_flight == 0, what="the server to notice the disconnect")
    server.run_freely()
    wait_for(lambda: server.engine.stats.cancelled == 1, what="the generation to be cancelled")
    stats = server.engine.stats
    assert stats.completed == 0 and stats.running == 0
    assert stats.steps < TOKENS_LIMIT - 1  # it did not run on to max_tokens


def test_client_leaving_a_plain_request_cancels_it(stepped):
    server = stepped()  # no permit: the request waits in the scheduler until its client gives up
    generations = []
    submit = server.engine.submit
    server.engine.submit = lambda *args, **kwargs: generations.append(submit(*args, **kwargs)) or generations[-1]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", timeout=1, json={"messages": QUESTION, "max_tokens": 8})
    wait_for(lambda: generations and generations[0].cancelled.is_set(), what="the server to notice the disconnect")
    server.run_freely()
    wait_for(lambda: server.engine.stats.cancelled == 1 and server.in_flight == 0, what="the cancel to finish")
    assert server.engine.stats.completed == 0 and server.engine.stats.steps == 0


def test_content_is_logged_only_with_log_content(stepped, caplog):
    server = stepped(log_content=True)
    server.run_freely()
    with caplog.at_level("INFO", logger="medtune.serve"):
        assert ask(server.url, "私密问题丁戊").status_code == 200
    assert "私密问题丁戊" in caplog.text


# -- options and the vLLM path ----------------------------------------------------------------------------------


def test_serve_options_defaults_and_aliases(monkeypatch):
    from medtune.config import AdapterArguments, ModelArguments, ServeArguments, parse_arguments

    monkeypatch.delenv("MEDTUNE_API_KEY", raising=False)
    _, _, args = parse_arguments((ModelArguments, AdapterArguments, ServeArguments), [])
    assert (args.host, args.port, args.api_key, args.batching) == ("127.0.0.1", 8000, None, True)
    _, _, args = parse_arguments((ModelArguments, AdapterArguments, ServeArguments),
                                 ["--api-key", "k1", "--no_batching"])
    assert (args.api_key, args.batching) == ("k1", False)
    monkeypatch.setenv("MEDTUNE_API_KEY", "k2")
    assert parse_arguments((ModelArguments, AdapterArguments, ServeArguments), [])[2].api_key == "k2"


def test_vllm_backend_without_vllm_is_one_clear_error(glm4_dir):
    result = run_medtune("serve", "--model", str(glm4_dir), "--backend", "vllm", "--port", "0")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("medtune: error: --backend vllm needs ")
    assert "Traceback" not in result.stderr


# -- the chat page --------------------------------------------------------------------------------------------


def test_chat_page_streams_an_answer(browser, stepped, tmp_path):
    """The reply shows while the server has generated only its first tokens (the scheduler is held), and grows
    to the whole reply once generation runs on."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = stepped(api_key=API_KEY, max_tokens_limit=TOKENS_LIMIT)
    browser.get(server.url + "/")
    notice = browser.find_element(By.ID, "notice").text
    assert "不是医生" in notice and "not a doctor" in notice
    browser.find_element(By.ID, "apikey").send_keys(API_KEY)
    browser.find_element(By.ID, "question").send_keys("高血压患者可以喝咖啡吗？")
    browser.find_element(By.ID, "send").click()
    server.permits.release(4)  # the first token and three more, then the scheduler waits
    reply = WebDriverWait(browser, 60).until(lambda b: [e.text for e in b.find_elements(By.CSS_SELECTOR, ".turn")
                                                        if "assistant" in e.get_attribute("class") and e.text])
    assert not browser.find_element(By.ID, "send").is_enabled()  # the reply is still coming
    server.run_freely()
    WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "send").is_enabled())
    assert not [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".turn.error")]
    answer = browser.find_element(By.CSS_SELECTOR, ".turn.assistant").text
    assert answer.startswith(reply[0]) and len(answer) > len(reply[0])
    prompts = []  # a second turn: the server gets the whole conversation, system prompt first
    submit = server.engine.submit
    server.engine.submit = lambda prompt, *rest, **kw: prompts.append(prompt) or submit(prompt, *rest, **kw)
    browser.find_element(By.ID, "question").send_keys("那每天最多喝几杯？")
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 60).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".turn.assistant")) == 2
                                     and b.find_element(By.ID, "send").is_enabled())
    system = browser.find_element(By.ID, "system").get_attribute("value")
    rendered = server.template.tokenizer.decode(prompts[0])
    turns = [system, "高血压患者可以喝咖啡吗？", answer.strip(), "那每天最多喝几杯？"]
    assert len(prompts) == 1 and all(turn in rendered for turn in turns)
    assert sorted(turns, key=rendered.index) == turns
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".turn.user")] == [
        "高血压患者可以喝咖啡吗？", "那每天最多喝几杯？"]
    screenshot = tmp_path / "serve_chat_page.png"
    browser.save_screenshot(str(screenshot))
    print(f"screenshot: {screenshot}")
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]


# -- pieces -----------------------------------------------------------------------------------------------------


def test_streamed_text_never_releases_part_of_a_stop_string(backend):
    from medtune.serve.protocol import ReplyText

    tokenizer = backend.tokenizer
    ids = tokenizer("高血压患者可以喝咖啡吗？每天最多两杯。", add_special_tokens=False)["input_ids"]
    full = tokenizer.decode(ids)
    ends = [len(tokenizer.decode(ids[:k + 1])) for k in range(len(ids))]  # where each token's text ends
    boundary = next(end for end in ends if end > 3 and not tokenizer.decode(ids[:ends.index(end) + 1]).endswith("\ufffd"))
    stop = full[boundary - 1:boundary + 2]  # starts in one token's text, ends in a later one's
    reply, released = ReplyText(tokenizer, [stop]), []
    for token in ids:
        reply.add(token)
        released.append(reply.delta())
        if reply.stopped:
            break
    released.append(reply.delta(final=True))
    assert reply.stopped
    assert "".join(released) == full[:full.index(stop)]  # nothing of the stop string was let out, then taken back


def test_top_p_keeps_the_most_likely_token():
    import torch

    from medtune.serve.engine import SamplingOptions, sample_next_token

    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    generator = torch.Generator().manual_seed(0)
    narrow = SamplingOptions(max_tokens=1, temperature=1.0, top_p=0.01)
    assert {sample_next_token(logits, narrow, generator) for _ in range(50)} == {1}
    wide = SamplingOptions(max_tokens=1, temperature=1.0, top_p=0.9)  # tokens 1 and 2 carry ~90% together
    assert {sample_next_token(logits, wide, generator) for _ in range(200)} == {1, 2}
