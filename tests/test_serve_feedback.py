"""Human feedback: the chat page's feedback mode -> POST /v1/feedback -> preference data on disk -> DPO.

End to end with headless Chromium (Playwright): the person picks the better of two sampled replies, rates
one, edits one; each judgement lands as one JSON line in TRL's conversational preference format (pairs) or
unpaired form (ratings), which lmstack's preference reader accepts (skipping ratings) and `lmstack dpo`
trains on for a step. Beside it: the endpoint's checks, the 404 without --feedback, concurrent writers,
a SIGKILLed writer (whole lines only) and the repair of a torn last line.
Run: python -m pytest tests/test_serve_feedback.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from lmstack.checkpoint import load_checkpoint
from lmstack.cli import main
from lmstack.data.preference import PreferenceStats, load_preference
from lmstack.serve.app import create_app, default_model_name
from lmstack.serve.feedback import FeedbackLog
from lmstack.serve.run import serve_in_thread
from serve_helpers import API_KEY, ARTIFACTS, CHROMIUM, CHROMIUM_ARGS

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a river."}]
SAMPLING = {"temperature": 1.0, "top_p": 0.9, "max_tokens": 12, "seed": 5}
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def feedback_server(tiny_checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("feedback") / "feedback.jsonl"
    app = create_app(tiny_checkpoint, api_keys=[API_KEY], device="cpu", feedback=path, max_tokens_limit=64)
    with serve_in_thread(app) as url:
        yield url, path


@pytest.fixture(scope="module")
def plain_server(tiny_checkpoint):
    with serve_in_thread(create_app(tiny_checkpoint, device="cpu")) as url:
        yield url


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/feedback", json=body, headers=AUTH, timeout=30)


def test_without_feedback_the_endpoint_is_a_clear_404(plain_server):
    for response in (httpx.get(f"{plain_server}/v1/feedback"), httpx.post(f"{plain_server}/v1/feedback", json={})):
        assert response.status_code == 404
        error = response.json()["error"]
        assert error["code"] == "feedback_disabled" and "lmstack serve --feedback FILE" in error["message"]
    assert httpx.get(f"{plain_server}/health").json()["feedback"] is False


def test_judgements_are_checked_and_stored_in_trl_format(feedback_server, tiny_checkpoint):
    url, path = feedback_server
    model = default_model_name(tiny_checkpoint)
    before = len(lines(path)) if path.exists() else 0
    pair = {"kind": "pair", "model": model, "prompt": PROMPT, "chosen": "The Nile.", "rejected": "Cats.",
            "sampling": SAMPLING}
    assert post(url, pair).json() == {"object": "feedback", "saved": True, "kind": "pair"}
    assert post(url, {**pair, "kind": "rating", "chosen": None, "rejected": None, "completion": "The Nile.",
                      "label": True}).status_code == 200
    bad = [({**pair, "rejected": "The Nile."}, "same text"),
           ({**pair, "prompt": PROMPT[:1]}, "end with the user's turn"),
           ({**pair, "kind": "rating"}, "a rating has 'completion' and 'label'"),
           ({**pair, "kind": "vote"}, "kind"),
           ({**pair, "sampling": {**SAMPLING, "temperature": "hot"}}, "temperature"),
           ({**pair, "extra": 1}, "extra")]
    for body, words in bad:
        response = post(url, body)
        assert response.status_code == 400 and words in response.json()["error"]["message"], (body, response.text)
    unknown = post(url, {**pair, "model": "nobody"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert httpx.post(f"{url}/v1/feedback", json=pair, timeout=30).status_code == 401  # the API key guards it
    stored = lines(path)[before:]
    assert len(stored) == 2
    assert stored[0]["prompt"] == PROMPT and stored[0]["chosen"] == [{"role": "assistant", "content": "The Nile."}]
    assert stored[0]["rejected"] == [{"role": "assistant", "content": "Cats."}]
    assert stored[0]["model"] == model and stored[0]["sampling"] == SAMPLING and stored[0]["kind"] == "pair"
    assert stored[0]["time"].endswith("Z")
    assert stored[1]["completion"] == [{"role": "assistant", "content": "The Nile."}] and stored[1]["label"] is True
    assert "chosen" not in stored[1] and stored[1]["kind"] == "rating"


def test_concurrent_posts_write_whole_lines(feedback_server, tiny_checkpoint):
    url, path = feedback_server
    before = len(lines(path)) if path.exists() else 0
    model = default_model_name(tiny_checkpoint)

    def client(i: int) -> None:
        for j in range(12):
            body = {"kind": "edit", "model": model, "prompt": PROMPT, "chosen": f"better {i}-{j} " + "x" * 3000,
                    "rejected": f"worse {i}-{j}", "sampling": SAMPLING}
            assert post(url, body).status_code == 200

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stored = lines(path)[before:]
    assert len(stored) == 72
    assert sorted(r["rejected"][0]["content"] for r in stored) == sorted(f"worse {i}-{j}" for i in range(6)
                                                                          for j in range(12))


WRITER = """
import sys
from lmstack.serve.feedback import FeedbackLog
log = FeedbackLog(sys.argv[1])
print("ready", flush=True)
i = 0
while True:
    log.append({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a" * (i % 5000 + 1)}],
                "rejected": [{"role": "assistant", "content": "b"}], "kind": "pair", "i": i})
    i += 1
