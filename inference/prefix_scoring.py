"""Answering many short questions about few images fast: CLIP once per image, the image's prefilled prefix
shared by its questions, rows batched without padding, all answer options scored from one prefill.

A prompt is `[chat header][196 image tokens][question + assistant turn]` (image first). The header and the image
run (and any words every question starts with) are the same tokens for every question, so their keys and
values are computed once per image (a batch of images at a time) and kept in a transformers `DynamicCache`;
each batch of questions gets a copy of the rows of its images and prefills only its own tokens. Blind prompts
(no image) share their common start the same way. Questions are batched only with questions of the same token
length, so no row carries padding and every position is the one a single full prefill would use: the scores
equal those of a plain prefill (tests check this against `share_prefix=False`).

Likelihood: the log-probability of each label after the prompt. A label may have several spellings ("Yes",
"yes"): their probabilities are added. The first token of every spelling is read off the prompt's prefill;
spellings of more tokens get one more short pass over a copy of the prompt's cache. Generation is greedy from
the same prefill, so with both modes each prompt is prefilled once.
"""
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from dataset.processing import build_prompt, image_processor_for, open_image, preprocess_image, user_content

from .loading import InferenceError, LoadedModel

WITH_IMAGE, BLIND = "image", "blind"


@dataclass
class Answer:
    text: str = None  # the greedy answer (generate mode)
    label_scores: dict = None  # label -> log-probability (likelihood mode)


def gather_rows(cache: DynamicCache, rows: torch.Tensor) -> DynamicCache:
    """A new DynamicCache holding batch rows `rows` of `cache` (new tensors: `cache` itself is left as it is)."""
    gathered = DynamicCache()
    for layer_idx, layer in enumerate(cache.layers):
        gathered.update(layer.keys[rows], layer.values[rows], layer_idx)
    return gathered


def batches_by_length(items, length_of, batch_size: int):
    """Items grouped by `length_of(item)`, each group cut into batches of at most batch_size (order kept)."""
    groups = {}
    for item in items:
        groups.setdefault(length_of(item), []).append(item)
    for group in groups.values():
        for start in range(0, len(group), batch_size):
            yield group[start:start + batch_size]


def common_prefix_length(sequences) -> int:
    """Length of the longest common prefix, leaving at least one token of every sequence after it (the
    prompt's last position must be computed with its question, for the logits there)."""
    shortest = min(len(ids) for ids in sequences)
    first = sequences[0]
    length = 0
    while length < shortest - 1 and all(ids[length] == first[length] for ids in sequences):
        length += 1
    return length


class PromptTokens:
    """Token ids of every question's prompt, with the image and blind (same text, no image), each split into
    the prefix all questions share (chat header, image run, and any words all questions start with) and the
    rest. The split is found on the token ids themselves, so joining the two parts gives the prompt exactly."""

    def __init__(self, tokenizer, image_special_token: str, image_token_id: int, texts, chat_format="minimind2",
                 image_token_count: int = None):
        def render(text, num_images):
            return build_prompt(tokenizer, [{"role": "user", "content": user_content(text, num_images)}],
                                image_special_token, add_generation_prompt=True, chat_format=chat_format)

        image_ids = tokenizer([render(t, 1) for t in texts], add_special_tokens=False).input_ids
        blind_ids = tokenizer([render(t, 0) for t in texts], add_special_tokens=False).input_ids
        image_end = image_ids[0].index(image_token_id) + (image_token_count or len(image_special_token))
        shared = common_prefix_length(image_ids)
        if shared < image_end:
            raise InferenceError("prompts differ before the end of the image: the chat template puts question "
                                 "text ahead of the image, so the image prefix cannot be shared")
        self.image_prefix, self.image_rest = image_ids[0][:shared], [ids[shared:] for ids in image_ids]
        shared = common_prefix_length(blind_ids)
        self.blind_prefix, self.blind_rest = blind_ids[0][:shared], [ids[shared:] for ids in blind_ids]

    def full(self, index: int, variant: str) -> list:
        if variant == WITH_IMAGE:
            return self.image_prefix + self.image_rest[index]
        return self.blind_prefix + self.blind_rest[index]


