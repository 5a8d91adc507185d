"""Serve a MiniMind-V checkpoint over an OpenAI-compatible chat API (FastAPI + uvicorn), images included.

    python -m scripts.serve_openai_api --weight out/sft_vlm_512.pth            http://127.0.0.1:8998/v1
    python -m scripts.serve_openai_api --load 1 --transformers_dir MiniMind2-V
    python -m scripts.serve_openai_api --api_key SECRET --host 0.0.0.0        (or MINIMIND_API_KEY=SECRET)

Any OpenAI client then talks to it: base_url http://127.0.0.1:8998/v1, model as listed by GET /v1/models.
Images come as image_url parts: data:image/...;base64 URLs; files under --image_root when given; http(s) URLs
only with --allow_remote_images. Requests without `seed` sample with fresh randomness (--seed is not used).
"""
if not __package__:  # started as a file: its folder, not the repo root, is on the import path
    raise SystemExit("run it from the repository root as: python -m scripts.serve_openai_api")

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

from common import MAX_PORT, bounded, run_cli
from inference.generation import GenerationSettings
from inference.loading import add_model_flags, check_flags, load_model_from_flags
from inference.api_requests import SERVER_LOGGER, ServerSettings
from inference.server import create_app

DEFAULT_HOST = "127.0.0.1"  # this machine only, unless told otherwise
DEFAULT_PORT = 8998
API_KEY_ENV = "MINIMIND_API_KEY"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# name: (lowest, help); the defaults are ServerSettings'.
LIMIT_FLAGS = {
    "max_concurrency": (1, "answers generated at once (each a thread on the one model, own KV cache)"),
    "max_queue": (0, "requests waiting for a generation slot, in arrival order; beyond: 429 with Retry-After"),
    "max_request_bytes": (1024, "largest request body in bytes; beyond: 413"),
    "max_image_bytes": (1, "largest image in bytes (after base64 decoding); beyond: 400"),
    "max_image_pixels": (1, "largest image in pixels (width x height), checked before decoding"),
    "max_images": (0, "images per conversation, at most; beyond: 400"),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (0.0.0.0: every interface)")
    server.add_argument("--port", type=bounded(int, 0, MAX_PORT), default=DEFAULT_PORT, help="0: any free port")
    server.add_argument("--api_key", default=os.environ.get(API_KEY_ENV),
                        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}; unset: no key)")
    server.add_argument("--model_name", default=None,
                        help="the model id clients name (default: the weights' file or folder name)")
    limits = parser.add_argument_group("limits")
    for name, (lowest, help_text) in LIMIT_FLAGS.items():
        default = getattr(ServerSettings, name)
        limits.add_argument(f"--{name}", type=bounded(int, lowest), default=default,
                            help=f"{help_text} (default {default})")
    limits.add_argument("--image_root", default=None, metavar="DIR",
                        help="let requests name image files under DIR (default: no local files)")
    limits.add_argument("--allow_remote_images", action="store_true",
                        help="let the server fetch http(s) image URLs (it will fetch whatever clients name)")
    add_model_flags(parser)
    args = parser.parse_args(argv)
    check_flags(parser, args)
    if args.image_root is not None and not Path(args.image_root).is_dir():
        parser.error(f"--image_root {args.image_root} is not a folder")
    if args.api_key == "":
        args.api_key = None
    return args


def log(message):
    print(message, file=sys.stderr, flush=True)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so a taken port fails at once, in one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} ({error.strerror}): pick another --port or --host") from None
    return sock


def main(argv=None):
    import uvicorn

    args = parse_args(argv)
    try:
        sock = bind(args.host, args.port)
    except OSError as error:
        log(f"error: {error}")
        return 2
    loaded = load_model_from_flags(args, log=log)
    model_id = args.model_name or Path(loaded.source).stem
    limits = {name: getattr(args, name) for name in LIMIT_FLAGS}
    settings = ServerSettings(model_id=model_id, generation=GenerationSettings.from_flags(args),
                              max_total_tokens=min(args.max_total_tokens, loaded.max_positions), api_key=args.api_key,
                              image_root=None if args.image_root is None else Path(args.image_root),
                              allow_remote_images=args.allow_remote_images, **limits)
    host, port = sock.getsockname()[:2]
    if args.api_key is None and args.host not in LOOPBACK_HOSTS:
        log(f"warning: listening on {args.host} without --api_key: anyone who can reach this port can use it")
    # inference.server.SERVING_ANNOUNCEMENT reads the URL off this line (dev/serving.py wait_until_serving).
    log(f"serving '{model_id}' at http://{host}:{port}/v1 (max_concurrency {args.max_concurrency}, "
        f"max_queue {args.max_queue}); Ctrl-C stops")
    server_log = logging.getLogger(SERVER_LOGGER)
    server_log.addHandler(logging.StreamHandler())
    server_log.setLevel(logging.INFO)
    config = uvicorn.Config(create_app(loaded, settings), log_level="info", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    run_cli(main)
