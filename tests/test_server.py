"""The HTTP server: the official openai client in both modes, bad input answered 4xx in OpenAI's shape,
disconnects free their batch row, a bounded queue, the chat page in a real headless Chromium, and schemathesis."""

import asyncio
import copy
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import uvicorn  # noqa: E402

import zaizai  # noqa: E402
from zaizai.data.tokenizer import SYSTEM_ID  # noqa: E402
from zaizai.inference.batch import Batch  # noqa: E402
from zaizai.inference.chat import ChatSession  # noqa: E402
from zaizai.inference.sampling import SamplingConfig  # noqa: E402
from zaizai.serve.app import create_app, server_config  # noqa: E402
from zaizai.serve.schemas import GREEDY_BELOW_TEMPERATURE, MAX_TOKENS_LIMIT, APIError, ChatRequest  # noqa: E402
from test_chat import train_chat_model  # noqa: E402

TEST_OUTPUT = Path(__file__).resolve().parent.parent / "test-output"


class LiveServer:
    """A real uvicorn server on a free 127.0.0.1 port, in a background thread, configured as `zaizai serve` does
    (``config``: :func:`zaizai.serve.app.server_config`'s keywords, e.g. ``header_timeout_s``)."""

    def __init__(self, app, **config):
        self.app = app
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(server_config(app, **config))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)

    @property
    def stats(self):
        return self.app.state.scheduler.stats()

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def bot(tmp_path_factory):
    return zaizai.load(train_chat_model(tmp_path_factory.mktemp("serve")))


@pytest.fixture(scope="module")
def server(bot):
    s = LiveServer(create_app(bot, max_tokens=2048))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)


def assert_openai_error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# --- the openai client --------------------------------------------------------------------------------------------


def test_models_and_health(client, server):
    models = client.models.list().data
    assert len(models) == 1 and models[0].id.startswith("zaizai-")
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["chat_model"] is True and health["block_size"] == 32


def test_streamed_text_equals_the_whole_reply_under_a_seed(client):
    kwargs = dict(model="zaizai", messages=[{"role": "user", "content": "你好"}], temperature=0.9, top_p=0.95,
                  max_tokens=12, seed=7)
    whole = client.chat.completions.create(**kwargs)
    text = whole.choices[0].message.content
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens > 0 and whole.usage.total_tokens == (whole.usage.prompt_tokens +
                                                                             whole.usage.completion_tokens)

    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text and len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1


def test_the_reply_is_what_the_chat_session_says(client, bot):
    history = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好，我是崽崽。"}]
    reply = client.chat.completions.create(model="zaizai", messages=history + [{"role": "user", "content": "你会什么"}],
                                           temperature=0, max_tokens=16)
    session = ChatSession(bot, sampling=SamplingConfig(max_new_tokens=16, temperature=0))
    session.history = history
    assert reply.choices[0].message.content.strip() == session.say("你会什么")
    assert reply.usage.prompt_tokens == len(session.prompt_ids("你会什么"))


def test_max_tokens_stop_and_completions(client):
    long = client.chat.completions.create(model="zaizai", messages=[{"role": "user", "content": "你好"}],
                                          max_completion_tokens=40, seed=1, extra_body={"ignore_eos": True})
    assert long.choices[0].finish_reason == "length" and long.usage.completion_tokens == 40
    text = long.choices[0].message.content
    stop = text[5:7]
    cut = client.chat.completions.create(model="zaizai", messages=[{"role": "user", "content": "你好"}],
                                         max_tokens=40, seed=1, stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == text[:text.find(stop)]

    done = client.completions.create(model="zaizai", prompt="早上", max_tokens=8, seed=3)
    assert done.object == "text_completion" and done.usage.prompt_tokens == 3
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="zaizai", prompt="早上",
                                                                             max_tokens=8, seed=3, stream=True))
    assert streamed == done.choices[0].text


def test_an_api_key_is_required_when_set(bot):
    openai = pytest.importorskip("openai")
    server = LiveServer(create_app(bot, api_key="s3cret"))
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.get(f"{server.url}/v1/models", headers=headers)
            assert assert_openai_error(r, 401)["code"] == "invalid_api_key"
        assert httpx.get(f"{server.url}/health").status_code == 200
        good = openai.OpenAI(base_url=f"{server.url}/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model="m", messages=[{"role": "user", "content": "你好"}],
                                            max_tokens=3).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()
    finally:
        server.stop()


