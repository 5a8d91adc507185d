"""scripts/serve_openai_api.py (inference/server.py, api_requests.py, slot_queue.py): the real server on a loopback
port, spoken to with the official `openai` client.

One server (started once for the module, tiny random weights) answers every test; raw HTTP (httpx) sends what
the client would not: malformed bodies, wrong keys, oversized requests, connections dropped mid-answer.
"""
import base64
import functools
import http.server
import io
import json
import random
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402

from dataset.processing import build_prompt, image_processor_for, load_pixel_values  # noqa: E402
from inference.generation import GenerationSettings, answer_once, stream_generation  # noqa: E402
from inference.loading import load_model  # noqa: E402
from dev.serving import wait_until_serving  # noqa: E402
from inference.api_requests import APIError, ServerSettings, read_image_bytes  # noqa: E402
from inference.server import StopCutter  # noqa: E402
from inference.slot_queue import SlotPool  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-key"
MODEL_ID = "sft_vlm_64"
MAX_NEW_TOKENS = 16
MAX_TOTAL_TOKENS = 8192
LONG_ANSWER_TOKENS = 7500  # minutes of decoding on a CPU: only stopping ends it early
LIMITS = dict(max_concurrency=2, max_queue=8, max_images=3, max_image_bytes=50_000, max_image_pixels=100_000,
              max_request_bytes=300_000)
STARTUP_SECONDS = 120
# lmms-eval's `openai` model sends this many requests at once (num_concurrent's default in lmms_eval/models/simple/
# openai.py, lmms-eval 0.7.3); the server's default queue must hold them.
LMMS_EVAL_BURST = 32
CLIENT_RETRIES = 10  # the official client's retries on 429 (its default is 2), for a queue that frees slowly
QUESTION = "What shape is in the picture?"


def running_server(assets: tuple, log_path: Path, limits: dict):
    """Yield (base URL, log path) of a server on a port the OS chooses, tiny random weights, `limits` as flags;
    stop it afterwards."""
    vlm_dir, tokenizer_dir, clip_dir, image_dir = assets
    limit_flags = [item for name, value in limits.items() for item in (f"--{name}", str(value))]
    command = [sys.executable, "-m", "scripts.serve_openai_api", "--port", "0", "--device", "cpu",
               "--weight", str(vlm_dir / f"{MODEL_ID}.pth"), "--hidden_size", "64",
               "--num_hidden_layers", "2", "--tokenizer_path", str(tokenizer_dir),
               "--vision_model_path", str(clip_dir), "--max_new_tokens", str(MAX_NEW_TOKENS),
               "--max_total_tokens", str(MAX_TOTAL_TOKENS), "--temperature", "0", "--api_key", API_KEY,
               "--image_root", str(image_dir), *limit_flags]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        base_url = wait_until_serving(process, log_path, STARTUP_SECONDS)
        yield base_url, log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
    assert "Traceback" not in log_path.read_text(), log_path.read_text()  # every test's requests, handled


@pytest.fixture(scope="module")
def server_assets(tiny_vlm_save_dir, tiny_tokenizer_dir, tiny_clip_dir, shapes_data) -> tuple:
    return tiny_vlm_save_dir, tiny_tokenizer_dir, tiny_clip_dir, shapes_data["eval_images"]


@pytest.fixture(scope="module")
def server(server_assets, tmp_path_factory):
    """Base URL of a running server with the test LIMITS and the path of its log."""
    yield from running_server(server_assets, tmp_path_factory.mktemp("serve") / "server.log", LIMITS)


@pytest.fixture(scope="module")
def default_server(server_assets, tmp_path_factory):
    """The same, with the default --max_concurrency and --max_queue."""
    yield from running_server(server_assets, tmp_path_factory.mktemp("serve_defaults") / "server.log", {})


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def images(shapes_data):
    return sorted(Path(shapes_data["eval_images"]).glob("*.jpg"))


