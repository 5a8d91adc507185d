"""Inference plumbing shared by eval_vlm.py (terminal) and web_demo_vlm.py (browser); neither has its own copy.

* `add_model_flags` / `load_model_from_flags`: the model from a native `.pth` (`--load 0`) or from a transformers
  folder written by scripts/convert_vlm.py (`--load 1`), with its tokenizer, on one device.
* `ChatSession`: a multi-turn conversation with images. Prompts come from the shared `build_prompt`, pixels from
  the shared `load_pixel_values`; the oldest turns are left out when the prompt would not fit `--max_seq_len`;
  answers stream piece by piece, can be stopped half-way, and report tokens/s.
* `score_questions`: accuracy on an `eval_questions.jsonl` file (scripts/make_assets.py), greedy decoding.
"""
import json
import queue
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging as hf_logging

from dataset.processing import IMAGE_MARKER, build_prompt, count_image_markers, load_pixel_values, user_content
from model.model_minimind import convert_legacy_state_dict, is_legacy_state_dict
from model.model_vlm import DEFAULT_VISION_MODEL_PATH, MiniMindVLM, VLMConfig
from model.weights import WeightsMismatchError, describe_state_dict, load_weights, read_state_dict, weight_path
from trainer.training import DEFAULT_SAVE_DIR, DEFAULT_TOKENIZER_PATH, check_tokenizer_matches, load_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRANSFORMERS_DIR = REPO_ROOT / "MiniMind2-V"
MODEL_MODES = ("pretrain_vlm", "sft_vlm", "sft_vlm_multi")  # --model_mode 0, 1, 2: which stage's weights
# Upstream's inference defaults (eval_vlm.py / web demo); temperature 0 means greedy decoding here.
DEFAULT_TEMPERATURE = 0.65
DEFAULT_TOP_P = 0.85
DEFAULT_MAX_NEW_TOKENS = 512
DEFAULT_MAX_SEQ_LEN = 8192
DEFAULT_SEED = 2026  # upstream reseeds with this before every eval image
SCORING_MAX_NEW_TOKENS = 32  # eval answers are one short sentence
# How often the consumer of a stream wakes up to notice Ctrl-C or a finished generation thread.
POLL_SECONDS = 0.1


class InferenceError(ValueError):
    """A request the model cannot serve as asked (the prompt does not fit, images and markers disagree)."""


# ------------------------------------------------------------------------------------------------ loading

def add_model_flags(parser):
    """The flags that say which model to load and how to sample from it (shared by both front ends)."""
    files = parser.add_argument_group("model files")
    files.add_argument("--load", type=int, default=0, choices=[0, 1],
                       help="0: native .pth weights; 1: a transformers folder (scripts/convert_vlm.py)")
    files.add_argument("--save_dir", default=str(DEFAULT_SAVE_DIR), help="folder of .pth weights")
    files.add_argument("--model_mode", type=int, default=1, choices=range(len(MODEL_MODES)),
                       help="weights {save_dir}/{mode}_{hidden}.pth: 0 pretrain_vlm, 1 sft_vlm, 2 sft_vlm_multi")
    files.add_argument("--weight", default=None, metavar="PATH", help="a .pth file instead of the --model_mode name")
    files.add_argument("--transformers_dir", default=str(DEFAULT_TRANSFORMERS_DIR),
                       help="the transformers folder read with --load 1")
    files.add_argument("--vision_model_path", default=str(DEFAULT_VISION_MODEL_PATH), help="CLIP ViT-B/16 folder")
    files.add_argument("--tokenizer_path", default=None,
                       help=f"folder with tokenizer.json (default: {DEFAULT_TOKENIZER_PATH.relative_to(REPO_ROOT)}/, "
                            f"or the transformers folder with --load 1)")
    shape = parser.add_argument_group("model shape (--load 0)")
    shape.add_argument("--hidden_size", type=int, default=512)
    shape.add_argument("--num_hidden_layers", type=int, default=8)
    shape.add_argument("--use_moe", type=int, default=0, choices=[0, 1])
    sampling = parser.add_argument_group("generation")
    sampling.add_argument("--max_new_tokens", type=int, default=None,
                          help=f"answer length, at most (default {DEFAULT_MAX_NEW_TOKENS})")
    sampling.add_argument("--max_seq_len", type=int, default=DEFAULT_MAX_SEQ_LEN,
                          help="prompt + answer tokens, at most; the oldest turns are left out to fit")
    sampling.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="0: greedy decoding")
    sampling.add_argument("--top_p", type=float, default=DEFAULT_TOP_P)
    sampling.add_argument("--seed", type=int, default=DEFAULT_SEED)
    sampling.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def check_flags(parser, args):
    """Refuse generation flags that cannot work, through the parser (usage line plus one error line)."""
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        parser.error("--max_new_tokens must be at least 1")
    if args.temperature < 0:
        parser.error("--temperature must be >= 0 (0: greedy)")
    if not 0 < args.top_p <= 1:
        parser.error("--top_p must be in (0, 1]")
    max_new_tokens = DEFAULT_MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens
    if args.max_seq_len <= max_new_tokens:
        parser.error(f"--max_seq_len {args.max_seq_len} leaves no room for a prompt before {max_new_tokens} new tokens")


