"""The playground page (`/playground`) driven in a real headless Chromium against real servers on loopback.

Debian's `/usr/bin/chromium` (installed by `make test-tools`) is driven through Playwright's Python package;
no browser is downloaded. Two servers: the demo model (SmolLM2-135M GGUF on the llama.cpp engine, as
`make demo` serves it) for streaming, Stop, the context limit and `/generate`; and a scripted tiny Qwen2
whose greedy answer carries HTML and script, behind an API key, for output safety and key handling.

Set QWEN_API_PLAYGROUND_SCREENSHOT=docs/playground.png to save the README's screenshot after an answer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import BrowserContext, ConsoleMessage, Page, Playwright, Request, sync_playwright
from playwright.sync_api import expect as expect_page

from qwen_api.engine.loading import resolve_model
from qwen_api.settings import Settings

from conftest import InProcessServer, serve_in_process

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps trying hosts this closed network refuses.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
API_KEY = "playground-key"
# The scripted model's greedy answer: markup that would run if the page parsed model output as HTML (each
# sentinel global turns NaN if its payload runs), and Markdown bold. Distinct tokens, as the script needs.
HOSTILE = "Look: <img src=x onerror=self.hit++><SCRIPT>\ntop.got--</script> **ok**"
SCREENSHOT_ENV = "QWEN_API_PLAYGROUND_SCREENSHOT"
# How long a wait for an answer may take: generous, because a 2-core machine shared with other test runs can
# slow decoding to about a token a second. The tests assert what happens, not how fast.
WAIT_MS = 180_000


# ---- servers and the browser ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo() -> Iterator[InProcessServer]:
    """The demo GGUF on llama.cpp: 1,024 tokens of context per sequence (4,096 over 4 slots), no waiting room."""
    source = resolve_model("demo")
    assert source.gguf_file is not None
    with serve_in_process(
        source.path / source.gguf_file,
        engine="llamacpp",
        max_batch_size=4,
        max_waiting_sequences=0,  # four sequences in flight at most: one /generate with n=4 fills the server
        kv_cache_tokens=4096,
        max_num_return_sequences=4,
    ) as server:
        yield server


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qwen_api.dev.random_qwen2 import write_scripted_qwen2

    return write_scripted_qwen2(tmp_path_factory.mktemp("hostile-qwen2"), HOSTILE)


@pytest.fixture(scope="module")
def keyed(hostile_dir: Path) -> Iterator[InProcessServer]:
    """The scripted model behind an API key."""
    with serve_in_process(hostile_dir, api_key=API_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    if not (os.access(CHROMIUM, os.X_OK) and shutil.which("chromium")):
        pytest.fail(f"{CHROMIUM} is missing: `make test-tools` installs Debian's chromium")
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright: Playwright, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    """Debian's Chromium, headless, with a fresh profile (--user-data-dir) for this module."""
    expect_page.set_options(timeout=WAIT_MS)
    context = playwright.chromium.launch_persistent_context(
        str(tmp_path_factory.mktemp("chromium-profile")),
        executable_path=CHROMIUM,
        headless=True,
        args=CHROMIUM_FLAGS,
        viewport={"width": 1280, "height": 860},
    )
    yield context
    context.close()


@dataclass
class Tab:
    """One page of the playground, with every request it made and every CSP report or script error."""

    page: Page
    base_url: str
    requests: list[Request] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def foreign_requests(self) -> list[str]:
        origin = urlsplit(self.base_url).netloc
        return [r.url for r in self.requests if urlsplit(r.url).netloc != origin]


OpenTab = Callable[..., Tab]


@pytest.fixture
def open_tab(browser: BrowserContext) -> Iterator[OpenTab]:
    tabs: list[Tab] = []

    def open_(server: InProcessServer, path: str = "/playground") -> Tab:
        page = browser.new_page()
        tab = Tab(page, server.base_url)
        page.on("request", lambda request: tab.requests.append(request))
        page.on("pageerror", lambda exc: tab.problems.append(f"page error: {exc}"))

        def on_console(message: ConsoleMessage) -> None:
            if "Content Security Policy" in message.text:
                tab.problems.append(f"CSP: {message.text}")

        page.on("console", on_console)
        page.goto(server.base_url + path)
        tabs.append(tab)
        return tab

    yield open_
    for tab in tabs:
        tab.page.close()
    # Every test's page stays on its own server and within its own rules.
    for tab in tabs:
        assert tab.foreign_requests() == []
        assert tab.problems == []


