"""Talk to MiniMind-V in the terminal: chat about images, caption a folder, answer once, or score a question file.

Chat (default; type /help):   python eval_vlm.py                       out/sft_vlm_512.pth, CLIP, tokenizer in model/
Chat about an image:          python eval_vlm.py --image photo.jpg
One answer, then exit:        python eval_vlm.py --image a.jpg --image b.jpg --prompt "What differs?"
Caption a folder (tokens/s):  python eval_vlm.py --caption --image_dir dataset/eval_images
Accuracy on a question file:  python eval_vlm.py --questions out/tiny_assets/data/eval_questions.jsonl
Other weights:                python eval_vlm.py --model_mode 0 --hidden_size 768 --num_hidden_layers 16
A transformers folder:        python eval_vlm.py --load 1 --transformers_dir MiniMind2-V   (scripts/convert_vlm.py)
CPU smoke run on the tiny offline assets (python -m dev.make_assets, then a few training steps):
    python eval_vlm.py --device cpu --hidden_size 64 --num_hidden_layers 2 --model_mode 0 --save_dir out \\
        --tokenizer_path out/tiny_assets/tokenizer --vision_model_path out/tiny_assets/clip \\
        --questions out/tiny_assets/data/eval_questions.jsonl

In the chat, /image PATH attaches an image to your next question, /clear forgets the conversation, /quit (or
Ctrl-D) leaves, and Ctrl-C stops the answer being written. The conversation is fed back to the model; when it no
longer fits --max_total_tokens, the oldest turns are left out.
"""
import argparse
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from common import DEFAULT_DATA_DIR, run_cli
from dataset.processing import ImageError, open_image
from inference.generation import ChatSession, GenerationSettings
from inference.loading import InferenceError, add_model_flags, check_flags, load_model_from_flags
from inference.scoring import SCORING_MAX_NEW_TOKENS, score_questions

DEFAULT_IMAGE_DIR = DEFAULT_DATA_DIR / "eval_images"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
# Upstream's captioning request ("Look carefully at this picture: <image> Describe the content of this image."),
# the wording the released weights were evaluated with.
CAPTION_PROMPT = "仔细看一下这张图：\n\n<image>\n\n描述一下这个图像的内容。"
USER_PROMPT = "you> "
MODEL_PROMPT = "minimind> "
CHAT_HELP = ("commands: /image PATH (attach an image to your next question), /clear (forget the conversation), "
             "/quit (or Ctrl-D); Ctrl-C stops an answer")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_argument_group("what to do (default: chat)")
    mode.add_argument("--image", action="append", default=[], metavar="PATH",
                      help="an image for the first question (repeat for several)")
    mode.add_argument("--prompt", default=None, help="answer this one question and exit")
    mode.add_argument("--caption", action="store_true", help="describe every image in --image_dir, with tokens/s")
    mode.add_argument("--image_dir", default=str(DEFAULT_IMAGE_DIR), help="folder for --caption")
    mode.add_argument("--caption_prompt", default=CAPTION_PROMPT, help="request used by --caption (with <image>)")
    mode.add_argument("--questions", default=None, metavar="FILE",
                      help="score an eval_questions.jsonl file (greedy; prints the accuracy)")
    mode.add_argument("--questions_images", default=None, metavar="DIR",
                      help="images of --questions (default: eval_images/ beside the file)")
    add_model_flags(parser)
    args = parser.parse_args(argv)
    chosen = [flag for flag, value in (("--prompt", args.prompt is not None), ("--caption", args.caption),
                                       ("--questions", args.questions is not None)) if value]
    if len(chosen) > 1:
        parser.error(f"choose one of {', '.join(chosen)}")
    if args.image and (args.caption or args.questions):
        parser.error("--image goes with the chat or --prompt, not with --caption or --questions")
    check_flags(parser, args)
    return args


def log(message):
    print(message, file=sys.stderr, flush=True)