@dataclass
class LoadedModel:
    """A model ready for generation, its tokenizer, and a lock: one generation at a time per model."""
    model: MiniMindVLM
    tokenizer: object
    device: torch.device
    source: str  # the file or folder the weights came from
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def max_positions(self) -> int:
        return self.model.config.max_position_embeddings


@contextmanager
def quiet_transformers():
    """No progress bars or load reports from transformers while loading."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def weight_file_from_flags(save_dir, weight, model_mode: int, hidden_size: int, use_moe: bool) -> Path:
    """`--weight` if given, else `{save_dir}/{pretrain_vlm|sft_vlm|sft_vlm_multi}_{hidden}{_moe}.pth`."""
    if weight is not None:
        return Path(weight)
    return weight_path(save_dir, MODEL_MODES[model_mode], hidden_size, use_moe)


def read_checkpoint(weight_file) -> dict:
    """The tensors of a .pth file (legacy keys converted), with a hint on how to get a missing one."""
    weight_file = Path(weight_file)
    if not weight_file.is_file():
        raise FileNotFoundError(f"weights not found: {weight_file} (download them with `python scripts/download.py "
                                f"--what vlm`, train them, or pass --weight PATH / --save_dir DIR)")
    state_dict = read_state_dict(weight_file)
    if is_legacy_state_dict(state_dict):
        state_dict = convert_legacy_state_dict(state_dict, VLMConfig())
    return state_dict


def load_native_model(weight_file, vision_model_path, device, hidden_size=None, num_hidden_layers=None,
                      use_moe=None, log=print) -> MiniMindVLM:
    """MiniMindVLM with CLIP from a .pth file; a shape left as None is read off the file itself."""
    state_dict = read_checkpoint(weight_file)
    found = describe_state_dict(state_dict)
    if found["hidden_size"] is None:
        raise WeightsMismatchError(f"{weight_file}: no MiniMind weights in this file")
    if not found["has_vision_proj"]:  # its projection would be random: the images would mean nothing
        raise WeightsMismatchError(f"{weight_file} has no vision_proj (a language-model-only file?): use "
                                   f"pretrain_vlm_* or sft_vlm_* weights")
    config = VLMConfig(hidden_size=found["hidden_size"] if hidden_size is None else hidden_size,
                       num_hidden_layers=found["num_hidden_layers"] if num_hidden_layers is None else num_hidden_layers,
                       use_moe=found["use_moe"] if use_moe is None else bool(use_moe))
    with quiet_transformers():
        model = MiniMindVLM(config, vision_model_path=vision_model_path)
    try:
        load_weights(model, state_dict, log=None)
    except WeightsMismatchError as error:
        raise WeightsMismatchError(str(error).replace("state_dict", str(weight_file), 1)) from None
    if log is not None:
        log(f"loaded {weight_file}: {count_parameters(model) / 1e6:.2f}M parameters (without CLIP)")
    return model.eval().to(device)


def load_transformers_model(folder, vision_model_path, device, log=print) -> MiniMindVLM:
    """A folder written by scripts/convert_vlm.py, read with this repo's class (no remote code runs), plus CLIP."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no transformers model in {folder} (write one with `python scripts/convert_vlm.py "
                                f"--to transformers`, or pass --transformers_dir DIR)")
    with quiet_transformers():
        model = MiniMindVLM.from_pretrained(str(folder), dtype=torch.float32)
        try:
            model.attach_vision_encoder(vision_model_path)
        except ValueError as error:  # a CLIP of another width than the folder's vision_proj
            raise WeightsMismatchError(str(error)) from None
    if log is not None:
        log(f"loaded {folder}: {count_parameters(model) / 1e6:.2f}M parameters (without CLIP)")
    return model.eval().to(device)