# ---- helpers ---------------------------------------------------------------------------------------------------


def set_value(page: Page, selector: str, value: str) -> None:
    """Set any input (range sliders included) as a person would: value, then input and change events."""
    page.eval_on_selector(
        selector,
        "(el, v) => { el.value = v; el.dispatchEvent(new Event('input', {bubbles: true}));"
        " el.dispatchEvent(new Event('change', {bubbles: true})); }",
        value,
    )


def served_model(server: InProcessServer, key: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{server.base_url}/v1/models", headers=headers, timeout=10).json()["data"][0]["id"]


def metric(server: InProcessServer, name: str, labels: str = "") -> float:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    found = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


RECORD_PARTIALS = """() => {
  window.__partials = [];
  const box = document.getElementById("messages");
  new MutationObserver(() => {
    const all = box.querySelectorAll(".message.assistant .content");
    const text = all.length ? all[all.length - 1].textContent : "";
    const seen = window.__partials;
    if (text && seen[seen.length - 1] !== text) seen.push(text);
  }).observe(box, {childList: true, subtree: true, characterData: true});
}"""
STATS = re.compile(r"^TTFT (\d+\.\d\d) s · (\d+) tokens · (\d+\.\d) tokens/s · finish: (stop|length)$")


def send_chat(page: Page, text: str) -> None:
    page.fill("#chat-input", text)
    page.press("#chat-input", "Enter")


# ---- the page and its files --------------------------------------------------------------------------------------


def test_page_and_files_are_served_from_the_package_with_a_strict_csp(demo: InProcessServer) -> None:
    web = files("qwen_api") / "web"
    for path in ("/playground", "/playground/"):
        response = httpx.get(demo.base_url + path)
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        assert response.content == (web / "index.html").read_bytes()
        csp = response.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
        assert response.headers["x-content-type-options"] == "nosniff"
    for name, media_type in [
        ("app.js", "text/javascript; charset=utf-8"),
        ("markdown.js", "text/javascript; charset=utf-8"),
        ("style.css", "text/css; charset=utf-8"),
    ]:
        response = httpx.get(f"{demo.base_url}/playground/{name}")
        assert (response.status_code, response.headers["content-type"]) == (200, media_type)
        assert response.content == (web / name).read_bytes()
        # No HTML parser anywhere in the page's scripts: text reaches the page only as text nodes.
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in response.text
    # Only the shipped files: nothing else of the package or the file system.
    for path in ("/playground/missing.js", "/playground/..%2Fsettings.py", "/playground/%2e%2e/__init__.py"):
        assert httpx.get(demo.base_url + path).status_code == 404
    # The seed's GET / is untouched.
    assert set(httpx.get(demo.base_url + "/").json()) == {"name", "version", "status", "model"}


def test_the_page_runs_only_the_packages_javascript_and_talks_only_to_its_server(
    demo: InProcessServer, open_tab: OpenTab
) -> None:
    tab = open_tab(demo)
    page = tab.page
    expect_page(page.locator("#model-name")).to_have_text(served_model(demo))
    set_value(page, "#temperature", "0")
    set_value(page, "#max-tokens", "8")
    send_chat(page, "Say hello.")
    expect_page(page.locator(".message.assistant .stats")).to_contain_text("tokens")

    scripts = page.evaluate("() => [...document.scripts].map((s) => s.src)")
    assert scripts == [f"{demo.base_url}/playground/markdown.js", f"{demo.base_url}/playground/app.js"]
    web = files("qwen_api") / "web"
    for request in tab.requests:
        if request.resource_type == "script":
            name = urlsplit(request.url).path.rpartition("/")[2]
            assert request.response().body() == (web / name).read_bytes()
    paths = {urlsplit(r.url).path for r in tab.requests}
    assert {"/playground", "/v1/models", "/v1/chat/completions"} <= paths
    assert paths <= {
        "/playground",
        "/playground/style.css",
        "/playground/markdown.js",
        "/playground/app.js",
        "/playground/favicon.svg",
        "/favicon.ico",
        "/v1/models",
        "/v1/chat/completions",
    }
    assert tab.foreign_requests() == []


# ---- chat: streaming, stop, limits -------------------------------------------------------------------------------


def test_a_streamed_answer_grows_in_the_page_and_shows_ttft_and_speed(demo: InProcessServer, open_tab: OpenTab) -> None:
    tab = open_tab(demo)
    page = tab.page
    model = served_model(demo)
    expect_page(page.locator("#model-name")).to_have_text(model)
    page.fill("#system-prompt", "You are a concise assistant.")
    set_value(page, "#temperature", "0")
    set_value(page, "#max-tokens", "64")
    page.evaluate(RECORD_PARTIALS)
    question = "Write a Python function that reverses a string."
    started = time.monotonic()
    send_chat(page, question)
    stats = page.locator(".message.assistant .stats")
    expect_page(stats).to_be_visible()
    waited = time.monotonic() - started

    final = page.locator(".message.assistant .content").text_content()
    partials = [text for text in page.evaluate("() => window.__partials") if text != final]
    assert final and len(set(partials)) >= 2, (partials, final)
    assert page.locator(".message.user .content").text_content() == question
    ttft, tokens, speed, _finish = STATS.match(stats.text_content()).groups()
    assert 0 < float(ttft) < waited and float(speed) > 0  # the first token came before the answer was whole
    # The page counts tokens from the server's own usage: the same greedy request, not streamed, agrees.
    body = {
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": question},
        ],
        "temperature": 0,
        "max_tokens": 64,
    }
    answer = httpx.post(f"{demo.base_url}/v1/chat/completions", json=body, timeout=WAIT_MS / 1000).json()
    assert int(tokens) == answer["usage"]["completion_tokens"]
    # Send is back, Stop is off.
    expect_page(page.locator("#send")).to_be_enabled()
    expect_page(page.locator("#stop-button")).to_be_disabled()

    if os.environ.get(SCREENSHOT_ENV):
        page.screenshot(path=os.environ[SCREENSHOT_ENV])