@contextmanager
def ctrl_c_stops(session: ChatSession):
    """While an answer streams, Ctrl-C ends the answer at the next token instead of ending the program."""
    previous = signal.signal(signal.SIGINT, lambda signum, frame: session.stop())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def print_answer(session: ChatSession, question: str, settings: GenerationSettings, out=sys.stdout):
    for piece in session.ask(question, settings):
        out.write(piece)
        out.flush()
    out.write("\n")


def speed_line(stats) -> str:
    stopped = ", stopped" if stats.stopped else ""
    return f"[Speed]: {stats.tokens_per_s:.2f} tokens/s ({stats.tokens} tokens in {stats.seconds:.2f} s{stopped})"


def chat(session: ChatSession, settings: GenerationSettings):
    print(f"MiniMind-V chat; {CHAT_HELP}", flush=True)
    if session.pending_images:
        print(f"[{len(session.pending_images)} image(s) attached to your first question]", flush=True)
    while True:
        try:
            line = input(USER_PROMPT).strip()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:  # at the prompt Ctrl-C only drops the line being typed
            print()
            continue
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command in ("/quit", "/exit"):
                return
            if command == "/clear":
                session.clear()
                print("[conversation cleared]", flush=True)
            elif command == "/image":
                path = rest.strip().strip("'\"")
                try:
                    count = session.attach_images([path]) if path else None
                except ImageError as error:
                    print(f"[error: {error}]", flush=True)
                    continue
                print(f"[{count} image(s) attached to your next question]" if path else "[usage: /image PATH]",
                      flush=True)
            else:
                print(f"[{CHAT_HELP}]", flush=True)
            continue
        print(MODEL_PROMPT, end="", flush=True)
        try:
            with ctrl_c_stops(session):
                print_answer(session, line, settings)
        except InferenceError as error:
            print(f"[error: {error}]", flush=True)
            continue
        note = f"; {session.history_dropped} oldest message(s) left out to fit --max_total_tokens" \
            if session.history_dropped else ""
        print(speed_line(session.last_stats) + note, flush=True)


def caption_folder(session_factory, image_dir, prompt: str, settings: GenerationSettings, seed: int):
    """Upstream's eval: describe each image of a folder (sorted, reseeded per image), printing tokens/s."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    paths = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} images in {image_dir}")
    for path in paths:
        session = session_factory()
        try:
            session.attach_images([path])
        except ImageError as error:
            print(f"[Image]: {path.name}: skipped ({error})", flush=True)
            continue
        torch.manual_seed(seed)
        print(f"[Image]: {path.name}\n[Answer]: ", end="", flush=True)
        print_answer(session, prompt if "<image>" in prompt else f"<image>\n{prompt}", settings)
        print(speed_line(session.last_stats) + "\n", flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args.image:
        for source in args.image:  # a bad image fails now, not after the model has loaded
            open_image(source)
    torch.manual_seed(args.seed)
    loaded = load_model_from_flags(args, log=log)
    try:
        if args.questions is not None:
            max_new_tokens = SCORING_MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens
            score = score_questions(loaded, args.questions, args.questions_images, max_new_tokens,
                                    args.max_total_tokens,
                                    log=lambda record, answer, correct: print(
                                        f"{'ok ' if correct else 'no '} {record['image']}: {record['question']} "
                                        f"-> {answer.strip()!r} (want {record['answer']})", flush=True))
            print(score.summary())
            return
        settings = GenerationSettings.from_flags(args)
        if args.caption:
            caption_folder(lambda: ChatSession(loaded, args.max_total_tokens), args.image_dir, args.caption_prompt,
                           settings, args.seed)
            return
        session = ChatSession(loaded, args.max_total_tokens)
        if args.image:
            session.attach_images(args.image)
        if args.prompt is not None:
            print_answer(session, args.prompt, settings)
            log(speed_line(session.last_stats))
            return
        chat(session, settings)
    except InferenceError as error:
        log(f"error: {error}")
        sys.exit(2)


if __name__ == "__main__":
    run_cli(main)