"""


def test_a_killed_writer_loses_at_most_its_last_line_and_reopening_repairs_it(tmp_path):
    """SIGKILL can stop a write at a page boundary (Linux checks for a fatal signal between pages), so a
    killed writer may leave part of one line; every line before it is whole, and the next open moves the
    part aside so the file holds whole lines only."""
    path = tmp_path / "fb.jsonl"
    kept = 0
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3 + 0.2 * round_)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        lines = path.read_bytes().split(b"\n")
        assert all(json.loads(line)["kind"] == "pair" for line in lines[:-1])  # all but a possible torn tail
        FeedbackLog(path).close()  # what a restarted server does first
        raw = path.read_bytes()
        assert raw.endswith(b"\n")
        records = [json.loads(line) for line in raw.decode().splitlines()]
        assert len(records) == len(lines) - 1 >= kept and all(r["kind"] == "pair" for r in records)
        assert [r["i"] for r in records[kept:]] == list(range(len(records) - kept))  # nothing lost mid-file
        kept = len(records)
    for aside in tmp_path.glob("fb.jsonl.torn-*"):  # a torn tail is the start of one record, never a whole one
        assert aside.read_bytes().startswith(b'{"prompt"') and not aside.read_bytes().endswith(b"\n")


def test_a_torn_last_line_is_moved_aside_at_startup(tmp_path):
    path = tmp_path / "fb.jsonl"
    whole = json.dumps({"prompt": [{"role": "user", "content": "q"}], "completion": [], "label": True}) + "\n"
    path.write_text(whole + '{"prompt": [{"role": "us')
    log = FeedbackLog(path)
    assert log.torn_bytes == len('{"prompt": [{"role": "us')
    log.append({"kind": "rating"})
    log.close()
    assert [json.loads(line) for line in path.read_text().splitlines()][1] == {"kind": "rating"}
    [aside] = tmp_path.glob("fb.jsonl.torn-*")
    assert aside.read_text() == '{"prompt": [{"role": "us'


# ----------------------------------------------------------------------------- the page, end to end

@pytest.fixture(scope="module")
def browser():
    assert os.path.exists(CHROMIUM), "Chromium is missing: apt-get install -y chromium (see .ci/run)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(browser, url: str):
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "401" not in m.text else None)
    page.goto(url + "/")
    return context, page, errors


def wait_done(page, count: int) -> None:
    page.wait_for_function(f"""() => {{
        const all = document.querySelectorAll('#transcript .message.assistant');
        return all.length >= {count} && [...all].every((m) => !m.classList.contains('streaming')
                                                               && m.dataset.finishReason); }}""", timeout=60_000)


def test_the_page_hides_feedback_when_the_server_does_not_collect_it(browser, plain_server):
    context, page, errors = open_page(browser, plain_server)
    page.wait_for_function("() => !document.getElementById('model-name').textContent.includes('connecting')")
    page.click("#toggle-settings")
    page.fill("#max-tokens", "4")
    page.fill("#prompt", "hello")
    page.press("#prompt", "Enter")
    wait_done(page, 1)
    assert page.is_hidden("#toggle-feedback")
    assert page.locator(".feedback-bar").count() == 0 and page.locator("button.choose").count() == 0
    context.close()
    assert not errors, errors


def test_click_to_pair_on_disk_to_the_reader_and_dpo(browser, feedback_server, tiny_checkpoint, tmp_path):
    url, path = feedback_server
    before = len(lines(path)) if path.exists() else 0
    context, page, errors = open_page(browser, url)
    page.wait_for_selector("#settings:not([hidden])")
    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Tab")
    page.wait_for_selector("#toggle-feedback:not([hidden])")
    page.eval_on_selector("#temperature", "el => { el.value = '1'; el.dispatchEvent(new Event('input')); }")
    page.fill("#seed", "11")
    page.fill("#max-tokens", "12")
    page.fill("#system-prompt", "Be brief.")

    # 1. feedback mode: two replies from one n=2 request, side by side; pick the second
    page.click("#toggle-feedback")
    assert page.get_attribute("#toggle-feedback", "aria-pressed") == "true"
    page.fill("#prompt", "Name a river.")
    with page.expect_request("**/v1/chat/completions") as request:
        page.press("#prompt", "Enter")
    assert request.value.post_data_json["n"] == 2
    wait_done(page, 2)
    replies = [page.locator(".pair .message.assistant").nth(i).text_content() for i in range(2)]
    assert replies[0] != replies[1], "seeded samples 11 and 12 should differ"
    page.fill("#prompt", "Too early")
    page.press("#prompt", "Enter")  # the conversation waits for the pick
    assert "Pick the better" in page.inner_text("#status")
    with page.expect_response("**/v1/feedback") as saved:
        page.locator(".pair-option").nth(1).locator("button.choose").click()
    assert saved.value.status == 200
    page.wait_for_selector(".pair .message.chosen")
    assert "chosen" in page.locator(".pair .message.assistant").nth(1).get_attribute("class")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webui-feedback-pair.png"), full_page=True)

    # 2. back to plain chat: the picked reply is the history; thumbs down on the next reply, then edit it
    page.click("#toggle-feedback")
    page.fill("#prompt", "Another one?")
    with page.expect_request("**/v1/chat/completions") as second:
        page.press("#prompt", "Enter")
    history = second.value.post_data_json["messages"]
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user"]
    assert history[2]["content"].strip() and _same_letters(history[2]["content"], replies[1])
    wait_done(page, 3)
    with page.expect_response("**/v1/feedback"):
        page.locator(".feedback-bar .rate-down").last.click()
    page.wait_for_selector(".feedback-bar[data-rated='down']")
    page.locator(".feedback-bar .edit").last.click()
    page.fill(".edit-box", "The Danube, which flows through ten countries.")
    with page.expect_response("**/v1/feedback"):
        page.click(".save-edit")
    page.wait_for_selector("#transcript .message.assistant[data-edited='true']")
    context.close()
    assert not errors, errors

    stored = lines(path)[before:]
    assert [r["kind"] for r in stored] == ["pair", "rating", "edit"]
    pair, rating, edit = stored
    assert pair["prompt"] == PROMPT and pair["model"] == default_model_name(tiny_checkpoint)
    assert pair["chosen"][0]["content"] == history[2]["content"] and _same_letters(pair["rejected"][0]["content"],
                                                                                   replies[0])
    assert pair["sampling"] == {"temperature": 1, "top_p": 0.95, "max_tokens": 12, "seed": 11}
    assert rating["label"] is False and rating["prompt"] == history
    assert edit["chosen"][0]["content"] == "The Danube, which flows through ten countries."
    assert edit["rejected"][0]["content"] == rating["completion"][0]["content"] and edit["prompt"] == history

    # 3. the preference reader takes the pairs (and skips the rating), and `lmstack dpo` trains on them
    data_file = tmp_path / "judgements.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in stored))
    tokenizer = load_checkpoint(tiny_checkpoint).tokenizer
    stats = PreferenceStats()
    data = load_preference([data_file], tokenizer, 1024, val_fraction=0, stats=stats)
    assert len(data.train) == 2 and stats.ratings_skipped == 1
    out = tmp_path / "dpo"
    assert main(["dpo", "--model", str(tiny_checkpoint), "--data", str(data_file), "--out", str(out),
                 "train.max_steps=1", "train.batch_size=1", "train.device=cpu", "train.eval_every=0",
                 "train.eval_batches=1", "train.tensorboard=false", "dpo.val_fraction=0.5",
                 "dpo.reference=copy", "dpo.sft_weight=0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # ln 2 at step 0 (the chosen-NLL term is off, so the loss is the preference term alone)
    assert summary["steps"] == 1 and summary["final_train_loss"] == pytest.approx(0.6931, abs=1e-3)
    assert summary["data"]["used"] == 2 and summary["data"]["ratings_skipped"] == 1


def _same_letters(a: str, b: str) -> bool:
    """The page shows rendered markdown: compare letters and digits only."""
    import re

    return re.sub(r"[^A-Za-z0-9]", "", a) == re.sub(r"[^A-Za-z0-9]", "", b)