def test_stop_ends_the_stream_and_the_server_cancels_the_request(demo: InProcessServer, open_tab: OpenTab) -> None:
    tab = open_tab(demo)
    page = tab.page
    expect_page(page.locator("#model-name")).to_have_text(served_model(demo))
    set_value(page, "#temperature", "0.8")
    set_value(page, "#seed", "7")
    set_value(page, "#max-tokens", "900")
    cancelled = metric(demo, "qwen_api_cancellations_total", '{reason="disconnect"}')
    send_chat(page, "Tell me a very long story about a dragon and a knight.")
    content = page.locator(".message.assistant .content")
    page.wait_for_function(
        "() => (document.querySelector('.message.assistant .content')?.textContent ?? '').length > 10",
        timeout=WAIT_MS,
    )
    expect_page(page.locator("#stop-button")).to_be_enabled()
    page.click("#stop-button")

    expect_page(page.locator(".message.assistant.stopped .stats")).to_contain_text("stopped")
    expect_page(page.locator("#send")).to_be_enabled()
    shown = content.text_content()
    deadline = time.monotonic() + 60
    while metric(demo, "qwen_api_cancellations_total", '{reason="disconnect"}') <= cancelled:
        assert time.monotonic() < deadline, "the server never counted the cancellation"
        time.sleep(0.1)
    # Its admission slot is free again, and the engine no longer runs its sequence.
    while metric(demo, "qwen_api_admitted_sequences") != 0 or metric(demo, "qwen_api_running_sequences") != 0:
        assert time.monotonic() < deadline, "the stopped request still holds its slot or runs in the engine"
        time.sleep(0.1)
    time.sleep(0.3)
    assert content.text_content() == shown  # nothing more arrived


