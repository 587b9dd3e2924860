"""The chat page of `vlm serve`, driven in a real browser: Debian's Chromium (headless) with Selenium.

The server is the command line itself (`python -m vlm serve` in a subprocess) serving a tiny VLM trained here
for a few seconds (`vlm train`, ~80 steps) on questions about the bundled example `shapes.png` until it answers
them: the demo model (10 minutes of training) is not available to the tests. The page uploads the picture,
asks a colour question, and the streamed answer it shows must equal the API's answer to the same request;
then a second turn, a reset, and a pasted image.

Chromium and chromedriver come from Debian (`.ci/run` installs them). Without them the test is skipped on a
developer's machine and fails under CI (`CI=true`).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from importlib import resources
from pathlib import Path

import openai
import pytest

from vlm.cli.train import main as train_main
from vlm.tiny import save_tiny_components

REPO = Path(__file__).resolve().parents[1]
SHAPES = resources.files("vlm.assets") / "examples" / "shapes.png"  # a red circle, a blue triangle, a yellow square
COLOR_Q, SHAPE_Q, DESCRIBE_Q = "What color is the circle?", "What shape is the blue one?", "Describe the picture."
DESCRIPTION = "A red circle, a blue triangle and a yellow square on a white background."
MAX_NEW = 40


def conversation(*turns: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": ("<image>\n" if i == 0 else "") + turn}
            for i, turn in enumerate(turns)]


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory) -> Path:
    """A tiny VLM that has learned three answers about shapes.png (the second as the second turn of a chat)."""
    root = tmp_path_factory.mktemp("browser_model")
    images = root / "images"
    images.mkdir()
    (images / "shapes.png").write_bytes(SHAPES.read_bytes())
    records = [{"id": name, "image": "shapes.png", "conversations": conversation(*turns)} for name, turns in [
        ("color", (COLOR_Q, "red")), ("chat", (COLOR_Q, "red", SHAPE_Q, "triangle")), ("describe", (DESCRIBE_Q, DESCRIPTION))]]
    (root / "data.json").write_text(json.dumps(records * 8))
    llm, vision = save_tiny_components(root / "parts", [t["value"] for r in records for t in r["conversations"]])
    run = root / "run"
    assert train_main(["--model_name_or_path", llm, "--vision_tower", vision, "--data_path", str(root / "data.json"),
                       "--image_folder", str(images), "--output_dir", str(run), "--report_to", "none",
                       "--dataloader_num_workers", "0", "--use_cpu", "True", "--seed", "0", "--logging_steps", "20",
                       "--save_strategy", "no", "--max_steps", "80", "--per_device_train_batch_size", "4",
                       "--learning_rate", "3e-3", "--disable_tqdm", "True"]) == 0
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained_model, tmp_path_factory):
    """`vlm serve` on a free port (a subprocess, as a user starts it); yields the base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve_log") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "vlm", "serve", "--model", str(trained_model), "--port",
                                    str(port), "--max_new_tokens", str(MAX_NEW), "--served_model_name", "shapes",
                                    "--log_level", "warning"], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"vlm serve exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"vlm serve did not answer /health:\n{log.read_text()}"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if json.loads(response.read())["status"] == "ok":
                        break
            except OSError:
                time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        message = "Chromium and chromedriver are needed (apt-get install chromium chromium-driver; .ci/run does)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=900,900"):
        options.add_argument(arg)
    chrome = webdriver.Chrome(options=options, service=Service(driver))  # the given driver: nothing downloaded
    chrome.set_script_timeout(30)
    try:
        yield chrome
    finally:
        chrome.quit()


def api_answer(base: str, messages: list[dict]) -> str:
    api = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)
    return api.chat.completions.create(model="shapes", messages=messages).choices[0].message.content


def shapes_url() -> str:
    return "data:image/png;base64," + base64.b64encode(SHAPES.read_bytes()).decode()


def wait_for(browser, condition, what: str, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout).until(lambda b: condition(b), message=what)


def idle(browser) -> bool:
    return browser.execute_script("return document.body.dataset.state") == "idle"


# Records every text the newest assistant message shows, so the test sees the answer arrive in pieces.
WATCH_ANSWER = """
window.shown = [];
new MutationObserver(() => {
  const answers = document.querySelectorAll('.msg.assistant .text');
  if (answers.length) window.shown.push(answers[answers.length - 1].textContent);
}).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
"""


def ask_on_page(browser, question: str) -> tuple[str, list[str]]:
    """Type `question`, send it, wait for the answer; (the answer shown, the texts shown while it streamed)."""
    from selenium.webdriver.common.by import By

    browser.execute_script(WATCH_ANSWER)
    box = browser.find_element(By.ID, "question")
    box.clear()
    box.send_keys(question)
    browser.find_element(By.ID, "send").click()
    wait_for(browser, lambda b: b.execute_script("return document.body.dataset.state") == "busy" or idle(b), "sent")
    wait_for(browser, idle, f"the answer to {question!r}")
    status = browser.find_element(By.ID, "status").text
    assert not status.startswith("error"), status
    answers = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")
    return answers[-1].text, browser.execute_script("return window.shown")


def test_chat_page_streams_answers_over_turns_reset_and_paste(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(server + "/")
    wait_for(browser, idle, "the page to find the model")
    assert "shapes" in browser.find_element(By.ID, "model").text

    # turn 1: upload the picture, ask its colour question
    browser.find_element(By.ID, "image-input").send_keys(str(SHAPES))
    wait_for(browser, lambda b: b.find_element(By.ID, "image-preview").is_displayed(), "the image preview")
    shown, _ = ask_on_page(browser, COLOR_Q)
    first = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": shapes_url()}},
                                          {"type": "text", "text": COLOR_Q}]}]
    assert shown == api_answer(server, first) == "red"
    assert not browser.find_element(By.ID, "image-preview").is_displayed()  # the image went with that question
    screenshot = tmp_path / "chat.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 1000

    # turn 2: the conversation so far goes with it (the image stays in the first turn)
    shown, _ = ask_on_page(browser, SHAPE_Q)
    second = first + [{"role": "assistant", "content": "red"}, {"role": "user", "content": SHAPE_Q}]
    assert shown == api_answer(server, second)
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg")) == 4

    # reset: an empty conversation; then an image pasted from the clipboard, and a long answer streamed in pieces
    browser.find_element(By.ID, "reset").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
    browser.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], 'shapes.png', {type: 'image/png'}));
        document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: data}));
    """, base64.b64encode(SHAPES.read_bytes()).decode())
    wait_for(browser, lambda b: b.find_element(By.ID, "image-preview").is_displayed(), "the pasted image preview")
    shown, pieces = ask_on_page(browser, DESCRIBE_Q)
    expected = api_answer(server, [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": shapes_url()}}, {"type": "text", "text": DESCRIBE_Q}]}])
    assert shown == expected and expected.startswith("A red circle")
    growing = [p for p in dict.fromkeys(pieces) if p]
    assert len(growing) > 2 and growing[-1] == shown, pieces  # it arrived in pieces, each a prefix of the answer
    assert all(shown.startswith(p) for p in growing), pieces
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg")) == 2
    browser.save_screenshot(str(tmp_path / "after_reset.png"))
