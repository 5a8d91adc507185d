"""Starting the API server as a process and waiting until it answers: the tests, dev.bench_serve and
scripts.gpu_check start `python -m scripts.serve_openai_api --port 0` and read its URL off its log."""
import time
import urllib.request
from pathlib import Path

from inference.server import SERVING_ANNOUNCEMENT

SERVER_POLL_S = 0.25
LOG_TAIL_CHARS = 2000


def answers_health(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=5) as response:
            return response.status == 200
    except OSError:  # not listening yet, or refused
        return False


def wait_until_serving(process, log_path: Path, timeout_s: float) -> str:
    """The base URL of a server started as `process` (python -m scripts.serve_openai_api, its output in log_path)
    once the URL it announced answers /health; RuntimeError with the log's tail if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}):\n{log_path.read_text()[-LOG_TAIL_CHARS:]}")
        found = SERVING_ANNOUNCEMENT.search(log_path.read_text())
        if found and answers_health(found.group(1)):
            return found.group(1)
        time.sleep(SERVER_POLL_S)
    raise RuntimeError(f"the server did not start in {timeout_s} s ({log_path}):\n"
                       f"{log_path.read_text()[-LOG_TAIL_CHARS:]}")
