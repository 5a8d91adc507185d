"""MiniMind-V in the browser (Streamlit): attach images, ask about them, and keep chatting with the history.

Local demo:        python web_demo_vlm.py                          http://127.0.0.1:8000, weights from out/
Other host/port:   python web_demo_vlm.py --host 0.0.0.0 --port 8501 --save_dir out --device cuda
Through streamlit: streamlit run web_demo_vlm.py --server.port 8000 -- --save_dir out
CPU smoke run on the tiny offline assets (python -m dev.make_assets, then a few training steps):
    python web_demo_vlm.py --device cpu --hidden_size 64 --num_hidden_layers 2 --save_dir out \\
        --tokenizer_path out/tiny_assets/tokenizer --vision_model_path out/tiny_assets/clip

The sidebar picks any weights found in --save_dir (.pth files, and folders written by scripts/convert_vlm.py; the
shape is read off each file) and sets temperature, top-p and the answer length. Every browser tab has its own
conversation; the model is loaded once per process and shared.
"""
import argparse
import os
import sys
from pathlib import Path

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

from common import MAX_PORT, bounded
from dataset.processing import IMAGE_MARKER, ImageError
from model.weights import WeightsMismatchError
from inference.generation import ChatSession, GenerationSettings
from inference.loading import (DEFAULT_MAX_NEW_TOKENS, InferenceError, add_model_flags, check_flags, find_checkpoints,
                               load_model, weight_file_from_flags)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_UPLOAD_MB = 10
IMAGE_TYPES = ["png", "jpg", "jpeg", "bmp", "webp", "gif"]
THUMBNAIL_WIDTH = 160
MAX_NEW_TOKENS_LIMIT = 4096


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (0.0.0.0: every interface)")
    server.add_argument("--port", type=bounded(int, 1, MAX_PORT), default=DEFAULT_PORT)
    server.add_argument("--max_upload_mb", type=bounded(int, 1), default=DEFAULT_MAX_UPLOAD_MB,
                        help="largest image accepted")
    add_model_flags(parser)
    return parser


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_flags(parser, args)
    return args


def relaunch_with_streamlit(argv):
    """`python web_demo_vlm.py ...` becomes `streamlit run web_demo_vlm.py --server... -- ...` (same process)."""
    args = parse_args(argv)  # flag errors show here, in the terminal
    command = [sys.executable, "-m", "streamlit", "run", str(Path(__file__).resolve()),
               "--server.address", args.host, "--server.port", str(args.port), "--server.headless", "true",
               "--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer", "--", *argv]
    print(f"MiniMind-V web demo on http://{args.host}:{args.port}", flush=True)
    os.execv(sys.executable, command)


# ---------------------------------------------------------------------------------------------------- model

def weight_choices(args) -> dict:
    """Label -> (path, is a transformers folder): the flags' own choice first, then everything in --save_dir."""
    if args.load == 1:
        preferred = Path(args.transformers_dir)
    else:
        preferred = weight_file_from_flags(args.save_dir, args.weight, args.model_mode, args.hidden_size,
                                           args.use_moe, args.preset)
    choices = {}
    for path in [preferred, *find_checkpoints(args.save_dir)]:
        if path.exists() and str(path.resolve()) not in {str(p.resolve()) for p, _ in choices.values()}:
            label = path.name + ("/" if path.is_dir() else "")
            choices[label] = (path, path.is_dir())
    return choices


@st.cache_resource(show_spinner="Loading the model ...", max_entries=2)
def cached_model(source: str, is_folder: bool, tokenizer_path, vision_model_path: str, device: str, dtype_name: str):
    """One model per (weights, tokenizer, vision encoder, device, dtype) and process, shared by every browser
    session."""
    return load_model(source, is_folder, tokenizer_path, vision_model_path, device, log=None, dtype_name=dtype_name)


# ------------------------------------------------------------------------------------------------------ page

