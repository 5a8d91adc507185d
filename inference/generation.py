"""Generation: sampling settings, `generate` streamed piece by piece, and the multi-turn `ChatSession`.

Prompts come from the shared `build_prompt`, pixels from the shared `load_pixel_values`; the oldest turns are
left out when the prompt would not fit `max_total_tokens`; answers stream piece by piece, can be stopped half-way,
and report tokens/s.
"""
import queue
import threading
import time
from dataclasses import dataclass

import torch
from transformers import (LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList,
                          TemperatureLogitsWarper, TopPLogitsWarper)
from transformers.generation.streamers import BaseStreamer

from dataset.processing import IMAGE_MARKER, build_prompt, count_image_markers, load_pixel_values, user_content

from .loading import (DEFAULT_MAX_NEW_TOKENS, DEFAULT_MAX_TOTAL_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P,
                      InferenceError, LoadedModel)

# How often the consumer of a stream wakes up to notice Ctrl-C or a finished generation thread.
POLL_SECONDS = 0.1


@dataclass
class GenerationSettings:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = DEFAULT_TEMPERATURE  # 0: greedy
    top_p: float = DEFAULT_TOP_P
    # None: sampling draws from torch's global generator. An int: this answer samples with its own generator
    # seeded with it, reproducible whatever else the process samples meanwhile (the API server's `seed`).
    seed: int = None

    @classmethod
    def from_flags(cls, args):
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens
        return cls(max_new_tokens, args.temperature, args.top_p)

    def generate_kwargs(self) -> dict:
        if self.temperature <= 0 or self.seed is not None:  # seeded: SeededSampling picks, greedy search takes it
            return dict(max_new_tokens=self.max_new_tokens, do_sample=False)
        return dict(max_new_tokens=self.max_new_tokens, do_sample=True, temperature=self.temperature,
                    top_p=self.top_p)

    def logits_processors(self) -> list:
        if self.temperature > 0 and self.seed is not None:
            return [SeededSampling(self.seed, self.temperature, self.top_p)]
        return []