# --- bad input ----------------------------------------------------------------------------------------------------

USER = [{"role": "user", "content": "你好"}]
BAD = {
    "malformed json": ("/v1/chat/completions", b'{"messages": [', 400),
    "not an object": ("/v1/chat/completions", b'[1, 2]', 400),
    "no messages": ("/v1/chat/completions", {"model": "m"}, 400),
    "empty messages": ("/v1/chat/completions", {"messages": []}, 400),
    "unknown role": ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    "content not text": ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400),
    "oversized message": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "好" * 100_001}]}, 400),
    "oversized body": ("/v1/chat/completions", {"messages": USER, "pad": "x" * (1 << 20)}, 413),
    "temperature": ("/v1/chat/completions", {"messages": USER, "temperature": 5}, 400),
    "top_p": ("/v1/chat/completions", {"messages": USER, "top_p": 1.5}, 400),
    "max_tokens over the cap": ("/v1/chat/completions", {"messages": USER, "max_tokens": 10**6}, 400),
    "negative max_tokens": ("/v1/chat/completions", {"messages": USER, "max_completion_tokens": -1}, 400),
    "n": ("/v1/chat/completions", {"messages": USER, "n": 3}, 400),
    "seed": ("/v1/chat/completions", {"messages": USER, "seed": -1}, 400),
    "too many stops": ("/v1/chat/completions", {"messages": USER, "stop": list("abcde")}, 400),
    "nan": ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a"}], "temperature": NaN}', 400),
    "two prompts": ("/v1/completions", {"prompt": ["a", "b"]}, 400),
    "no prompt": ("/v1/completions", {}, 400),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_requests_get_openai_shaped_4xx(server, name):
    path, body, status = BAD[name]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"}, timeout=30)
    assert_openai_error(r, status)


def test_the_apps_max_tokens_is_enforced_below_the_schemas_limit(server):
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": USER, "max_tokens": 3000}, timeout=30)
    error = assert_openai_error(r, 400)
    assert error["param"] == "max_tokens"
    assert error["message"] == "max_tokens: Input should be less than or equal to 2048"  # as pydantic words it


def test_the_schemas_are_plain_models():
    body = ChatRequest(messages=USER, temperature=GREEDY_BELOW_TEMPERATURE / 2, top_k=5, max_tokens=100)
    sampling = body.sampling(cap=MAX_TOKENS_LIMIT)
    assert sampling.temperature == 0 and sampling.top_k == 5 and sampling.max_new_tokens == 100  # served greedy
    assert ChatRequest(messages=USER).reply_tokens(cap=16) == 16
    with pytest.raises(APIError, match="less than or equal to 16"):
        body.check_token_cap(16)


def test_unknown_routes_and_methods_are_openai_shaped(server):
    assert_openai_error(httpx.get(f"{server.url}/v1/nothing"), 404)
    assert_openai_error(httpx.get(f"{server.url}/v1/chat/completions"), 405)


# --- disconnects and the queue ------------------------------------------------------------------------------------

LONG = {"messages": USER, "max_tokens": 2048, "stream": True, "ignore_eos": True}


class PacedBatch(Batch):
    """The server's batch, calling ``pace(batch)`` before each step (by default: 10 ms a step), so that a
    generation lasts long enough to be interrupted however fast the machine; ``rows`` records the generations in
    each step."""

    def __init__(self, model, device, pace=None):
        super().__init__(model, device)
        self.pace = pace or (lambda batch: threading.Event().wait(0.01))
        self.rows: list[int] = []

    def step(self):
        self.pace(self)
        self.rows.append(len(self))
        return super().step()


def paced(app, pace=None):
    """``app`` with its worker's batch paced (see :class:`PacedBatch`); returns the app."""
    scheduler = app.state.scheduler
    scheduler.new_batch = lambda: PacedBatch(scheduler.bot.model, scheduler.bot.device, pace)
    return app


def always_says(bot, token: int):
    """A copy of ``bot`` whose model says ``token`` after anything (greedy): its last layer norm gives one fixed
    vector, which only ``token``'s output row matches."""
    other = copy.deepcopy(bot)
    model = other.model
    with torch.no_grad():
        ln_f = model.transformer.ln_f
        ln_f.weight.zero_()
        ln_f.bias.copy_(torch.linspace(-1, 1, ln_f.bias.numel()))
        model.lm_head.weight.zero_()
        model.lm_head.weight[token] = ln_f.bias
    return other