def sidebar(args, choices: dict):
    """Weights choice and generation settings; returns (label, settings)."""
    with st.sidebar:
        st.header("Settings")
        label = st.selectbox("Weights", list(choices), help=f"found in {args.save_dir}")
        temperature = st.slider("Temperature", 0.0, 1.5, float(args.temperature), 0.05, help="0: greedy")
        top_p = st.slider("Top-p", 0.05, 1.0, float(args.top_p), 0.05)
        default_tokens = DEFAULT_MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens
        limit = min(MAX_NEW_TOKENS_LIMIT, args.max_total_tokens - 1)
        max_new_tokens = st.number_input("Max new tokens", 1, limit, min(default_tokens, limit), step=16)
        if st.button("Clear chat", width="stretch"):
            st.session_state.pop("chat", None)
    return label, GenerationSettings(int(max_new_tokens), temperature, top_p)


def speed_caption(stats) -> str:
    stopped = ", stopped" if stats.stopped else ""
    return f"{stats.tokens} tokens, {stats.tokens_per_s:.1f} tokens/s{stopped}"


def show_message(message):
    with st.chat_message(message["role"]):
        if message.get("images"):
            st.image(message["images"], width=THUMBNAIL_WIDTH)
        text = message["content"].replace(f"{IMAGE_MARKER}\n", "").replace(IMAGE_MARKER, "")
        if text:
            st.markdown(text)
        if message.get("stats") is not None:
            st.caption(speed_caption(message["stats"]))


def attach_uploads(session: ChatSession, files, max_upload_mb: int) -> list:
    """Attach every uploaded image to the next question; returns the problems (then nothing is attached)."""
    problems = []
    for upload in files:
        data = upload.getvalue()
        if not data:
            problems.append(f"{upload.name}: the file is empty")
        elif len(data) > max_upload_mb * 1024 * 1024:
            problems.append(f"{upload.name}: {len(data) / 1e6:.1f} MB is over the {max_upload_mb} MB limit")
        else:
            try:
                session.attach_images([data])
            except ImageError as error:  # the message names "image" and PIL's file object: name the upload
                reason = str(error).removeprefix("image: ")
                problems.append(f"{upload.name}: {'not a readable image' if 'not a readable' in reason else reason}")
    if problems:
        session.discard_pending()
    return problems


def main(argv):
    args = parse_args(argv)
    st.set_page_config(page_title="MiniMind-V", page_icon=":eye:", layout="wide")
    st.title("MiniMind-V")
    choices = weight_choices(args)
    if not choices:
        st.error(f"No weights found in {args.save_dir}: download them (`python -m scripts.download --what vlm`), "
                 f"train them, or start the demo with --save_dir / --weight.")
        st.stop()
    label, settings = sidebar(args, choices)
    source, is_folder = choices[label]
    try:
        loaded = cached_model(str(source), is_folder, args.tokenizer_path, args.vision_model_path, args.device,
                              args.dtype)
    except (FileNotFoundError, WeightsMismatchError, InferenceError) as error:
        st.error(f"Cannot load {label}: {error}")
        st.stop()
    dtype = str(loaded.model.dtype).removeprefix("torch.")
    st.caption(f"{label} on {loaded.device} ({dtype}). Attach images with the + in the message box (up to "
               f"{args.max_upload_mb} MB each); the send button turns into a stop button while an answer is written.")

    session = st.session_state.get("chat")
    if session is None or session.loaded is not loaded:
        session = st.session_state["chat"] = ChatSession(loaded, args.max_total_tokens)
    for message in session.messages:
        show_message(message)

    # submit_mode="stop": while an answer is written the send button stops it (the partial answer is kept).
    submitted = st.chat_input("Ask about your images", accept_file="multiple", file_type=IMAGE_TYPES,
                              max_upload_size=args.max_upload_mb, submit_mode="stop")
    if not submitted:
        return
    problems = attach_uploads(session, submitted.files, args.max_upload_mb)
    if problems:
        for problem in problems:
            st.error(problem)
        st.info("Nothing was sent: attach usable images (or none) and ask again.")
        return
    try:
        answer = session.ask(submitted.text, settings)
    except InferenceError as error:
        st.error(str(error))
        return
    show_message(session.messages[-1])
    with st.chat_message("assistant"):
        st.write_stream(answer)
        st.caption(speed_caption(session.last_stats))
    if session.history_dropped:
        st.caption(f"{session.history_dropped} oldest message(s) were left out to fit --max_total_tokens "
                   f"{args.max_total_tokens}.")


if __name__ == "__main__":
    if get_script_run_ctx(suppress_warning=True) is None:
        relaunch_with_streamlit(sys.argv[1:])
    else:
        main(sys.argv[1:])