def count_parameters(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())  # the tied embedding once


def load_model(source, load_transformers: bool, tokenizer_path, vision_model_path, device, hidden_size=None,
               num_hidden_layers=None, use_moe=None, log=print) -> LoadedModel:
    """Tokenizer first (a quick failure), then the model; checks the two agree on the image placeholder."""
    source = Path(source)
    if tokenizer_path is None:
        tokenizer_path = source if load_transformers and (source / "tokenizer.json").is_file() else \
            DEFAULT_TOKENIZER_PATH
    tokenizer = load_tokenizer(tokenizer_path)
    device = torch.device(device)
    if load_transformers:
        model = load_transformers_model(source, vision_model_path, device, log=log)
    else:
        model = load_native_model(source, vision_model_path, device, hidden_size, num_hidden_layers, use_moe, log=log)
    try:
        check_tokenizer_matches(tokenizer, model.config)
    except ValueError as error:
        raise WeightsMismatchError(f"{tokenizer_path}: {error}") from None
    return LoadedModel(model, tokenizer, device, str(source))


def load_model_from_flags(args, log=print) -> LoadedModel:
    """`load_model` for the flags of `add_model_flags`: the shape flags apply to native weights only."""
    if args.load == 1:
        return load_model(args.transformers_dir, True, args.tokenizer_path, args.vision_model_path, args.device,
                          log=log)
    weight_file = weight_file_from_flags(args.save_dir, args.weight, args.model_mode, args.hidden_size,
                                         bool(args.use_moe))
    return load_model(weight_file, False, args.tokenizer_path, args.vision_model_path, args.device,
                      args.hidden_size, args.num_hidden_layers, bool(args.use_moe), log=log)


def is_transformers_folder(path: Path) -> bool:
    """A folder written by scripts/convert_vlm.py (a CLIP folder has a config.json too)."""
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type") == VLMConfig.model_type
    except (OSError, ValueError):
        return False


def find_checkpoints(save_dir) -> list:
    """Loadable weights in a folder: its .pth files (resume checkpoints too) and transformers subfolders."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    files = sorted(p for p in save_dir.glob("*.pth") if p.is_file())
    folders = sorted(p for p in save_dir.iterdir() if p.is_dir() and is_transformers_folder(p))
    return files + folders


# --------------------------------------------------------------------------------------------- generation

@dataclass
class GenerationSettings:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = DEFAULT_TEMPERATURE  # 0: greedy
    top_p: float = DEFAULT_TOP_P

    @classmethod
    def from_flags(cls, args):
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens
        return cls(max_new_tokens, args.temperature, args.top_p)

    def generate_kwargs(self) -> dict:
        if self.temperature <= 0:
            return dict(max_new_tokens=self.max_new_tokens, do_sample=False)
        return dict(max_new_tokens=self.max_new_tokens, do_sample=True, temperature=self.temperature,
                    top_p=self.top_p)


@dataclass
class AnswerStats:
    tokens: int  # generated, the end-of-turn token included
    seconds: float  # prefill (CLIP included) plus decoding
    stopped: bool  # cut short by stop()

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class StopOnEvent(StoppingCriteria):
    """Ends generation at the next token once `event` is set (from another thread)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class DecodableIdsOnly(LogitsProcessor):
    """Never sample ids the tokenizer cannot decode (the tiny test tokenizer is smaller than the embedding).

    A no-op for the MiniMind2 tokenizer, whose 6400 entries fill the whole vocabulary.
    """

    def __init__(self, tokenizer_size: int):
        self.tokenizer_size = tokenizer_size

    def __call__(self, input_ids, scores):
        if scores.shape[-1] > self.tokenizer_size:
            scores[:, self.tokenizer_size:] = float("-inf")
        return scores


