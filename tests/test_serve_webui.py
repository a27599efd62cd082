"""The web chat page end to end: headless Chromium (Debian's package) driven by Playwright.

The page is loaded from a real `lmstack serve` app (in-process, loopback) that requires an API key,
so the tests also walk through the settings panel. Screenshots land in test-artifacts/ (gitignored).
Chromium: `apt-get install chromium` (.ci/run does it); Playwright's own browser download is not used.
Run: python -m pytest tests/test_serve_webui.py
"""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from lmstack.serve.app import create_app
from lmstack.serve.run import serve_in_thread
from serve_helpers import API_KEY, ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, health, wait_idle

# records every distinct text of the newest assistant message, to see the answer grow
OBSERVE_JS = """() => {
  window.__snapshots = [];
  const record = () => {
    const all = document.querySelectorAll('#transcript .message.assistant');
    if (!all.length) return;
    const text = all[all.length - 1].textContent;
    const s = window.__snapshots;
    if (!s.length || s[s.length - 1] !== text) s.push(text);
  };
  new MutationObserver(record).observe(document.getElementById('transcript'),
                                       {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def server(wide_checkpoint):
    app = create_app(wide_checkpoint, api_keys=[API_KEY], device="cpu")
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    assert shutil.which("chromium") or __import__("os").path.exists(CHROMIUM), \
        "Chromium is missing: apt-get install -y chromium (see .ci/run)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, server):
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "401" not in m.text else None)
    page.goto(server + "/")
    # the server wants a key: the page says so and opens the settings
    page.wait_for_selector("#settings:not([hidden])")
    assert "API key" in page.inner_text("#model-name")
    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Tab")  # "change" -> the page retries GET /v1/models
    page.wait_for_function("() => document.getElementById('model-name').textContent.includes('wide-chat')")
    page.evaluate(OBSERVE_JS)
    yield page
    context.close()
    assert not errors, f"the page logged errors: {errors}"


def force_long_answers(page) -> None:
    """A random model may sample end-of-text at once: add ignore_eos to the page's chat requests so every
    answer runs to max_tokens. Done by wrapping fetch in the page rather than intercepting the request,
    so the response reaches the page exactly as the server streams it."""
    page.evaluate("""() => {
      const fetch = window.fetch;
      window.fetch = (url, options) => {
        if (String(url).endsWith('/v1/chat/completions') && options && options.body) {
          options = {...options, body: JSON.stringify({...JSON.parse(options.body), ignore_eos: true})};
        }
        return fetch(url, options);
      };
    }""")


def set_range(page, selector: str, value: float) -> None:
    page.eval_on_selector(selector, """(el, v) => { el.value = String(v);
        el.dispatchEvent(new Event('input')); el.dispatchEvent(new Event('change')); }""", value)


def send(page, text: str):
    page.fill("#prompt", text)
    with page.expect_request("**/v1/chat/completions") as request:
        page.press("#prompt", "Enter")
    return request.value


def wait_answer(page, index: int) -> str:
    """Wait until the index-th assistant message is complete; returns its finish reason."""
    selector = f"#transcript .message.assistant >> nth={index}"
    page.wait_for_function(f"""() => {{
        const m = document.querySelectorAll('#transcript .message.assistant')[{index}];
        return m && !m.classList.contains('streaming') && m.dataset.finishReason; }}""", timeout=60_000)
    reason = page.get_attribute(selector, "data-finish-reason")
    if reason == "error":
        raise AssertionError("the page shows an error: " + page.locator("#transcript .message.error").last.text_content())
    return reason


def test_chat_streams_answers_over_several_turns(page, server):
    # seeded sampling: reproducible, and unlike greedy decoding of a random model not stuck repeating
    # one special token (whose text, sent back as history, would re-encode to many more tokens)
    set_range(page, "#temperature", 1)
    page.fill("#seed", "42")
    page.fill("#max-tokens", "300")  # enough tokens to span many frames
    force_long_answers(page)
    page.fill("#system-prompt", "You answer briefly.")
    first = send(page, "Tell me about rivers")
    assert wait_answer(page, 0) == "length"
    body = first.post_data_json
    assert body["stream"] is True and body["temperature"] == 1 and body["seed"] == 42 and body["max_tokens"] == 300
    assert body["messages"] == [{"role": "system", "content": "You answer briefly."},
                                {"role": "user", "content": "Tell me about rivers"}]
    snapshots = page.evaluate("window.__snapshots")
    # '' (just added), then at least two partial states before or including the final text
    assert len(snapshots) >= 3, f"the answer should appear piece by piece, saw {len(snapshots)} states"
    assert [len(s) for s in snapshots] == sorted(len(s) for s in snapshots)
    assert page.get_attribute("body", "data-state") == "idle"
    assert "300 tokens" in page.inner_text("#status") and "tokens/s" in page.inner_text("#status")

    # a fresh conversation of short turns (so the history fits the context) to check what is sent back
    page.click("#new-chat")
    page.fill("#max-tokens", "30")
    request = send(page, "Tell me about rivers")
    wait_answer(page, 0)
    second = send(page, "And about cats?")
    wait_answer(page, 1)
    history = second.post_data_json["messages"]
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user"]
    assert history[3]["content"] == "And about cats?"
    answer = history[2]["content"]  # the first answer as the page assembled it from the stream
    # the same request without streaming gives the same text, and the page shows its letters in order
    plain = httpx.post(f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                       json={**request.post_data_json, "stream": False, "stream_options": None, "ignore_eos": True},
                       timeout=60).json()
    assert answer == plain["choices"][0]["message"]["content"] and answer.strip()
    shown = page.locator("#transcript .message.assistant").first.text_content()
    assert _alnum(answer) == _alnum(shown)  # markdown may drop markup characters, never letters or digits
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "webui-chat.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 5000


def _alnum(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9]", "", text)


def test_stop_button_ends_the_stream_and_frees_the_engine(page, server):
    set_range(page, "#temperature", 1)
    page.fill("#max-tokens", "1000")
    page.fill("#system-prompt", "")
    before = health(server)["engine"]["generated_tokens"]
    force_long_answers(page)
    send(page, "Write a very long story")
    page.wait_for_function("() => window.__snapshots.at(-1).length > 0")  # stop at the first visible text
    assert page.is_visible("#stop")
    page.click("#stop")
    assert wait_answer(page, 0) == "stopped"
    assert "(stopped)" in page.locator("#transcript .message.assistant").first.text_content()
    assert page.is_hidden("#stop") and page.is_enabled("#send")
    stats = wait_idle(server)  # the server saw the connection close and aborted the request
    assert stats["generated_tokens"] - before < 1000
    # the partial answer stays in the conversation (the follow-up is answered by a canned stream: a
    # long partial answer would not fit the tiny model's context again)
    partial = page.locator("#transcript .message.assistant").first.text_content().replace("(stopped)", "")
    page.route("**/v1/chat/completions",
               lambda route: route.fulfill(status=200, content_type="text/event-stream", body=_sse(["Going on."])))
    follow_up = send(page, "Go on")
    assert wait_answer(page, 1) == "stop"
    sent = follow_up.post_data_json["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[1]["content"].strip() and _alnum(sent[1]["content"]) == _alnum(partial)


HOSTILE_PIECES = [
    "Here: <scr", "ipt>window.__pwned = 3</scr", "ipt> and <img src=x onerror=\"window.__pwned = 4\">\n\n",
    "A [bad link](javascript:window.__pwned=5) and a [good link](https://example.org/docs).\n\n",
    "Some **bold** and `<i>code</i>` text.\n\n", "```html\n<b>not bold</b>\n<iframe src=\"/\"></iframe>\n```\n",
    "- item <svg onload=\"window.__pwned=6\">\n- second",
]


def _sse(pieces: list[str]) -> str:
    events = [{"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
               "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
    events += [{"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
    events.append({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def test_model_output_and_user_text_cannot_inject_html(page):
    # 1. the user's own message
    hostile_user = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
    page.fill("#max-tokens", "4")
    send(page, hostile_user)
    wait_answer(page, 0)
    assert page.locator("#transcript .message.user").first.text_content() == hostile_user
    # 2. model output: the chat endpoint is answered with a crafted stream, exactly as the server frames it
    page.route("**/v1/chat/completions",
               lambda route: route.fulfill(status=200, content_type="text/event-stream", body=_sse(HOSTILE_PIECES)))
    send(page, "say something nasty")
    assert wait_answer(page, 1) == "stop"
    page.unroute("**/v1/chat/completions")
    answer = page.locator("#transcript .message.assistant").nth(1)
    text = answer.text_content()
    assert "<script>window.__pwned = 3</script>" in text and 'onerror="window.__pwned = 4"' in text
    assert "<svg onload" in text
    transcript = page.locator("#transcript")
    for tag in ("script", "img", "iframe", "svg", "b", "i"):
        assert transcript.locator(tag).count() == 0, f"a <{tag}> element was injected"
    links = answer.locator("a")
    assert links.count() == 1 and links.first.get_attribute("href") == "https://example.org/docs"
    assert links.first.get_attribute("rel") == "noopener noreferrer nofollow"
    assert "[bad link](javascript:window.__pwned=5)" in text
    assert answer.locator("strong").first.text_content() == "bold"
    assert answer.locator("p code").first.text_content() == "<i>code</i>"
    assert answer.locator("pre code").first.text_content() == '<b>not bold</b>\n<iframe src="/"></iframe>'
    assert answer.locator("li").count() == 2
    assert page.evaluate("window.__pwned") is None
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webui-escaping.png"), full_page=True)


# ----------------------------------------------------------------------------- tools


@pytest.fixture(scope="module")
def tools_server(tiny_checkpoint):
    app = create_app(tiny_checkpoint, api_keys=[API_KEY], device="cpu", tools="calculator")
    with serve_in_thread(app) as url:
        yield url


def test_tools_switch_runs_calls_shows_them_and_answers(browser, tools_server, tiny_checkpoint):
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "401" not in m.text else None)
    page.goto(tools_server + "/")
    page.wait_for_selector("#settings:not([hidden])")
    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Tab")
    page.wait_for_selector("#toggle-tools:not([hidden])")  # the server has tools: the switch appears
    assert page.is_hidden("#tool-choice")
    page.click("#toggle-tools")
    assert page.get_attribute("#toggle-tools", "aria-pressed") == "true" and page.is_visible("#tool-choice")
    page.select_option("#tool-choice", "required")  # a random model calls a tool only when made to
    set_range(page, "#temperature", 1)
    page.fill("#seed", "8")  # seeded: this sample's forced call ends within max_tokens
    page.fill("#max-tokens", "200")
    page.fill("#system-prompt", "")
    with page.expect_request("**/v1/chat/completions") as first:
        send(page, "What is 2 + 2?")
    assert wait_answer(page, 0) == "tool_calls"
    body = first.value.post_data_json
    assert body["tool_choice"] == "required" and [t["function"]["name"] for t in body["tools"]] == ["calculator"]
    call = page.locator("#transcript details.tool-call").first
    call.locator("summary").wait_for()
    assert "calculator" in call.locator("summary").text_content()
    page.wait_for_selector("#transcript details.tool-call[data-done='true']", state="attached", timeout=30_000)
    assert not call.evaluate("d => d.open")  # collapsed until clicked
    call.locator("summary").click()
    arguments = json.loads(call.locator(".tool-arguments").text_content())
    assert set(arguments) == {"expression"}
    result = call.locator(".tool-result").text_content()
    # the page ran it on the server: the same call through the API gives the same result
    direct = httpx.post(f"{tools_server}/v1/tools/calculator", headers={"Authorization": f"Bearer {API_KEY}"},
                        json=arguments).json()["content"]
    assert result == direct and result
    # the conversation went on with the tool turn, and the next reply is a plain answer
    assert wait_answer(page, 1) in ("stop", "length")
    follow_up = [r for r in page.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
                 if r.endswith("/v1/chat/completions")]
    assert len(follow_up) == 2
    history = page.evaluate("chat.history")
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant"]
    assert history[1]["tool_calls"][0]["function"]["arguments"] == json.dumps(arguments, ensure_ascii=False)
    assert history[2] == {"role": "tool", "tool_call_id": history[1]["tool_calls"][0]["id"], "content": direct}
    assert page.get_attribute("body", "data-state") == "idle"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webui-tools.png"), full_page=True)
    context.close()
    assert not errors, f"the page logged errors: {errors}"