class PrefixScorer:
    """Greedy answers and/or label log-probabilities for benchmark questions, with and without their images."""

    def __init__(self, loaded: LoadedModel, batch_size: int, max_new_tokens: int, generate: bool,
                 likelihood: bool, share_prefix: bool = True):
        self.model, self.tokenizer, self.device = loaded.model, loaded.tokenizer, loaded.device
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.generate, self.likelihood = generate, likelihood
        self.share_prefix = share_prefix
        self.eos_id = self.tokenizer.eos_token_id
        self.vocab_limit = min(len(self.tokenizer), self.model.config.vocab_size)  # never emit undecodable ids
        self.form_ids = {}

    def spelling_ids(self, label: str, spellings) -> list:
        """Token ids of each spelling of a label (tokenised once per label)."""
        if label not in self.form_ids:
            self.form_ids[label] = [self.tokenizer(text, add_special_tokens=False).input_ids for text in spellings]
        return self.form_ids[label]

    @torch.no_grad()
    def score(self, questions, images: dict, label_forms, blind: bool, progress: bool = True) -> dict:
        """{(question index, "image" | "blind"): Answer}. `label_forms(question)` -> {label: spellings}."""
        config = self.model.config
        tokens = PromptTokens(self.tokenizer, config.image_special_token, self.model.image_token_id,
                              [q.text for q in questions], config.chat_format, config.image_token_count)
        forms = [{label: self.spelling_ids(label, spellings) for label, spellings in label_forms(q).items()}
                 for q in questions]
        answers = {}
        bar = tqdm(total=len(questions) * (2 if blind else 1), unit="q", disable=not progress,
                   desc="questions", smoothing=0.05)
        by_image = {}
        for index, question in enumerate(questions):
            by_image.setdefault(question.image, []).append(index)
        image_keys = list(by_image)
        for start in range(0, len(image_keys), self.batch_size):
            chunk = image_keys[start:start + self.batch_size]
            features = self.encode(images, chunk)  # [n, 196, ve_hidden]
            rows = [(index, row) for row, key in enumerate(chunk) for index in by_image[key]]
            if self.share_prefix:
                prefix_cache = self.prefill([tokens.image_prefix] * len(chunk), features)
                self.answer_batches(rows, tokens.image_rest, prefix_cache, WITH_IMAGE, forms, answers, bar)
            else:
                self.answer_alone(rows, tokens, WITH_IMAGE, forms, answers, bar, features)
        if blind:
            rows = [(index, 0) for index in range(len(questions))]
            if self.share_prefix:
                prefix_cache = self.prefill([tokens.blind_prefix])
                self.answer_batches(rows, tokens.blind_rest, prefix_cache, BLIND, forms, answers, bar)
            else:
                self.answer_alone(rows, tokens, BLIND, forms, answers, bar)
        bar.close()
        return answers

    def prefill(self, prefix_ids, features=None) -> DynamicCache:
        """The cache of the shared prefix, one row per image (features [n, 196, ve_hidden]) or a single row."""
        cache = DynamicCache()
        ids = torch.tensor(prefix_ids, device=self.device)  # [n, P]
        self.model(input_ids=ids, image_features=features, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return cache

    def answer_batches(self, rows, rest, prefix_cache, variant, forms, answers, bar):
        """rows: (question index, row of prefix_cache); each batch has questions of one length, no padding."""
        for batch in batches_by_length(rows, lambda item: len(rest[item[0]]), self.batch_size):
            indices = [index for index, _ in batch]
            cache = gather_rows(prefix_cache, torch.tensor([row for _, row in batch], device=self.device))
            ids = torch.tensor([rest[i] for i in indices], device=self.device)  # [B, S]
            self.answer_rows(indices, variant, cache, ids, forms, answers)
            bar.update(len(batch))

    def answer_alone(self, rows, tokens, variant, forms, answers, bar, features=None):
        """The reference path: every question prefilled alone from its first token (no sharing, no batching)."""
        for index, row in rows:
            ids = torch.tensor([tokens.full(index, variant)], device=self.device)
            image = None if features is None else features[row:row + 1]
            self.answer_rows([index], variant, DynamicCache(), ids, forms, answers, image_features=image)
            bar.update(1)

    def encode(self, images: dict, keys) -> torch.Tensor:
        """Encoder features of the images `keys` (each decoded and preprocessed once)."""
        image_processor = image_processor_for(self.model.config)
        pixels = torch.stack([preprocess_image(open_image(images[key], name=f"image {key[:12]}"), image_processor)
                              for key in keys])  # [n, 3, H, W]
        return self.model.encode_images(pixels.to(self.device))

    def answer_rows(self, indices, variant, cache, ids, forms, answers, image_features=None):
        """One prefill of `ids` [B, S] on `cache`; then label scores and/or greedy answers for each row."""
        out = self.model(input_ids=ids, image_features=image_features, past_key_values=cache, use_cache=True,
                         logits_to_keep=1)
        logprobs = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [B, V]
        scores = self.label_scores(cache, logprobs, [forms[i] for i in indices]) if self.likelihood else None
        texts = self.greedy(cache, logprobs) if self.generate else None
        for row, index in enumerate(indices):
            answers[(index, variant)] = Answer(text=None if texts is None else texts[row],
                                               label_scores=None if scores is None else scores[row])

    def label_scores(self, cache, logprobs, row_forms) -> list:
        """Per row {label: log sum over spellings of P(spelling | prompt)}; logprobs [B, V] after the prompt."""
        spelled = []  # (row, label, token ids, log-probability so far)
        for row, label_forms in enumerate(row_forms):
            for label, spellings in label_forms.items():
                for ids in spellings:
                    spelled.append([row, label, ids, logprobs[row, ids[0]]])
        longer = [item for item in spelled if len(item[2]) > 1]
        if longer:
            self.add_continuations(cache, longer)
        scores = [{} for _ in row_forms]
        for row, label, _, value in spelled:
            scores[row].setdefault(label, []).append(value)
        return [{label: float(torch.logsumexp(torch.stack(values), dim=0)) for label, values in row.items()}
                for row in scores]

    def add_continuations(self, cache, items):
        """Log-probabilities of the 2nd.. tokens of multi-token spellings, one pass over a copy of the cache.

        Inputs are right-padded: causal attention keeps each real token from seeing the padding after it.
        """
        width = max(len(ids) for _, _, ids, _ in items) - 1
        inputs = torch.full((len(items), width), self.eos_id, dtype=torch.long)
        for i, (_, _, ids, _) in enumerate(items):
            inputs[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        rows = torch.tensor([row for row, _, _, _ in items], device=self.device)
        out = self.model(input_ids=inputs.to(self.device), past_key_values=gather_rows(cache, rows), use_cache=True)
        logprobs = torch.log_softmax(out.logits.float(), dim=-1)  # [R, width, V]
        for i, item in enumerate(items):
            ids = item[2]
            item[3] = item[3] + sum(logprobs[i, j, ids[j + 1]] for j in range(len(ids) - 1))

    def greedy(self, cache, logprobs) -> list:
        """Greedy answers continuing every row's prefill (cache holds it), up to max_new_tokens or end of turn."""
        next_ids = logprobs[:, :self.vocab_limit].argmax(dim=-1)  # [B]
        finished = next_ids == self.eos_id
        steps = [next_ids]
        for _ in range(self.max_new_tokens - 1):
            if bool(finished.all()):
                break
            out = self.model(input_ids=next_ids[:, None], past_key_values=cache, use_cache=True)
            next_ids = out.logits[:, -1, :self.vocab_limit].argmax(dim=-1)
            next_ids = torch.where(finished, torch.full_like(next_ids, self.eos_id), next_ids)
            finished |= next_ids == self.eos_id
            steps.append(next_ids)
        generated = torch.stack(steps, dim=1).tolist()  # [B, steps]
        texts = []
        for ids in generated:
            ids = ids[:ids.index(self.eos_id)] if self.eos_id in ids else ids
            texts.append(self.tokenizer.decode(ids, skip_special_tokens=True))
        return texts