@pytest.fixture(scope="module")
def slow_server(bot):
    s = LiveServer(paced(create_app(bot, max_active=1, max_waiting=0)))
    yield s
    s.stop()


def wait_for(condition, timeout=10):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def test_a_client_that_disconnects_mid_stream_frees_its_row(slow_server):
    before = slow_server.stats["cancelled"]
    with httpx.stream("POST", f"{slow_server.url}/v1/chat/completions", json=LONG, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert slow_server.stats["active"] == 1
    wait_for(lambda: slow_server.stats["active"] == 0)  # long before its 2048 tokens (20 s)
    assert slow_server.stats["cancelled"] == before + 1


def test_a_non_streamed_request_stops_when_its_real_client_leaves(bot):
    """Through uvicorn and a real socket: a client that gives up on a 2048-token reply (20 s) frees its row at
    once (given 2 s here, for a busy machine)."""
    live = LiveServer(paced(create_app(bot, max_active=1, max_waiting=0)))
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{live.url}/v1/chat/completions", timeout=httpx.Timeout(10, read=0.3),
                       json={**LONG, "stream": False})
        wait_for(lambda: live.stats["active"] == 0, timeout=2)
        assert live.stats["cancelled"] == 1
    finally:
        live.stop()


def asgi_scope(method: str, path: str, body: bytes = b"", host: bytes = b"127.0.0.1:8000") -> dict:
    """The scope an ASGI server gives the app for one HTTP/1.1 request."""
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
            "headers": [(b"host", host), (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())]}


@pytest.mark.parametrize("shown", ["text", "no text"])
def test_a_non_streamed_request_stops_generating_when_its_client_leaves(bot, shown):
    """The client leaves after 5 tokens of a 400-token reply (the server's receive() says http.disconnect); the
    model makes a token every 10 ms until stopped: the generation stops within a step, its row freed, whether its
    tokens show text or not."""
    jobs = []

    async def main():
        loop = asyncio.get_running_loop()
        left = asyncio.Event()

        def pace(batch):
            n = len(batch.rows)
            if n == 5:
                loop.call_soon_threadsafe(left.set)  # the client goes away
            if n >= 5:
                jobs[0].generation.cancelled.wait(0.01)  # 10 ms a token (none once the job is cancelled)

        token = bot.tokenizer.encode("好")[0] if shown == "text" else SYSTEM_ID
        app = paced(create_app(always_says(bot, token), max_active=1, max_waiting=0), pace)
        scheduler = app.state.scheduler
        submit = scheduler.submit
        scheduler.submit = lambda job: (jobs.append(job), submit(job))[1]
        body = json.dumps({"messages": USER, "max_tokens": 400, "ignore_eos": True, "temperature": 0}).encode()
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        sent = []

        async def receive():
            if messages:
                return messages.pop()
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        try:
            await app(asgi_scope("POST", "/v1/chat/completions", body), receive, send)
            deadline = time.time() + 10
            while scheduler.stats()["active"]:  # the worker drops the job before its next step
                assert time.time() < deadline, "the row was not freed"
                await asyncio.sleep(0.01)
        finally:
            scheduler.close()
        return jobs[0].generation, scheduler.stats()

    generation, stats = asyncio.run(main())
    assert 5 <= generation.completion_tokens < 50, generation.completion_tokens
    assert stats["cancelled"] == 1 and stats["completed"] == 0 and stats["active"] == stats["waiting"] == 0


def test_a_full_queue_answers_429_and_concurrent_requests_all_complete(slow_server, server):
    with httpx.stream("POST", f"{slow_server.url}/v1/chat/completions", json=LONG, timeout=30) as r:
        lines = r.iter_lines()  # (kept: a dropped line iterator closes the connection when collected)
        next(lines)
        assert slow_server.stats["active"] == 1
        busy = httpx.post(f"{slow_server.url}/v1/chat/completions", json={"messages": USER}, timeout=30)
        assert assert_openai_error(busy, 429)["type"] == "rate_limit_error"
        busy = httpx.post(f"{slow_server.url}/v1/chat/completions", json={**LONG, "stream": True}, timeout=30)
        assert assert_openai_error(busy, 429)["code"] == "queue_full"  # (streamed too: before any event)
    wait_for(lambda: slow_server.stats["active"] == 0)

    def ask(i):
        return httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                          json={"messages": USER, "max_tokens": 20, "seed": i, "stream": i % 2 == 0})

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(ask, range(12)))
    assert [r.status_code for r in responses] == [200] * 12
    wait_for(lambda: server.stats["active"] == 0 and server.stats["waiting"] == 0)


