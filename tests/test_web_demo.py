"""web_demo_vlm.py: the Streamlit page through AppTest, and the real thing in headless Chromium.

The browser test starts `python web_demo_vlm.py` as a user would, attaches an image in the chat box through the
DevTools protocol, asks a question, waits for the streamed answer and saves a screenshot. It skips when no
Chromium binary is installed (Debian: `apt-get install chromium`).
"""
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest


REPO_ROOT = Path(__file__).resolve().parents[1]
APP = REPO_ROOT / "web_demo_vlm.py"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
STARTUP_SECONDS = 90
ANSWER_SECONDS = 90


@pytest.fixture(scope="module")
def demo_flags(tiny_vlm_save_dir, tiny_tokenizer_dir, tiny_clip_dir):
    return ["--device", "cpu", "--hidden_size", "64", "--num_hidden_layers", "2", "--save_dir",
            str(tiny_vlm_save_dir),
            "--tokenizer_path", str(tiny_tokenizer_dir), "--vision_model_path", str(tiny_clip_dir),
            "--max_new_tokens", "16", "--temperature", "0", "--max_upload_mb", "1"]


@pytest.fixture
def app(demo_flags, monkeypatch):
    """A fresh browser session of the page (AppTest runs the script in-process; its flags come from argv)."""
    monkeypatch.setattr(sys, "argv", [str(APP), *demo_flags])
    app = AppTest.from_file(str(APP), default_timeout=120)
    app.run()
    assert not app.exception, app.exception
    return app


def chat_texts(app):
    return [(message.name, " ".join(m.value for m in message.markdown), [c.value for c in message.caption])
            for message in app.chat_message]


# ----------------------------------------------------------------------------------------------------- AppTest

def test_minimind3v_checkpoint_answers_an_image(tiny_vlm3_save_dir, tiny_minimind3_tokenizer_dir, tiny_siglip_dir,
                                                shapes_data, monkeypatch):
    flags = ["--device", "cpu", "--save_dir", str(tiny_vlm3_save_dir), "--hidden_size", "64",
             "--tokenizer_path", str(tiny_minimind3_tokenizer_dir), "--vision_model_path", str(tiny_siglip_dir),
             "--max_new_tokens", "16", "--temperature", "0"]
    monkeypatch.setattr(sys, "argv", [str(APP), *flags])
    app = AppTest.from_file(str(APP), default_timeout=120)
    app.run()
    assert not app.exception, app.exception
    assert app.sidebar.selectbox[0].value == "sft_vlm_64.pth"
    image = (shapes_data["eval_images"] / "000000.jpg").read_bytes()
    app.chat_input[0].upload("shape.jpg", image, "image/jpeg").set_value("What shape is in the picture?").run()
    assert not app.exception and not app.error
    (_, question, _), (assistant, answer, captions) = chat_texts(app)
    assert assistant == "assistant" and answer.strip() and "tokens/s" in captions[0]
    assert app.session_state["chat"].loaded.model.config.chat_format == "minimind3"


def test_page_renders(app):
    assert app.title[0].value == "MiniMind-V"
    assert app.sidebar.selectbox[0].value == "sft_vlm_64.pth"
    assert [s.label for s in app.sidebar.slider] == ["Temperature", "Top-p"]
    assert app.sidebar.number_input[0].value == 16
    assert not app.error and not app.chat_message


def test_image_and_question_get_a_streamed_answer_with_history(app, shapes_data):
    image = (shapes_data["eval_images"] / "000000.jpg").read_bytes()
    app.chat_input[0].upload("shape.jpg", image, "image/jpeg").set_value("What shape is in the picture?").run()
    assert not app.exception and not app.error
    (user, question, _), (assistant, answer, captions) = chat_texts(app)
    assert (user, question, assistant) == ("user", "What shape is in the picture?", "assistant")
    assert answer.strip() and "tokens/s" in captions[0]
    app.chat_input[0].set_value("And what colour is it?").run()  # the history is shown and fed back
    assert [name for name, _, _ in chat_texts(app)] == ["user", "assistant"] * 2
    session = app.session_state["chat"]
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2 and len(session.images) == 1
    app.sidebar.button[0].click().run()  # Clear chat
    assert not app.chat_message


@pytest.mark.parametrize("name, data, message", [
    ("notes.png", b"these are words, not pixels", "notes.png: not a readable image"),
    ("empty.jpg", b"", "empty.jpg: the file is empty"),
    ("huge.bmp", b"BM" + bytes(2 * 1024 * 1024), "huge.bmp: 2.1 MB is over the 1 MB limit"),
], ids=["not_an_image", "empty", "too_big"])
def test_bad_upload_shows_a_message(app, name, data, message):
    app.chat_input[0].upload(name, data, "image/png").set_value("What is this?").run()
    assert not app.exception
    assert [e.value for e in app.error] == [message]
    assert "Nothing was sent" in app.info[0].value
    assert not app.chat_message and not app.session_state["chat"].pending_images