def data_url(path: Path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def question_about(image: Path, text: str = QUESTION) -> list:
    return [{"role": "user", "content": [image_part(data_url(image)), {"type": "text", "text": text}]}]


def ask(client, messages, **kwargs):
    return client.chat.completions.create(model=MODEL_ID, messages=messages, **kwargs)


def ask_streaming(client, messages, **kwargs) -> tuple:
    """(text, finish_reason, usage) of a streamed answer."""
    pieces, finish_reason, usage = [], None, None
    for chunk in ask(client, messages, stream=True, stream_options={"include_usage": True}, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish_reason = choice.finish_reason or finish_reason
    return "".join(pieces), finish_reason, usage


def chat_body(messages, **kwargs) -> dict:
    return {"model": MODEL_ID, "messages": messages, **kwargs}


def post(server, body=None, content=None, key=API_KEY, path="/v1/chat/completions"):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server[0]}{path}", json=body, content=content, headers=headers, timeout=60)


def health(server) -> dict:
    return httpx.get(f"{server[0]}/health", timeout=10).json()


def wait_until(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def loaded(tiny_vlm_save_dir, tiny_tokenizer_dir, tiny_clip_dir):
    """The same weights in this process, for answers to compare the server's with."""
    return load_model(tiny_vlm_save_dir / f"{MODEL_ID}.pth", False, tiny_tokenizer_dir, tiny_clip_dir, "cpu",
                      log=None)


# ------------------------------------------------------------------------------------------------- answers

def test_minimind3v_checkpoint_is_served(tiny_vlm3_save_dir, tiny_minimind3_tokenizer_dir, tiny_siglip_dir, images,
                                         tmp_path):
    weights = tiny_vlm3_save_dir / f"{MODEL_ID}.pth"
    command = [sys.executable, "-m", "scripts.serve_openai_api", "--port", "0", "--device", "cpu",
               "--weight", str(weights), "--tokenizer_path", str(tiny_minimind3_tokenizer_dir),
               "--vision_model_path", str(tiny_siglip_dir), "--max_new_tokens", str(MAX_NEW_TOKENS),
               "--temperature", "0", "--api_key", API_KEY]
    log_path = tmp_path / "server3v.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        base_url = wait_until_serving(process, log_path, STARTUP_SECONDS)
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        text = ask(client, question_about(images[0]), temperature=0).choices[0].message.content
    finally:
        process.terminate()
        process.wait(timeout=15)
    loaded = load_model(weights, False, tiny_minimind3_tokenizer_dir, tiny_siglip_dir, "cpu", log=None)
    expected, _ = answer_once(loaded, QUESTION, [images[0]], GenerationSettings(MAX_NEW_TOKENS, 0.0, 1.0))
    assert text and text == expected
    assert "Traceback" not in log_path.read_text()


def test_lists_the_model_and_checks_the_key(server, client):
    assert [model.id for model in client.models.list().data] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    stranger = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()
    assert health(server)["status"] == "ok"  # no key needed


def test_answer_about_an_image_streamed_and_whole(client, loaded, images):
    whole = ask(client, question_about(images[0]), temperature=0)
    text = whole.choices[0].message.content
    streamed, finish_reason, usage = ask_streaming(client, question_about(images[0]), temperature=0)
    assert text and streamed == text
    assert finish_reason == whole.choices[0].finish_reason == "length"  # random weights never end their turn
    assert usage.completion_tokens == whole.usage.completion_tokens == MAX_NEW_TOKENS
    # The same prompt as the terminal chat builds (image first, then the question) and so the same answer.
    expected, stats = answer_once(loaded, QUESTION, [images[0]], GenerationSettings(MAX_NEW_TOKENS, 0.0, 1.0))
    assert text == expected and whole.usage.prompt_tokens > loaded.model.image_token_count
    other = ask(client, question_about(images[1]), temperature=0).choices[0].message.content
    assert other != text  # the answer depends on the image


def test_history_system_prompt_and_several_images_reach_the_prompt(client, loaded, images):
    second_question = [{"type": "text", "text": "Compare it with"}, image_part(data_url(images[1])),
                       {"type": "text", "text": "and"}, image_part(data_url(images[2]))]
    messages = [{"role": "system", "content": "You answer in one word."}, *question_about(images[0]),
                {"role": "assistant", "content": "A circle."}, {"role": "user", "content": second_question}]
    as_markers = [{"role": "system", "content": "You answer in one word."},
                  {"role": "user", "content": f"<image>\n{QUESTION}"},
                  {"role": "assistant", "content": "A circle."},
                  {"role": "user", "content": "Compare it with\n<image>\nand\n<image>"}]
    # The answer this process gets from the same prompt and the three images in their order.
    prompt = build_prompt(loaded.tokenizer, as_markers, loaded.model.config.image_special_token, True)
    input_ids = loaded.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    pixels = load_pixel_values(images[:3], image_processor_for(loaded.model.config))
    pixel_values = pixels.unsqueeze(0)  # [1, 3, 3, 224, 224]
    expected = "".join(stream_generation(loaded, input_ids, pixel_values, GenerationSettings(8, 0.0, 1.0),
                                         threading.Event(), lambda text, stats: None))
    reply = ask(client, messages, temperature=0, max_tokens=8)
    assert reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens == input_ids.shape[1]
    without_system = ask(client, messages[1:], temperature=0, max_tokens=8)
    assert without_system.usage.prompt_tokens != reply.usage.prompt_tokens


def test_local_file_under_image_root(client, images):
    question = [image_part(images[0].name), {"type": "text", "text": QUESTION}]
    by_name = ask(client, [{"role": "user", "content": question}], temperature=0)
    assert by_name.choices[0].message.content == ask(client, question_about(images[0]),
                                                     temperature=0).choices[0].message.content


def test_seed_reproduces_a_sampled_answer_and_stop_cuts_it(client, images):
    sampled = [ask(client, question_about(images[0]), temperature=1.5, seed=seed).choices[0].message.content
               for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]
    assert ask_streaming(client, question_about(images[0]), temperature=1.5, seed=7)[0] == sampled[0]
    full = ask(client, question_about(images[0]), temperature=0).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = ask(client, question_about(images[0]), temperature=0, stop=[stop, "never there"])
    assert cut.choices[0].message.content == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert ask_streaming(client, question_about(images[0]), temperature=0, stop=stop)[:2] == \
        (full[:full.index(stop)], "stop")


@given(text=st.text(alphabet="ab@", max_size=30), stops=st.lists(st.text(alphabet="ab@", min_size=1, max_size=4),
                                                                 min_size=1, max_size=3),
       cuts=st.lists(st.integers(0, 30), max_size=6))
@hypothesis_settings(max_examples=300, deadline=None)
def test_stop_cutter_matches_cutting_the_whole_text(text, stops, cuts):
    positions = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    cutter = StopCutter(stops)
    sent = "".join(cutter.feed(text[a:b]) for a, b in zip(positions, positions[1:])) + cutter.flush()
    ends = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]  # the stop completed first cuts
    first = min(ends)[1] if ends else len(text)
    assert sent == text[:first] and cutter.hit == (first < len(text))


# -------------------------------------------------------------------------------------------------- load

def test_eight_concurrent_streams_get_their_solo_answers(client, images):
    requests = [(question_about(images[i % len(images)], f"Question {i}: {QUESTION}"),
                 dict(temperature=0) if i % 2 else dict(temperature=1.0, seed=i)) for i in range(8)]
    alone = [ask_streaming(client, messages, **kwargs)[0] for messages, kwargs in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda request: ask_streaming(client, request[0], **request[1])[0], requests))
    assert together == alone and len(set(alone)) > 1