class QueueStreamer(BaseStreamer):
    """Puts the answer's text into a queue token by token, holding back only an unfinished UTF-8 character.

    (transformers' TextStreamer waits for a space or a newline, so a long answer without one would not stream.)
    Byte-level BPE decodes piece by piece: once the decoded text ends cleanly it is final and the ids go.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pieces = queue.Queue()
        self.answer_tokens = 0
        self.prompt_seen = False
        self.undecoded_ids = []

    def put(self, value):
        if not self.prompt_seen:  # generate() hands over the prompt first
            self.prompt_seen = True
            return
        ids = value.flatten().tolist()
        self.answer_tokens += len(ids)
        self.undecoded_ids.extend(ids)
        text = self.tokenizer.decode(self.undecoded_ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # U+FFFD: the bytes of a character are not all there yet
            self._emit(text)

    def end(self):
        self._emit(self.tokenizer.decode(self.undecoded_ids, skip_special_tokens=True))

    def _emit(self, text: str):
        self.undecoded_ids = []
        if text:
            self.pieces.put(text)


class GenerationDone:
    """Queue item the generation thread leaves last: the answer ids, or the exception that ended it."""

    def __init__(self, answer_ids=None, error=None):
        self.answer_ids, self.error = answer_ids, error


def stream_generation(loaded: LoadedModel, input_ids, pixel_values, settings: GenerationSettings,
                      stop_event: threading.Event, on_done):
    """Yield the answer's text pieces while `generate` runs in a thread; `on_done(text, stats)` gets the whole answer.

    input_ids [1, T]; pixel_values [1, N, 3, 224, 224] or None. Leaving the loop early (an exception in the
    consumer, a browser rerun, `break`) stops generation; `on_done` still gets what was generated. An error
    inside `generate` is raised here, in the consumer's thread, and `on_done` is not called.
    """
    streamer = QueueStreamer(loaded.tokenizer)
    prompt_length = input_ids.shape[1]
    kwargs = dict(input_ids=input_ids.to(loaded.device), attention_mask=torch.ones_like(input_ids).to(loaded.device),
                  pixel_values=None if pixel_values is None else pixel_values.to(loaded.device), streamer=streamer,
                  pad_token_id=loaded.tokenizer.pad_token_id, eos_token_id=loaded.tokenizer.eos_token_id,
                  stopping_criteria=StoppingCriteriaList([StopOnEvent(stop_event)]),
                  logits_processor=LogitsProcessorList([DecodableIdsOnly(len(loaded.tokenizer))]),
                  **settings.generate_kwargs())

    def run():
        try:
            with loaded.lock:
                output = loaded.model.generate(**kwargs)
            streamer.pieces.put(GenerationDone(answer_ids=output[0, prompt_length:].tolist()))
        except BaseException as error:  # handed to the consumer thread, which re-raises it
            streamer.pieces.put(GenerationDone(error=error))

    started = time.perf_counter()
    thread = threading.Thread(target=run, name="minimind-generate", daemon=True)
    thread.start()
    done = None
    try:
        while done is None:
            try:
                item = streamer.pieces.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
            if isinstance(item, GenerationDone):
                done = item
            else:
                yield item
    finally:
        if done is None:  # the consumer left early: stop the thread and collect its result
            stop_event.set()
            while done is None:
                item = streamer.pieces.get()
                done = item if isinstance(item, GenerationDone) else None
        thread.join()
        if done.error is None:
            stats = AnswerStats(tokens=streamer.answer_tokens, seconds=time.perf_counter() - started,
                                stopped=stop_event.is_set())
            on_done(loaded.tokenizer.decode(done.answer_ids, skip_special_tokens=True), stats)
    if done.error is not None:
        raise done.error


# -------------------------------------------------------------------------------------------------- chat

def fit_prompt(tokenizer, messages, image_special_token: str, max_prompt_tokens: int):
    """Leave out the oldest turns (a question with its answer and images) until the prompt fits.

    `messages` alternate user/assistant and end with a user message. Whole messages are dropped, so an image's
    placeholder run is never cut. Returns (prompt ids [1, T], number of messages left out, images left out).
    """
    first = 0
    while True:
        kept = messages[first:]
        prompt = build_prompt(tokenizer, kept, image_special_token, add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        if ids.shape[1] <= max_prompt_tokens:
            return ids, first, count_image_markers(messages[:first])
        if len(kept) <= 1:
            raise InferenceError(f"the question alone is {ids.shape[1]} tokens (images count "
                                 f"{len(image_special_token)} each), over the {max_prompt_tokens} left for the "
                                 f"prompt: raise --max_seq_len or lower --max_new_tokens")
        first += 2


class ChatSession:
    """One conversation: its messages (with `<image>` markers), its images in marker order, pending images.

        session = ChatSession(loaded, max_seq_len=8192)
        session.attach_images(["cat.jpg"])          # for the next question; ImageError if unusable
        for piece in session.ask("What is this?", settings):
            print(piece, end="")
        session.last_stats.tokens_per_s
    """

    def __init__(self, loaded: LoadedModel, max_seq_len: int = DEFAULT_MAX_SEQ_LEN):
        if max_seq_len > loaded.max_positions:
            raise InferenceError(f"--max_seq_len {max_seq_len} is over the model's {loaded.max_positions} positions")
        self.loaded = loaded
        self.max_seq_len = max_seq_len
        # {"role", "content"}: user contents carry one `<image>` per image, user messages also "images" (the
        # sources, for display) and answers "stats".
        self.messages = []
        self.images = []  # [3, 224, 224] per image, in the order of the markers in `messages`
        self.pending_images = []  # attached, waiting for the next question
        self.pending_sources = []
        self.stop_event = threading.Event()
        self.last_stats = None
        self.history_dropped = 0  # messages left out of the last prompt to fit max_seq_len

    def attach_images(self, sources):
        """Decode and preprocess images (paths, bytes, file objects) for the next question; all or none."""
        sources = list(sources)
        pixels = load_pixel_values(sources)  # [N, 3, 224, 224]; raises ImageError, attaching nothing
        self.pending_images.extend(pixels)
        self.pending_sources.extend(sources)
        return len(self.pending_images)

    def discard_pending(self):
        self.pending_images, self.pending_sources = [], []

    def clear(self):
        self.messages, self.images, self.last_stats = [], [], None
        self.discard_pending()

    def stop(self):
        """Stop the answer being generated (safe from any thread)."""
        self.stop_event.set()

    def ask(self, text: str, settings: GenerationSettings = None):
        """Add a question (with the pending images) and return an iterator over the answer's text pieces.

        Images go before the question unless `text` has its own `<image>` markers, one per attached image.
        Errors about the question raise here, before anything is generated; the answer joins the history once
        streamed (also when stopped).
        """
        settings = settings or GenerationSettings()
        images = self.pending_images
        if IMAGE_MARKER in text:
            if text.count(IMAGE_MARKER) != len(images):
                raise InferenceError(f"the question has {text.count(IMAGE_MARKER)} {IMAGE_MARKER} marker(s) but "
                                     f"{len(images)} image(s) are attached")
            content = text
        else:
            content = user_content(text, len(images))
        messages = self.messages + [{"role": "user", "content": content, "images": self.pending_sources}]
        all_images = self.images + images
        max_prompt_tokens = self.max_seq_len - settings.max_new_tokens
        if max_prompt_tokens <= 0:
            raise InferenceError(f"max_new_tokens {settings.max_new_tokens} leaves no room for a prompt in "
                                 f"max_seq_len {self.max_seq_len}")
        config = self.loaded.model.config
        input_ids, self.history_dropped, images_dropped = fit_prompt(
            self.loaded.tokenizer, messages, config.image_special_token, max_prompt_tokens)
        kept_images = all_images[images_dropped:]
        pixel_values = torch.stack(kept_images).unsqueeze(0) if kept_images else None  # [1, N, 3, 224, 224]

        self.messages, self.images = messages, all_images
        self.discard_pending()
        self.stop_event.clear()
        self.last_stats = None

        def record_answer(answer: str, stats: AnswerStats):
            self.messages.append({"role": "assistant", "content": answer, "stats": stats})
            self.last_stats = stats

        return self._stream(input_ids, pixel_values, settings, record_answer)

    def _stream(self, input_ids, pixel_values, settings, record_answer):
        try:
            yield from stream_generation(self.loaded, input_ids, pixel_values, settings, self.stop_event,
                                         record_answer)
        except BaseException:
            if self.messages and self.messages[-1]["role"] == "user":
                self._forget_question()  # no answer came: the question goes too, so turns still alternate
            raise

    def _forget_question(self):
        question = self.messages.pop()
        if question["content"].count(IMAGE_MARKER):
            del self.images[len(self.images) - question["content"].count(IMAGE_MARKER):]


def answer_once(loaded: LoadedModel, question: str, image_sources, settings: GenerationSettings,
                max_seq_len: int = DEFAULT_MAX_SEQ_LEN):
    """The whole answer to one question about some images, and its stats."""
    session = ChatSession(loaded, max_seq_len)
    if image_sources:
        session.attach_images(image_sources)
    answer = "".join(session.ask(question, settings))
    return answer, session.last_stats


# ------------------------------------------------------------------------------------------------ scoring

def mentions(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text, flags=re.IGNORECASE) is not None


def is_correct(answer: str, right: str, choices) -> bool:
    """The answer names the right choice and no other choice."""
    return mentions(answer, right) and not any(mentions(answer, c) for c in choices if c != right)


@dataclass
class QuestionScore:
    correct: int = 0
    total: int = 0
    chance: float = 0.0  # expected accuracy of picking a choice at random
    by_kind: dict = field(default_factory=dict)  # kind -> [correct, total]

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def summary(self) -> str:
        kinds = ", ".join(f"{kind} {c}/{t}" for kind, (c, t) in sorted(self.by_kind.items()))
        return (f"accuracy {self.correct}/{self.total} = {self.accuracy:.1%} (chance {self.chance:.1%}; "
                f"{kinds})")


def read_questions(questions_file) -> list:
    questions_file = Path(questions_file)
    if not questions_file.is_file():
        raise FileNotFoundError(f"question file not found: {questions_file}")
    records = []
    for number, line in enumerate(questions_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records.append({key: record[key] for key in ("image", "question", "answer", "choices")} |
                           {"kind": record.get("kind", "all")})
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise InferenceError(f"{questions_file}:{number}: not a question record ({error!r}); expected "
                                 f"image, question, answer, choices") from None
    if not records:
        raise InferenceError(f"{questions_file}: no questions")
    return records


def score_questions(loaded: LoadedModel, questions_file, images_dir=None, max_new_tokens: int = SCORING_MAX_NEW_TOKENS,
                    max_seq_len: int = DEFAULT_MAX_SEQ_LEN, log=None) -> QuestionScore:
    """Ask every question of an eval_questions.jsonl file about its image (greedy) and count right answers.

    Images are looked up in `images_dir`, by default the eval_images/ folder beside the file. `log(record,
    answer, correct)` sees each answer.
    """
    records = read_questions(questions_file)
    images_dir = Path(images_dir) if images_dir is not None else Path(questions_file).parent / "eval_images"
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0)
    score = QuestionScore()
    for record in records:
        answer, _ = answer_once(loaded, record["question"], [images_dir / record["image"]], settings, max_seq_len)
        correct = is_correct(answer, record["answer"], record["choices"])
        kind = score.by_kind.setdefault(record["kind"], [0, 0])
        kind[0] += correct
        kind[1] += 1
        score.correct += correct
        score.total += 1
        score.chance += 1 / len(record["choices"]) / len(records)
        if log is not None:
            log(record, answer, correct)
    return score