# --- the chat page ------------------------------------------------------------------------------------------------


def test_the_page_is_self_contained(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and "charset=utf-8" in r.headers["content-type"]
    assert "崽崽" in r.text
    for outside in ('src="http', "src='http", 'href="http', "href='http", "@import", "url("):
        assert outside not in r.text
    # no Swagger UI / ReDoc page: theirs load from a CDN, blank offline; the OpenAPI schema itself stays
    assert httpx.get(server.url + "/docs").status_code == 404
    assert httpx.get(server.url + "/redoc").status_code == 404
    assert "/v1/chat/completions" in httpx.get(server.url + "/openapi.json").json()["paths"]
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert "/openapi.json" in readme and "接口文档在 `/docs`" not in readme and "page at `/docs`" not in readme


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def browser():
    """A headless Debian Chromium driven by selenium, with its own throwaway profile."""
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("needs Debian's chromium and chromium-driver (make test installs them as root)")
    profile = tempfile.mkdtemp(prefix="zaizai-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=900,700",
                 "--lang=zh-CN"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver, name):
    TEST_OUTPUT.mkdir(exist_ok=True)
    path = TEST_OUTPUT / name
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")


def test_chat_in_a_real_headless_chromium(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    driver.get(server.url + "/")
    wait = WebDriverWait(driver, 20)
    wait.until(lambda d: d.find_element(By.ID, "model").text.startswith("zaizai-"))
    # a long reply (the page's own max-tokens setting), so that the stream is seen while it grows
    driver.execute_script("document.getElementById('max_tokens').value = 16;"
                          "document.getElementById('temperature').value = 0;")
    # record every text the reply bubble shows, to see it streamed piece by piece rather than at once
    driver.execute_script("""window.shown = []; new MutationObserver((records) => {
          for (const r of records) for (const n of r.addedNodes)
            if (n.nodeType === Node.TEXT_NODE && r.target.classList.contains('assistant')) shown.push(n.data);
        }).observe(document.getElementById('log'), {subtree: true, childList: true});""")
    box = driver.find_element(By.ID, "input")
    box.send_keys("你好")
    driver.find_element(By.ID, "send").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.user"))
    assert driver.find_element(By.CSS_SELECTOR, ".msg.user").text == "你好"
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant:not(.streaming)"))
    reply = driver.find_element(By.CSS_SELECTOR, ".msg.assistant").text
    assert reply and reply != "(…)" and not driver.find_elements(By.CSS_SELECTOR, ".msg.error")
    assert driver.find_element(By.ID, "send").is_enabled()
    shown = driver.execute_script("return window.shown")
    assert len(shown) > 1 and shown[-1] == reply, shown
    assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(shown, shown[1:])), shown
    screenshot(driver, "chat-page.png")
    # new chat clears the conversation
    driver.find_element(By.ID, "new-chat").click()
    assert not driver.find_elements(By.CSS_SELECTOR, ".msg")
    external = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
        ".filter(u => !u.startsWith(location.origin))")
    assert external == []