def open_stream(server, messages, max_tokens: int):
    """A streaming request held open by the caller: (httpx client, response, its lines)."""
    http = httpx.Client(timeout=60)
    request = http.build_request("POST", f"{server[0]}/v1/chat/completions",
                                 json=chat_body(messages, stream=True, max_tokens=max_tokens, temperature=0),
                                 headers={"Authorization": f"Bearer {API_KEY}"})
    response = http.send(request, stream=True)
    assert response.status_code == 200
    return http, response, response.iter_lines()  # the line iterator must live on: dropping it closes the stream


def read_first_piece(lines):
    return next(line for line in lines if '"content": "' in line and '"content": ""' not in line)


def close_stream(stream):
    http, response, lines = stream
    lines.close(), response.close(), http.close()


def test_client_leaving_mid_answer_frees_its_slot(server, client, images):
    first = open_stream(server, question_about(images[0]), LONG_ANSWER_TOKENS)
    second = open_stream(server, question_about(images[1]), LONG_ANSWER_TOKENS)
    for stream in (first, second):
        assert read_first_piece(stream[2])
    with ThreadPoolExecutor(1) as pool:  # both slots are busy: this one waits in the queue
        waiting = pool.submit(ask, client, question_about(images[2]), temperature=0)
        wait_until(lambda: health(server)["waiting"] == 1, 30, "the third request to queue")
        close_stream(first)  # leaves mid-answer: its slot goes to the waiting request
        answer = waiting.result(timeout=60)
    assert answer.choices[0].finish_reason == "length" and health(server)["running"] == 1  # `second` still runs
    close_stream(second)
    wait_until(lambda: health(server)["running"] == 0, 30, "the second slot to be freed")
    stopped = stopped_generations(server[1])
    assert len(stopped) >= 2 and max(stopped[-2:]) < LONG_ANSWER_TOKENS