@dataclass
class AnswerStats:
    tokens: int  # generated, the end-of-turn token included
    seconds: float  # prefill (CLIP included) plus decoding
    stopped: bool  # cut short by stop()
    ended_by_eos: bool = False  # the model ended its turn (else it ran out of tokens or was stopped)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class StopOnEvent(StoppingCriteria):
    """Ends generation at the next token once `event` is set (from another thread)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class SeededSampling(LogitsProcessor):
    """Samples the next token with its own seeded generator and leaves only that token for greedy search.

    Temperature and top-p are transformers' own warpers; only the draw is private, so concurrent answers in one
    process do not consume each other's random numbers.
    """

    def __init__(self, seed: int, temperature: float, top_p: float):
        self.seed = seed
        self.warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)])
        self.generator = None  # made on the first call, on the device of the scores

    def __call__(self, input_ids, scores):
        if self.generator is None:
            self.generator = torch.Generator(device=scores.device).manual_seed(self.seed)
        probs = torch.softmax(self.warpers(input_ids, scores.float()), dim=-1)  # [B, V]
        chosen = torch.multinomial(probs, 1, generator=self.generator)  # [B, 1]
        return torch.full_like(scores, float("-inf")).scatter(1, chosen, 0.0)


class PieceStreamer(BaseStreamer):
    """Hands the answer's text to `emit` token by token, holding back only an unfinished UTF-8 character.

    (transformers' TextStreamer waits for a space or a newline, so a long answer without one would not stream.)
    Byte-level BPE decodes piece by piece: once the decoded text ends cleanly it is final and the ids go.
    """

    def __init__(self, tokenizer, emit):
        self.tokenizer = tokenizer
        self.emit = emit
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
            self.emit(text)


def generate_answer(loaded: LoadedModel, input_ids, pixel_values, settings: GenerationSettings,
                    stop_event: threading.Event, emit):
    """Generate one answer in this thread, handing each text piece to `emit` as it is decoded; (answer, stats).

    input_ids [1, T]; pixel_values [1, N, 3, H, W] or None. Setting `stop_event` (from any thread) ends the answer
    at the next token. The model's lock is held throughout: one generation at a time per model view.
    """
    streamer = PieceStreamer(loaded.tokenizer, emit)
    prompt_length = input_ids.shape[1]
    kwargs = dict(input_ids=input_ids.to(loaded.device), attention_mask=torch.ones_like(input_ids).to(loaded.device),
                  pixel_values=None if pixel_values is None else pixel_values.to(loaded.device), streamer=streamer,
                  pad_token_id=loaded.tokenizer.pad_token_id, eos_token_id=loaded.tokenizer.eos_token_id,
                  stopping_criteria=StoppingCriteriaList([StopOnEvent(stop_event)]),
                  logits_processor=LogitsProcessorList(settings.logits_processors()),
                  **settings.generate_kwargs())
    started = time.perf_counter()
    with loaded.lock:
        output = loaded.model.generate(**kwargs)
    answer_ids = output[0, prompt_length:].tolist()
    stats = AnswerStats(tokens=streamer.answer_tokens, seconds=time.perf_counter() - started,
                        stopped=stop_event.is_set(), ended_by_eos=answer_ids[-1:] == [loaded.tokenizer.eos_token_id])
    return loaded.tokenizer.decode(answer_ids, skip_special_tokens=True), stats


@dataclass
class GenerationDone:
    """Queue item the generation thread leaves last: (answer, stats), or the exception that ended it."""
    result: tuple = None
    error: BaseException = None


def stream_generation(loaded: LoadedModel, input_ids, pixel_values, settings: GenerationSettings,
                      stop_event: threading.Event, on_done):
    """Yield the answer's text pieces while `generate_answer` runs in a thread; `on_done(text, stats)` gets the
    whole answer. For synchronous consumers (terminal, web demo); the API server runs `generate_answer` itself.

    Leaving the loop early (an exception in the consumer, a browser rerun, `break`) stops generation; `on_done`
    still gets what was generated. An error inside `generate` is raised here, in the consumer's thread, and
    `on_done` is not called.
    """
    pieces = queue.Queue()  # text pieces, then one GenerationDone

    def run():
        try:
            result = generate_answer(loaded, input_ids, pixel_values, settings, stop_event, pieces.put)
            pieces.put(GenerationDone(result=result))
        except BaseException as error:  # handed to the consumer thread, which re-raises it
            pieces.put(GenerationDone(error=error))

    thread = threading.Thread(target=run, name="minimind-generate", daemon=True)
    thread.start()
    done = None
    try:
        while done is None:
            try:
                item = pieces.get(timeout=POLL_SECONDS)
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
                item = pieces.get()
                done = item if isinstance(item, GenerationDone) else None
        thread.join()
        if done.error is None:
            on_done(*done.result)
    if done.error is not None:
        raise done.error


# -------------------------------------------------------------------------------------------------- chat

def fit_prompt(tokenizer, messages, image_special_token: str, max_prompt_tokens: int, chat_format: str = "minimind2",
               image_token_count: int = None):
    """Leave out the oldest turns (a question with its answer and images) until the prompt fits.

    `messages` alternate user/assistant and end with a user message. Whole messages are dropped, so an image's
    placeholder run is never cut. Returns (prompt ids [1, T], number of messages left out, images left out).
    """
    first = 0
    while True:
        kept = messages[first:]
        prompt = build_prompt(tokenizer, kept, image_special_token, add_generation_prompt=True,
                              chat_format=chat_format)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        if ids.shape[1] <= max_prompt_tokens:
            return ids, first, count_image_markers(messages[:first])
        if len(kept) <= 1:
            raise InferenceError(f"the question alone is {ids.shape[1]} tokens (images count "
                                 f"{image_token_count or len(image_special_token)} each), over the "
                                 f"{max_prompt_tokens} left for the "
                                 f"prompt: raise --max_total_tokens or lower --max_new_tokens")
        first += 2


class ChatSession:
    """One conversation: its messages (with `<image>` markers), its images in marker order, pending images.

        session = ChatSession(loaded, max_total_tokens=8192)
        session.attach_images(["cat.jpg"])          # for the next question; ImageError if unusable
        for piece in session.ask("What is this?", settings):
            print(piece, end="")
        session.last_stats.tokens_per_s
    """

    def __init__(self, loaded: LoadedModel, max_total_tokens: int = DEFAULT_MAX_TOTAL_TOKENS):
        if max_total_tokens > loaded.max_positions:
            raise InferenceError(f"--max_total_tokens {max_total_tokens} is over the model's {loaded.max_positions} "
                                 f"positions")
        self.loaded = loaded
        self.max_total_tokens = max_total_tokens
        # {"role", "content"}: user contents carry one `<image>` per image, user messages also "images" (the
        # sources, for display) and answers "stats".
        self.messages = []
        self.images = []  # [3, H, W] per image, in the order of the markers in `messages`
        self.pending_images = []  # attached, waiting for the next question
        self.pending_sources = []
        self.stop_event = threading.Event()
        self.last_stats = None
        self.history_dropped = 0  # messages left out of the last prompt to fit max_total_tokens

    def attach_images(self, sources):
        """Decode and preprocess images (paths, bytes, file objects) for the next question; all or none."""
        sources = list(sources)
        pixels = load_pixel_values(sources, self.loaded.image_processor)  # [N, 3, H, W]; raises ImageError
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
        max_prompt_tokens = self.max_total_tokens - settings.max_new_tokens
        if max_prompt_tokens <= 0:
            raise InferenceError(f"max_new_tokens {settings.max_new_tokens} leaves no room for a prompt in "
                                 f"max_total_tokens {self.max_total_tokens}")
        config = self.loaded.model.config
        input_ids, self.history_dropped, images_dropped = fit_prompt(
            self.loaded.tokenizer, messages, config.image_special_token, max_prompt_tokens, config.chat_format,
            config.image_token_count)
        kept_images = all_images[images_dropped:]
        pixel_values = torch.stack(kept_images).unsqueeze(0) if kept_images else None  # [1, N, 3, H, W]

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
                # No answer came: the question goes too (with its images), so turns still alternate.
                question = self.messages.pop()
                if question["content"].count(IMAGE_MARKER):
                    del self.images[len(self.images) - question["content"].count(IMAGE_MARKER):]
            raise


def answer_once(loaded: LoadedModel, question: str, image_sources, settings: GenerationSettings,
                max_total_tokens: int = DEFAULT_MAX_TOTAL_TOKENS):
    """The whole answer to one question about some images, and its stats."""
    session = ChatSession(loaded, max_total_tokens)
    if image_sources:
        session.attach_images(image_sources)
    answer = "".join(session.ask(question, settings))
    return answer, session.last_stats