def test_the_page_keeps_the_api_key_only_when_asked_and_runs_under_its_csp(server, browser):
    """The key stays with the tab (sessionStorage) unless "remember" is ticked; the Content-Security-Policy lets
    the page's own script and style run (it styled itself and filled in the model's name)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def stored():
        return browser.execute_script("return [localStorage.getItem('zaizai.api_key'), "
                                      "sessionStorage.getItem('zaizai.api_key'), $('remember_key').checked]")

    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 20)
    wait.until(lambda d: d.find_element(By.ID, "model").text.startswith("zaizai-"))   # the script ran
    assert browser.execute_script("return getComputedStyle(document.body).backgroundColor") == "rgb(246, 246, 243)"
    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
    browser.find_element(By.ID, "api_key").send_keys("k1")
    assert stored() == [None, "k1", False]            # not in localStorage by default
    browser.find_element(By.ID, "remember_key").click()
    assert stored() == ["k1", "k1", True]
    browser.refresh()
    wait.until(lambda d: d.find_element(By.ID, "model").text.startswith("zaizai-"))
    assert browser.find_element(By.ID, "api_key").get_attribute("value") == "k1" and stored()[2] is True
    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
    browser.find_element(By.ID, "remember_key").click()   # forget it: gone from localStorage at once
    assert stored() == [None, "k1", False]
    # an older page kept the key in localStorage unasked: moved to the tab's storage
    browser.execute_script("localStorage.setItem('zaizai.api_key', 'old'); sessionStorage.clear()")
    browser.refresh()
    wait.until(lambda d: d.find_element(By.ID, "model").text.startswith("zaizai-"))
    assert stored() == [None, "old", False]


LAYOUT = """const box = (el) => el.getBoundingClientRect();
  // the header's lines of text: one rectangle per line fragment of every text node shown in it
  const walker = document.createTreeWalker(document.querySelector('header'), NodeFilter.SHOW_TEXT);
  const pieces = [];
  for (let node; (node = walker.nextNode());) {
    if (!node.data.trim() || !node.parentElement.checkVisibility()) continue;   // (the closed settings panel)
    const range = document.createRange();
    range.selectNodeContents(node);
    pieces.push(...[...range.getClientRects()].filter((r) => r.width > 0));
  }
  const lines = pieces.sort((a, b) => a.top - b.top)   // a new line starts below the last one's bottom
    .reduce((rows, r) => r.top >= rows.bottom - 2 ? {n: rows.n + 1, bottom: r.bottom}
                                                  : {n: rows.n, bottom: Math.max(rows.bottom, r.bottom)},
            {n: 0, bottom: -Infinity}).n;
  const input = document.getElementById('input');
  return {width: innerWidth, header: box(document.querySelector('header')).height, lines,
          input: box(input).width, placeholder: input.placeholder,
          overflow: document.documentElement.scrollWidth > innerWidth};"""


def at_size(driver, width, height):
    """The viewport of a phone (mobile, touch) or of a desktop window, set through the DevTools protocol."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})
    return driver.execute_script(LAYOUT)


def test_the_page_fits_a_phone_and_keeps_the_desktop_look(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/")
    WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "model").text.startswith("zaizai-"))
    desktop = at_size(browser, 1280, 800)
    screenshot(browser, "chat-page-1280.png")
    phone = at_size(browser, 390, 844)
    screenshot(browser, "chat-page-390.png")
    assert desktop["width"] == 1280 and phone["width"] == 390
    # the desktop: the header on one line, the keyboard hint in the input box
    assert desktop["lines"] == 1 and "Shift" in desktop["placeholder"], desktop
    # the phone: the header on at most two lines, the input box across (nearly) the whole width, no Shift+Enter hint
    assert phone["lines"] <= 2 and phone["header"] <= 2 * desktop["header"], (phone, desktop)
    assert phone["input"] >= 0.8 * phone["width"] and not phone["overflow"], phone
    assert "Shift" not in phone["placeholder"], phone


def test_a_stopped_server_gets_one_error_line_and_the_text_back(bot, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    live = LiveServer(create_app(bot, max_tokens=16))   # its own server, to stop while the page is open
    try:
        browser.get(live.url + "/")
        wait = WebDriverWait(browser, 20)
        wait.until(lambda d: d.find_element(By.ID, "model").text.startswith("zaizai-"))
    finally:
        live.stop()
    at_size(browser, 390, 844)
    for attempt in range(2):   # a second try neither stacks error lines nor loses the text
        box = browser.find_element(By.ID, "input")
        if attempt == 0:
            box.send_keys("你好，在吗")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_element(By.ID, "send").is_enabled() and d.find_elements(By.CSS_SELECTOR, ".error"))
        errors = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".msg.error")]
        assert len(errors) == 1 and "连不上服务器" in errors[0] and "zaizai serve" in errors[0], errors
        assert "Failed to fetch" not in errors[0]
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg.assistant, .msg.user")   # no empty bubble left
        assert box.get_attribute("value") == "你好，在吗"
    screenshot(browser, "chat-page-server-stopped.png")


# --- schemathesis -------------------------------------------------------------------------------------------------



def test_schemathesis_finds_no_server_error(bot):
    """Every operation of the OpenAPI schema, with generated valid and invalid requests (bounded examples)."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error

    # its own server with a small max_tokens cap, so that every generated request is quick
    server = LiveServer(create_app(bot, max_tokens=16))
    try:
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models"}
        for operation in operations:
            @given(case=operation.as_strategy())
            @settings(max_examples=SCHEMATHESIS_EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def no_server_error(case):
                case.call_and_validate(checks=[not_a_server_error], timeout=30)

            no_server_error()
    finally:
        server.stop()


SCHEMATHESIS_EXAMPLES = 100