def stopped_generations(log_path: Path) -> list:
    return [int(n) for n in re.findall(r"generation stopped after (\d+) of", log_path.read_text())]


def test_client_leaving_before_a_whole_answer_stops_it(server):
    before = len(stopped_generations(server[1]))
    body = json.dumps(chat_body([{"role": "user", "content": QUESTION}], max_tokens=LONG_ANSWER_TOKENS,
                                temperature=0)).encode()
    host, port = server[0].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as raw:  # a client that gives up waiting
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer " +
                    API_KEY.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: " +
                    str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_until(lambda: health(server)["running"] == 1, 30, "the answer to start")
    wait_until(lambda: len(stopped_generations(server[1])) > before, 30, "the generation to stop")
    assert stopped_generations(server[1])[-1] < LONG_ANSWER_TOKENS
    wait_until(lambda: health(server)["running"] == 0, 30, "the slot to be freed")


def test_full_queue_is_429_and_leaving_the_queue_frees_places(server, client, images):
    capacity = LIMITS["max_concurrency"] + LIMITS["max_queue"]
    held = [open_stream(server, question_about(images[0]), LONG_ANSWER_TOKENS) for _ in range(capacity)]
    try:
        wait_until(lambda: health(server)["waiting"] == LIMITS["max_queue"], 30, "the queue to fill")
        refused = post(server, chat_body(question_about(images[0])))
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
        assert 1 <= int(refused.headers["retry-after"]) <= 60  # whole seconds, as long as openai clients wait
        with pytest.raises(openai.RateLimitError):
            ask(client, question_about(images[0]))
    finally:
        for stream in held:
            close_stream(stream)
    wait_until(lambda: health(server)["running"] == 0 and health(server)["waiting"] == 0, 30, "the queue to empty")
    assert ask(client, question_about(images[0]), max_tokens=1).choices[0].message.content is not None


def test_official_client_waits_out_retry_after_and_gets_its_answer(server, images):
    """With the queue full, the `openai` client's request is refused 429 with Retry-After; the client waits that
    long before each retry and is answered once places free up."""
    events = []  # ("request" or "response", time, status, Retry-After), as the client's HTTP layer sees them
    hooks = {"request": [lambda request: events.append(("request", time.monotonic(), None, None))],
             "response": [lambda response: events.append(("response", time.monotonic(), response.status_code,
                                                          response.headers.get("retry-after")))]}
    patient = openai.OpenAI(base_url=f"{server[0]}/v1", api_key=API_KEY, max_retries=CLIENT_RETRIES, timeout=120,
                            http_client=httpx.Client(event_hooks=hooks))
    held = [open_stream(server, question_about(images[0]), LONG_ANSWER_TOKENS)
            for _ in range(LIMITS["max_concurrency"] + LIMITS["max_queue"])]
    with ThreadPoolExecutor(1) as pool:
        try:
            wait_until(lambda: health(server)["waiting"] == LIMITS["max_queue"], 30, "the queue to fill")
            waiting = pool.submit(ask, patient, question_about(images[1]), max_tokens=1)
            wait_until(lambda: any(event[2] == 429 for event in events), 30, "the client's request to be refused")
        finally:  # before the pool waits for the request: places free up
            for stream in held:
                close_stream(stream)
        answer = waiting.result(timeout=300)
    patient.close()
    wait_until(lambda: health(server)["running"] == 0 and health(server)["waiting"] == 0, 30, "the queue to empty")
    statuses = [status for kind, _, status, _ in events if kind == "response"]
    assert statuses[-1] == 200 and statuses[:-1] and set(statuses[:-1]) == {429}
    assert answer.choices[0].finish_reason == "length"
    for (kind, refused_at, status, retry_after), (next_kind, retried_at, _, _) in zip(events, events[1:]):
        if status == 429:
            assert next_kind == "request" and retried_at - refused_at >= int(retry_after)