def test_clear_while_an_answer_streams_forgets_that_turn_too(demo: InProcessServer, open_tab: OpenTab) -> None:
    """Clear during a streamed answer: the aborted answer used to put its turn back into the history once its
    stream ended, so the next question carried the cleared conversation."""
    tab = open_tab(demo)
    page = tab.page
    expect_page(page.locator("#model-name")).to_have_text(served_model(demo))
    set_value(page, "#max-tokens", "900")
    send_chat(page, "Tell me a very long story about a dragon and a knight.")
    page.wait_for_function(
        "() => (document.querySelector('.message.assistant .content')?.textContent ?? '').length > 10",
        timeout=WAIT_MS,
    )
    page.click("#clear")
    expect_page(page.locator("#chat-empty")).to_have_text("Cleared. Ask something new.")
    expect_page(page.locator("#send")).to_be_enabled()
    set_value(page, "#max-tokens", "4")
    send_chat(page, "Hi")
    expect_page(page.locator(".message.assistant .stats")).to_contain_text("tokens", timeout=WAIT_MS)
    sent = [r for r in tab.requests if r.url.endswith("/v1/chat/completions")]
    assert [m["content"] for m in json.loads(sent[-1].post_data or "{}")["messages"]] == ["Hi"]


def test_a_prompt_beyond_the_context_shows_a_readable_message(demo: InProcessServer, open_tab: OpenTab) -> None:
    tab = open_tab(demo)
    page = tab.page
    expect_page(page.locator("#model-name")).to_have_text(served_model(demo))
    set_value(page, "#max-tokens", "1000")  # the context is 1,024 tokens a sequence
    send_chat(page, "word " * 200)
    error = page.locator(".message.assistant .error")
    expect_page(error).to_contain_text("Too long for the model's context")
    expect_page(error.locator(".error-detail")).to_contain_text("1000")  # the server's message, numbers included
    expect_page(page.locator("#chat-input")).to_have_value("word " * 200)  # given back, to be sent again
    # A refused request leaves no turn in the history: the next one is answered.
    set_value(page, "#max-tokens", "4")
    send_chat(page, "Hi")
    expect_page(page.locator(".message.assistant .stats")).to_contain_text("tokens")


def test_a_full_server_reads_as_busy_not_as_a_failure(demo: InProcessServer, open_tab: OpenTab) -> None:
    tab = open_tab(demo)
    page = tab.page
    expect_page(page.locator("#model-name")).to_have_text(served_model(demo))
    # Another client takes every slot: a /generate with n=4 on a raw socket, closed (cancelled) afterwards.
    host, port = urlsplit(demo.base_url).netloc.split(":")
    body = json.dumps({"prompt": "Count to a thousand.", "max_length": 900, "num_return_sequences": 4}).encode()
    with socket.create_connection((host, int(port))) as hog:
        hog.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 60
        while metric(demo, "qwen_api_admitted_sequences") < 4:
            assert time.monotonic() < deadline, "the other client was never admitted"
            time.sleep(0.05)
        send_chat(page, "Hi")
        error = page.locator(".message.assistant .error")
        expect_page(error).to_contain_text("The server is busy")
        expect_page(error).to_contain_text("1 s")  # its Retry-After
    deadline = time.monotonic() + 60
    while metric(demo, "qwen_api_admitted_sequences") != 0:
        assert time.monotonic() < deadline, "the closed request still holds its slots"
        time.sleep(0.1)


# ---- /generate: several answers side by side ---------------------------------------------------------------------


def test_generate_mode_shows_num_return_sequences_answers_side_by_side(
    demo: InProcessServer, open_tab: OpenTab
) -> None:
    tab = open_tab(demo)
    page = tab.page
    page.click("#tab-generate")
    expect_page(page.locator("#seed")).to_be_hidden()
    expect_page(page.locator("#system-prompt")).to_be_hidden()
    set_value(page, "#num-sequences", "2")
    set_value(page, "#max-tokens", "12")
    set_value(page, "#temperature", "0.9")
    page.fill("#generate-input", "Name a colour.")
    with page.expect_request(lambda r: r.url.endswith("/generate")) as sent:
        page.click("#generate")
    assert sent.value.post_data_json == {
        "prompt": "Name a colour.",
        "max_length": 12,
        "temperature": 0.9,
        "top_p": 0.9,
        "top_k": 50,
        "num_return_sequences": 2,
    }
    answers = page.locator("#generate-results .answer")
    expect_page(answers).to_have_count(2)
    for i in range(2):
        assert answers.nth(i).locator(".content").text_content().strip()
    expect_page(page.locator("#generate-status")).to_contain_text("2 answers in")

    # The seed API's own errors ({"detail": [...]}) read as sentences too.
    set_value(page, "#num-sequences", "9")
    page.click("#generate")
    error = page.locator("#generate-results .error")
    expect_page(error).to_contain_text("The server refused these settings.")
    expect_page(error).to_contain_text("num_return_sequences: must be at most 4 on this server")