def test_each_browser_session_has_its_own_chat(app, demo_flags, monkeypatch):
    app.chat_input[0].set_value("Hello?").run()
    assert len(app.chat_message) == 2
    other = AppTest.from_file(str(APP), default_timeout=120)
    other.run()
    assert not other.chat_message
    assert other.session_state["chat"].loaded is app.session_state["chat"].loaded  # one model per process


# --------------------------------------------------------------------------------------------- real browser

def find_chromium():
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition, seconds: float, what: str, poll: float = 0.25):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")


def http_get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.read()
    except OSError:
        return None


class DevTools:
    """The few Chrome DevTools protocol calls the test needs, over one page's websocket."""

    def __init__(self, websocket):
        self.socket = websocket
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:  # events arrive in between; the answer carries our id
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")


def stop_group(process: subprocess.Popen):
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_browser_uploads_an_image_and_gets_an_answer(demo_flags, shapes_data, tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip(f"no Chromium binary found (looked for {', '.join(CHROMIUM_NAMES)}; Debian: apt-get install "
                    f"chromium)")
    websockets_client = pytest.importorskip("websockets.sync.client",
                                            reason="the DevTools client needs websockets >= 11")
    port, devtools_port = free_port(), free_port()
    server_log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, str(APP), "--port", str(port), *demo_flags], cwd=tmp_path,
                              stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True)
    browser = None
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: server.poll() is not None or http_get(f"{url}/_stcore/health") == b"ok", STARTUP_SECONDS,
                 "the demo server")
        assert server.poll() is None, (tmp_path / "server.log").read_text()
        browser = subprocess.Popen(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", f"--remote-debugging-port={devtools_port}", f"--user-data-dir={tmp_path / 'profile'}",
             "--window-size=1280,900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        targets = wait_for(lambda: [t for t in json.loads(http_get(f"http://127.0.0.1:{devtools_port}/json/list")
                                                          or b"[]") if t["type"] == "page"], 30, "Chromium")
        with websockets_client.connect(targets[0]["webSocketDebuggerUrl"], max_size=None) as websocket:
            page = DevTools(websocket)
            page.call("Page.navigate", url=url)
            wait_for(lambda: page.js("!!document.querySelector('[data-testid=\"stChatInputTextArea\"]')"), 60,
                     "the chat box")
            assert page.js("document.querySelector('h1').innerText") == "MiniMind-V"
            # attach an image with the chat box's file input, as the clip button would
            root = page.call("DOM.getDocument")["root"]["nodeId"]
            file_input = page.call("DOM.querySelector", nodeId=root,
                                   selector='[data-testid="stChatInput"] input[type=file]')["nodeId"]
            image = shapes_data["eval_images"] / "000000.jpg"
            page.call("DOM.setFileInputFiles", nodeId=file_input, files=[str(image)])
            wait_for(lambda: image.name in page.js(
                "document.querySelector('[data-testid=\"stChatInput\"]').innerText"), 30, "the upload")
            page.js("document.querySelector('[data-testid=\"stChatInputTextArea\"]').focus()")
            page.call("Input.insertText", text="What shape is in the picture?")
            send_button = "document.querySelector('[data-testid=\"stChatInputSubmitButton\"]')"
            wait_for(lambda: page.js(f"!{send_button}.disabled"), 30, "the send button (upload finished)")
            page.js(f"{send_button}.click()")
            messages_js = ("Array.from(document.querySelectorAll('[data-testid=\"stChatMessage\"]'))"
                           ".map(m => m.innerText)")
            try:
                messages = wait_for(lambda: (lambda m: m if len(m) == 2 and "tokens/s" in m[1] else None)(
                    page.js(messages_js)), ANSWER_SECONDS, "the answer")
            except AssertionError:
                (tmp_path / "failure.png").write_bytes(
                    base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"]))
                raise AssertionError(f"no answer; page text: {page.js('document.body.innerText')!r}; server log: "
                                     f"{(tmp_path / 'server.log').read_text()[-2000:]}") from None
            assert "What shape is in the picture?" in messages[0]
            answer = messages[1].split("\n")
            assert any(line.strip() and "tokens/s" not in line and line != "smart_toy" for line in answer)
            shown = page.js("Array.from(document.querySelectorAll('[data-testid=\"stChatMessage\"] img'))"
                            ".map(i => i.complete && i.naturalWidth)")
            assert shown and shown[0] > 0  # the uploaded picture is shown with the question
            screenshot = tmp_path / "web_demo.png"
            screenshot.write_bytes(base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"]))
        assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000
        print(f"screenshot: {screenshot}")
    finally:
        if browser is not None:
            stop_group(browser)
        stop_group(server)
        server_log.close()