def test_retry_after_is_the_wait_at_the_back_of_the_queue():
    pool = SlotPool(["slot 1", "slot 2"], max_queue=3)
    assert pool.retry_after_s() == 1  # no answer timed yet
    pool.release(pool.free.popleft(), busy_s=3.0)
    assert pool.retry_after_s() == 2  # 3 s an answer, two slots, nobody waiting: 1.5 s
    pool.waiting.extend([None] * 3)  # three requests waiting: the fourth would start after (3 + 1) * 3 s / 2
    assert pool.retry_after_s() == 6
    pool.waiting.clear()
    pool.release(pool.free.popleft())  # a slot given back unused (or a stopped answer) leaves the estimate alone
    assert pool.retry_after_s() == 2
    for _ in range(100):
        pool.release(pool.free.popleft(), busy_s=1000.0)
    assert pool.retry_after_s() == 60  # capped: openai clients honour up to 60 s (1.30) or 120 s (3.60)


def test_default_queue_holds_a_harness_burst(default_server, images):
    """lmms-eval's burst of requests, sent while the one default slot is busy: all of them wait in the queue (no
    429, no retry) and are answered."""
    burst_client = openai.OpenAI(base_url=f"{default_server[0]}/v1", api_key=API_KEY, max_retries=0, timeout=300)
    busy = open_stream(default_server, question_about(images[0]), LONG_ANSWER_TOKENS)
    with ThreadPoolExecutor(LMMS_EVAL_BURST) as pool:
        try:
            assert read_first_piece(busy[2])
            burst = [pool.submit(ask, burst_client, question_about(images[i % len(images)], f"Question {i}?"),
                                 temperature=0) for i in range(LMMS_EVAL_BURST)]
            wait_until(lambda: health(default_server)["waiting"] == LMMS_EVAL_BURST, 60, "the burst to queue")
        finally:  # before the pool waits for the burst: the slot frees
            close_stream(busy)
        answers = [request.result(timeout=300) for request in burst]
    assert all(answer.choices[0].finish_reason in ("stop", "length") for answer in answers)


# ---------------------------------------------------------------------------------------------- bad input

def long_text_message() -> list:
    return [{"role": "user", "content": "shape " * MAX_TOTAL_TOKENS}]


def noise_png(size: int) -> Image.Image:
    """Incompressible pixels: the PNG is about 3 bytes per pixel."""
    return Image.frombytes("RGB", (size, size), random.Random(0).randbytes(size * size * 3))