# ---- model output is text ------------------------------------------------------------------------------------------


def enter_key(page: Page, key: str) -> None:
    page.fill("#api-key", key)
    page.press("#api-key", "Tab")  # a change event, as leaving the field does


def test_model_output_with_html_and_script_shows_as_text_and_runs_nothing(
    keyed: InProcessServer, open_tab: OpenTab
) -> None:
    tab = open_tab(keyed)
    page = tab.page
    enter_key(page, API_KEY)
    expect_page(page.locator("#model-name")).to_have_text(served_model(keyed, API_KEY))
    set_value(page, "#temperature", "0")
    # The prompt carries the same markup: a person's text is shown as typed, and runs nothing either.
    prompt = "<img src=y onerror=self.mine++> <script>self.mine--</script>"
    send_chat(page, prompt)
    expect_page(page.locator(".message.assistant .stats")).to_contain_text("finish: stop")

    content = page.locator(".message.assistant .content")
    # Rendered as Markdown: a paragraph with a line break and bold "ok"; the markup is characters on the page.
    assert content.text_content() == HOSTILE.replace("\n", "").replace("**", "")
    assert content.locator("p br").count() == 1
    assert content.locator("strong").text_content() == "ok"
    assert page.locator(".message.user .content").text_content() == prompt
    page.wait_for_timeout(300)  # time for an injected image to fail and fire its handler, were there one
    injected = page.evaluate(
        "() => document.querySelectorAll('#messages img, #messages script, #messages iframe, #messages svg').length"
    )
    assert injected == 0
    assert page.evaluate("() => document.scripts.length") == 2
    assert page.evaluate("() => [typeof window.hit, typeof window.got, typeof window.mine]") == ["undefined"] * 3
    assert not [r.url for r in tab.requests if urlsplit(r.url).path in ("/x", "/y", "/playground/x", "/playground/y")]


def test_markdown_renderer_builds_elements_and_keeps_every_tag_as_text(
    keyed: InProcessServer, open_tab: OpenTab
) -> None:
    tab = open_tab(keyed)
    sample = "\n".join(
        [
            "# Title <b>x</b>",
            "Some **bold**, *em*, `code <b>x</b>`, ~~gone~~, [a link](https://example.com/a) and"
            " [bad](javascript:self.bad=1) and ![pic](https://example.com/p.png)",
            '<img src=x onerror="self.bad=1">',
            "",
            "- one",
            "- two",
            "  - nested <i>i</i>",
            "1. first",
            "2. second",
            "> quote <script>self.bad=1</script>",
            "",
            "| a | b |",
            "|---|---|",
            "| <i>1</i> | 2 |",
            "```js",
            'const x = "<script>";',
            "```",
        ]
    )
    shape = tab.page.evaluate(
        """(text) => {
          const box = document.createElement("div");
          box.append(window.QwenMarkdown.render(text));
          const texts = (sel) => [...box.querySelectorAll(sel)].map((e) => e.textContent);
          return {
            h1: texts("h1"), strong: texts("strong"), em: texts("em"), del: texts("del"), code: texts("p code"),
            links: [...box.querySelectorAll("a")].map((a) => [a.textContent, a.href, a.rel]),
            ul: texts("ul > li"), nested: texts("ul ul > li"), ol: texts("ol > li"), quote: texts("blockquote"),
            th: texts("th"), td: texts("td"), pre: texts("pre code"), lang: box.querySelector("pre code").className,
            markup: box.querySelectorAll("b, i, img, script, iframe").length, text: box.textContent,
          };
        }""",
        sample,
    )
    assert shape["h1"] == ["Title <b>x</b>"]
    assert (shape["strong"], shape["em"], shape["del"]) == (["bold"], ["em"], ["gone"])
    assert shape["code"] == ["code <b>x</b>"]
    assert shape["links"] == [["a link", "https://example.com/a", "noopener noreferrer nofollow"]]
    assert (
        "bad (javascript:self.bad=1)" in shape["text"] and "[image: pic] (https://example.com/p.png)" in shape["text"]
    )
    assert '<img src=x onerror="self.bad=1">' in shape["text"]
    assert shape["ul"][:2] == ["one", "twonested <i>i</i>"] and shape["nested"] == ["nested <i>i</i>"]
    assert shape["ol"] == ["first", "second"]
    assert shape["quote"] == ["quote <script>self.bad=1</script>"]
    assert (shape["th"], shape["td"]) == (["a", "b"], ["<i>1</i>", "2"])
    assert shape["pre"] == ['const x = "<script>";'] and shape["lang"] == "language-js"
    assert shape["markup"] == 0
    assert tab.page.evaluate("() => typeof window.bad") == "undefined"
    # Over plain http from another machine there is no clipboard API (a secure context's only): Copy still copies.
    tab.page.evaluate(
        """() => {
          Object.defineProperty(window, "isSecureContext", { value: false });
          const box = document.createElement("div");
          box.id = "copy-test";
          box.append(window.QwenMarkdown.render("```\\ncopy me\\n```"));
          document.body.append(box);
        }"""
    )
    tab.page.click("#copy-test button.copy")
    expect_page(tab.page.locator("#copy-test button.copy")).to_have_text("Copied")
    assert tab.page.locator("textarea[readonly]").count() == 0  # the copying text area is gone again


