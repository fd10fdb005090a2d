"""The labeling page (pipeline/labelserver.py): the store's guarantees through its JSON API, and the page itself
in a real headless Chromium driven by selenium.

The browser tests need Debian's `chromium` and `chromium-driver` (.ci/run installs them); without them they
skip and say so. Everything else here runs anywhere.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Config
from pipeline.data import load_rankings
from pipeline.labeling import item_id
from pipeline.labelserver import LabelStore, Refused, flagged_path, make_server

SCRIPT = "<script>window.__pwned = 1; alert(1)</script>"
IMG = '<img src=x onerror="window.__pwned = 2">'
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


def _to_label(path: Path, n: int = 6) -> Path:
    """A to-label file of n tiny-task items with K = 4; item 0 carries markup in its completions."""
    rows = []
    for i in range(n):
        prompt = f"count up to {['two', 'three', 'four', 'five', 'six', 'two'][i % 6]}\n"
        completions = ["one two", f"one two three {i}", "two", "one one"]
        if i == 0:
            completions = ["one two", SCRIPT, IMG, "one"]
        rows.append({"id": item_id(i, prompt, completions), "prompt": prompt, "completions": completions,
                     "ended": [True, True, True, i != 0]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def store(tmp_path: Path) -> LabelStore:
    return LabelStore(_to_label(tmp_path / "to_label.jsonl"), tmp_path / "rankings.jsonl")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------------------------- the store


def test_concurrent_labelers_never_receive_the_same_item(tmp_path: Path) -> None:
    store = LabelStore(_to_label(tmp_path / "to_label.jsonl", n=60), tmp_path / "rankings.jsonl")
    received: dict[str, list[str]] = {}
    start = threading.Barrier(6)

    def label(name: str) -> None:
        got = received.setdefault(name, [])
        start.wait()
        while (item := store.next_item(name)["item"]) is not None:
            got.append(item["id"])
            store.submit(name, item["id"], [1, 2, 3, 4])

    threads = [threading.Thread(target=label, args=(f"labeler-{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [i for ids in received.values() for i in ids]
    assert sorted(every) == sorted(it["id"] for it in store.items)  # each item handed out exactly once
    rows = [json.loads(line) for line in (tmp_path / "rankings.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(every)  # one line per submission, none lost or interleaved
    assert {r["labeler"] for r in rows} <= set(received) and len(load_rankings(str(tmp_path / "rankings.jsonl"))) == 60


def test_one_item_to_one_labeler_at_a_time_with_leases(tmp_path: Path) -> None:
    clock = Clock()
    store = LabelStore(_to_label(tmp_path / "to_label.jsonl", n=3), tmp_path / "r.jsonl", lease_s=60, clock=clock)
    a = store.next_item("ann")["item"]["id"]
    assert store.next_item("ann")["item"]["id"] == a  # a reload shows the item she holds
    b = store.next_item("bob")["item"]["id"]
    assert b != a
    with pytest.raises(Refused, match="another labeler has it"):
        store.submit("bob", a, [1, 2, 3, 4])
    clock.now = 30
    assert store.next_item("bob")["item"]["id"] == b  # asking again renews bob's lease (to 90)
    clock.now = 61  # ann walked away: her lease expires, the item goes to the next who asks
    assert store.next_item("cat")["item"]["id"] == a
    with pytest.raises(Refused, match="another labeler has it"):
        store.submit("ann", a, [1, 2, 3, 4])
    store.submit("cat", a, [2, 1, 1, 3])
    with pytest.raises(Refused, match="already been ranked"):
        store.submit("ann", a, [1, 2, 3, 4])
    # A skip releases the item to others; the skipper is served something else first.
    store.skip("bob", b)
    nxt = store.next_item("bob")["item"]["id"]
    assert nxt not in (a, b)
    assert store.next_item("dan")["item"]["id"] == b


def test_submissions_follow_the_reward_models_rules(store: LabelStore) -> None:
    item = store.next_item("ann")["item"]
    with pytest.raises(Refused, match="field 'ranks': has 3 entries"):
        store.submit("ann", item["id"], [1, 2, 3])
    with pytest.raises(Refused, match="all completions tied"):
        store.submit("ann", item["id"], [2, 2, 2, 2])
    with pytest.raises(Refused, match="labeler id"):
        store.submit(" ", item["id"], [1, 2, 3, 4])
    saved = store.submit("ann", item["id"], [1, 1, 4, 3], flag="completion B is markup")
    assert saved["progress"] == {"done": 1, "total": 6, "mine": 1}
    row = json.loads(store.output.read_text())
    assert row["ranks"] == [1, 1, 3, 2] and row["labeler"] == "ann" and row["flag"] == "completion B is markup"


def test_resume_after_a_kill_and_flagged_items(tmp_path: Path) -> None:
    to_label, out = _to_label(tmp_path / "to_label.jsonl"), tmp_path / "rankings.jsonl"
    first = LabelStore(to_label, out)
    done = first.next_item("ann")["item"]["id"]
    first.submit("ann", done, [1, 2, 3, 4])
    broken = first.next_item("ann")["item"]["id"]
    first.skip("ann", broken, flag="unsafe")
    with open(out, "a") as f:  # a server killed in the middle of writing a line
        f.write('{"id": "00002-')
    again = LabelStore(to_label, out)
    assert out.read_text().endswith("\n") and len(load_rankings(str(out))) == 1  # the partial line is cut
    assert again.progress("ann") == {"done": 2, "total": 6, "mine": 1}
    served = again.next_item("bob")["item"]["id"]
    assert served not in (done, broken)
    flagged = json.loads(flagged_path(out).read_text())
    assert flagged["id"] == broken and flagged["flag"] == "unsafe"


# --------------------------------------------------------------------------------------------- HTTP


@pytest.fixture
def server(store: LabelStore) -> Iterator[str]:
    httpd = make_server(store, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _call(url: str, body: Any = None, content_type: str = "application/json",
          headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers={"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            raw, status, h = r.read(), r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        raw, status, h = e.read(), e.code, dict(e.headers)
    try:
        return status, json.loads(raw), h
    except ValueError:
        return status, raw.decode(), h


def test_http_api_and_its_guards(server: str) -> None:
    status, page, headers = _call(server + "/")
    assert status == 200 and "<script src=\"/app.js\"" in page
    assert "script-src 'self'" in headers["Content-Security-Policy"] and headers["X-Content-Type-Options"] == "nosniff"
    status, data, _ = _call(server + "/api/next?labeler=ann")
    assert status == 200 and data["item"]["completions"][1] == SCRIPT and "gold" not in data["item"]
    item = data["item"]["id"]
    status, data, _ = _call(server + "/api/submit", {"labeler": "ann", "id": item, "ranks": [1, 2, 3, 4]},
                            content_type="text/plain")
    assert status == 415  # a cross-site form post cannot send JSON
    status, data, _ = _call(server + "/api/submit", {"labeler": "ann", "id": item, "ranks": [1, 2, 3, 4]},
                            headers={"Host": "evil.example:80"})
    assert status == 403  # DNS rebinding: only loopback Host headers on a loopback server
    status, data, _ = _call(server + "/api/submit", {"labeler": "ann", "id": item, "ranks": [1, 1]})
    assert status == 400 and "has 2 entries" in data["error"]
    status, data, _ = _call(server + "/api/submit", {"labeler": "ann", "id": item, "ranks": [1, 2, 3, 4]})
    assert status == 200 and data["progress"]["done"] == 1
    status, data, _ = _call(server + "/api/submit", {"labeler": "bob", "id": item, "ranks": [1, 2, 3, 4]})
    assert status == 409


# --------------------------------------------------------------------------------------------- the browser


@pytest.fixture
def browser() -> Iterator[Any]:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,1600"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def _wait(driver: Any, condition: Callable[[Any], Any], what: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, 15).until(condition, message=f"timed out waiting for {what}")


def test_labeling_in_a_real_browser(
    browser: Any, server: str, store: LabelStore, sft_dir: Path, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = browser
    driver.get(server + "/")
    driver.find_element(By.ID, "labeler").send_keys("ann")
    driver.find_element(By.ID, "start").click()
    _wait(driver, lambda d: d.find_element(By.ID, "prompt").text, "the first item")
    assert driver.find_element(By.ID, "progress").text == "0 / 6 done (you: 0)"

    # Model text is shown as text: the markup is visible, nothing ran, no element was made from it.
    cards = driver.find_elements(By.CSS_SELECTOR, "#completions .completion")
    assert len(cards) == 4
    assert cards[1].find_element(By.CSS_SELECTOR, "pre").text == SCRIPT
    assert cards[2].find_element(By.CSS_SELECTOR, "pre").text == IMG
    assert cards[1].find_element(By.CSS_SELECTOR, "pre").is_displayed()
    assert driver.execute_script("return window.__pwned === undefined")
    assert driver.execute_script("return document.scripts.length") == 1  # only /app.js
    assert driver.execute_script("return document.querySelectorAll('#completions img, #completions script').length") == 0
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018 (reading it is what raises when no alert is open)
    assert "cut off" in cards[3].text and "cut off" not in cards[0].text  # ended: false is shown

    # Rank with a tie: A and B both 1 (buttons), then C 2 and D 3 with the keyboard (selection moves on).
    submit = driver.find_element(By.ID, "submit")
    cards[0].find_elements(By.CSS_SELECTOR, "button.rank")[0].click()
    assert not submit.is_enabled()
    cards[1].find_elements(By.CSS_SELECTOR, "button.rank")[0].click()
    driver.find_element(By.TAG_NAME, "body").send_keys("2")
    driver.find_element(By.TAG_NAME, "body").send_keys("3")
    assert cards[3].find_elements(By.CSS_SELECTOR, "button.rank")[2].get_attribute("aria-pressed") == "true"
    first_prompt = driver.find_element(By.ID, "prompt").text
    submit.click()
    _wait(driver, lambda d: d.find_element(By.ID, "progress").text == "1 / 6 done (you: 1)", "progress 1 / 6")
    assert driver.find_element(By.ID, "status").text == "Saved."

    # All tied cannot be submitted.
    for card in driver.find_elements(By.CSS_SELECTOR, "#completions .completion"):
        card.find_elements(By.CSS_SELECTOR, "button.rank")[1].click()
    assert not driver.find_element(By.ID, "submit").is_enabled()
    assert "all tied" in driver.find_element(By.ID, "status").text

    # Reload: the labeler id is remembered, progress kept, the ranked item not served again.
    driver.refresh()
    _wait(driver, lambda d: d.find_element(By.ID, "progress").text == "1 / 6 done (you: 1)", "progress after reload")
    second_prompt = driver.find_element(By.ID, "prompt").text
    assert second_prompt and second_prompt != first_prompt
    assert driver.find_element(By.ID, "labeler").get_attribute("value") == "ann"

    # A second labeler meanwhile gets another item than the one on ann's screen.
    _, data, _ = _call(server + "/api/next?labeler=bob")
    held_by_ann = [i for i, (who, _) in store.leases.items() if who == "ann"]
    assert len(held_by_ann) == 1 and data["item"]["id"] != held_by_ann[0]

    # Rank the second item with the keyboard only, and Enter submits.
    body = driver.find_element(By.TAG_NAME, "body")
    for key in "2143":
        body.send_keys(key)
    body.send_keys(Keys.ENTER)
    _wait(driver, lambda d: d.find_element(By.ID, "progress").text == "2 / 6 done (you: 2)", "the second submission")

    # Flag & skip: the item is set aside, not ranked.
    driver.find_element(By.ID, "flag").send_keys("broken: repeats itself")
    assert driver.find_element(By.ID, "skip").text == "Flag & skip"
    driver.find_element(By.ID, "skip").click()
    _wait(driver, lambda d: d.find_element(By.ID, "status").text == "Flagged and set aside.", "flag & skip")

    rows = [json.loads(line) for line in store.output.read_text().splitlines()]
    assert [r["labeler"] for r in rows] == ["ann", "ann"]
    assert rows[0]["completions"][1] == SCRIPT and rows[0]["ranks"] == [1, 1, 2, 3]
    assert rows[1]["ranks"] == [2, 1, 4, 3]
    assert json.loads(flagged_path(store.output).read_text())["flag"] == "broken: repeats itself"

    # What the page wrote trains the reward model unchanged (make rm ARGS="rm.data.train=...").
    from pipeline.stages import rm

    metrics = rm.run(make_config(f"rm.init={sft_dir}", f"rm.data.train={store.output}", "rm.max_steps=2",
                                 "rm.batch_size=2", run_dir=tmp_path / "runs"))
    assert math.isfinite(metrics["train/loss"]) and (tmp_path / "runs" / "rm" / "summary.json").is_file()


def test_serve_refuses_a_stage_built_for_the_gold_labeler(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pipeline.__main__ import main

    stage = tmp_path / "runs" / "label"
    stage.mkdir(parents=True)
    (stage / "summary.json").write_text(json.dumps({"config": {"label": {"labeler": "gold"}}}))
    assert main(["label", "--serve", f"run_dir={tmp_path / 'runs'}"]) == 2
    assert "built with label.labeler=gold" in capsys.readouterr().err
    (stage / "summary.json").unlink()
    assert main(["label", "--serve", f"run_dir={tmp_path / 'runs'}"]) == 2  # no to-label file yet
    assert "build it with `make label" in capsys.readouterr().err