BAD_REQUESTS = {  # name: (body or raw bytes, status, code or None, param)
    "bad_json": (b'{"model": ', 400, "invalid_json", None),
    "not_an_object": (b"[1, 2]", 400, None, None),
    "unknown_role": ({"messages": [{"role": "robot", "content": "hi"}]}, 400, None, "messages[0].role"),
    "last_not_user": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                      400, None, "messages[1].role"),
    "not_an_image": ({"image": "data:image/png;base64," + base64.b64encode(b"plain words").decode()}, 400,
                     "invalid_image", "messages[0].content[0]"),
    "bad_base64": ({"image": "data:image/png;base64,@@@@"}, 400, "invalid_image", "messages[0].content[0]"),
    "too_many_bytes": ({"image": "noise"}, 400, "image_too_large", "messages[0].content[0]"),
    "too_many_pixels": ({"image": "big"}, 400, "invalid_image", "messages[0].content[0]"),
    "too_many_images": ({"images": LIMITS["max_images"] + 1}, 400, "too_many_images", "messages[0]"),
    "over_the_context": ({"messages": long_text_message()}, 400, "context_length_exceeded", "messages"),
    "remote_url": ({"image": "http://127.0.0.1:9/cat.png"}, 400, None, "messages[0].content[0]"),
    "file_outside_root": ({"image": "file:///etc/hostname"}, 400, None, "messages[0].content[0]"),
    "marker_in_text": ({"messages": [{"role": "user", "content": "what is <image>?"}]}, 400, None,
                       "messages[0].content"),
    "temperature": ({"temperature": 5}, 400, None, "temperature"),
    "unknown_model": ({"model": "gpt-4o"}, 404, "model_not_found", "model"),
    "wrong_key": ({"key": "wrong"}, 401, "invalid_api_key", None),
    "no_key": ({"key": None}, 401, "invalid_api_key", None),
    "unknown_route": ({"path": "/v1/completions"}, 404, "not_found", None),
    "body_too_large": (b"{" + b" " * LIMITS["max_request_bytes"] + b"}", 413, "request_too_large", None),
}


def bad_request_for(case, images):
    """(raw bytes or a JSON body, key, path) for one BAD_REQUESTS case."""
    spec = BAD_REQUESTS[case][0]
    if isinstance(spec, bytes):
        return spec, API_KEY, "/v1/chat/completions"
    body = chat_body(question_about(images[0]))
    body.update({k: v for k, v in spec.items() if k in ("messages", "temperature", "model")})
    image = {"noise": png_data_url(noise_png(200)), "big": png_data_url(Image.new("RGB", (400, 400)))}.get(
        spec.get("image"), spec.get("image"))
    if image is not None:
        body["messages"] = [{"role": "user", "content": [image_part(image), {"type": "text", "text": QUESTION}]}]
    if "images" in spec:
        body["messages"] = [{"role": "user", "content": [image_part(data_url(images[0]))] * spec["images"]}]
    return body, spec.get("key", API_KEY), spec.get("path", "/v1/chat/completions")


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_its_status_and_the_server_keeps_serving(case, server, client, images):
    request, key, path = bad_request_for(case, images)
    _, status, code, param = BAD_REQUESTS[case]
    if isinstance(request, bytes):
        response = post(server, content=request, key=key, path=path)
    else:
        response = post(server, request, key=key, path=path)
    error = response.json()["error"]
    assert (response.status_code, error["code"], error["param"]) == (status, code, param), error
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in response.text
    assert ask(client, question_about(images[0]), max_tokens=1).choices[0].finish_reason == "length"


def test_remote_images_are_fetched_only_when_allowed(tmp_path, images):
    (tmp_path / "shape.jpg").write_bytes(images[0].read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as web:
        threading.Thread(target=web.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{web.server_address[1]}/shape.jpg"
        allowed = ServerSettings(MODEL_ID, GenerationSettings(), MAX_TOTAL_TOKENS, allow_remote_images=True)
        assert read_image_bytes(url, "image", allowed) == images[0].read_bytes()
        small = ServerSettings(MODEL_ID, GenerationSettings(), MAX_TOTAL_TOKENS, allow_remote_images=True,
                               max_image_bytes=100)
        with pytest.raises(APIError) as too_big:
            read_image_bytes(url, "image", small)
        assert too_big.value.code == "image_too_large"
        web.shutdown()
    with pytest.raises(APIError) as refused:
        read_image_bytes(url, "image", ServerSettings(MODEL_ID, GenerationSettings(), MAX_TOTAL_TOKENS))
    assert "--allow_remote_images" in refused.value.message


def test_flag_errors_and_a_taken_port(capsys):
    from scripts import serve_openai_api

    with pytest.raises(SystemExit) as exit_info:
        serve_openai_api.parse_args(["--max_queue", "-1"])
    assert exit_info.value.code == 2 and "argument --max_queue: must be an integer >= 0, got -1" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError, match="pick another --port"):
            serve_openai_api.bind("127.0.0.1", taken.getsockname()[1])