# ---- the API key -------------------------------------------------------------------------------------------------


def test_the_api_key_is_asked_for_sent_as_a_header_and_a_wrong_one_reads_as_an_error(
    keyed: InProcessServer, open_tab: OpenTab
) -> None:
    tab = open_tab(keyed)
    page = tab.page
    expect_page(page.locator("#model-name")).to_have_text("(needs an API key)")
    expect_page(page.locator("#key-status")).to_have_text("this server needs a key")

    enter_key(page, API_KEY)
    expect_page(page.locator("#model-name")).to_have_text(served_model(keyed, API_KEY))
    expect_page(page.locator("#key-status")).to_have_text("key accepted")

    enter_key(page, "wrong-key")
    expect_page(page.locator("#key-status")).to_have_text("wrong key")
    send_chat(page, "Hi")
    error = page.locator(".message.assistant .error")
    expect_page(error).to_contain_text("Wrong or missing API key")
    expect_page(error).to_contain_text("Invalid or missing API key")  # the server's own words
    # refused before any answer: no cursor blinks on in the failed bubble, and the message is back in the box
    expect_page(page.locator(".message.assistant.streaming")).to_have_count(0)
    expect_page(page.locator("#chat-input")).to_have_value("Hi")

    # The key travels only in the Authorization header, never in a URL.
    assert not [r.url for r in tab.requests if "key" in urlsplit(r.url).query or API_KEY in r.url]
    sent = [r.all_headers().get("authorization") for r in tab.requests if r.url.endswith("/v1/models")]
    assert f"Bearer {API_KEY}" in sent and "Bearer wrong-key" in sent
    # It lives in this tab's sessionStorage, not in localStorage or cookies.
    assert page.evaluate("() => [localStorage.length, document.cookie]") == [0, ""]
    assert page.evaluate("() => sessionStorage.getItem('qwen-api.playground.api-key')") == "wrong-key"


# ---- the flag ----------------------------------------------------------------------------------------------------


def test_no_playground_flag_turns_the_page_off(hostile_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().playground is True
    assert Settings(_cli_parse_args=["--no-playground"]).playground is False  # type: ignore[call-arg]
    monkeypatch.setenv("QWEN_API_PLAYGROUND", "false")
    assert Settings().playground is False
    monkeypatch.delenv("QWEN_API_PLAYGROUND")
    with serve_in_process(hostile_dir, playground=False) as server:
        for path in ("/playground", "/playground/", "/playground/app.js"):
            assert httpx.get(server.base_url + path).status_code == 404
        assert httpx.get(server.base_url + "/").status_code == 200
