"""The exported folder through transformers' standard VLM interface: AutoModelForImageTextToText, the processor
(chat template with image parts, the project's preprocessing) and pipeline("image-text-to-text").

Run on both ends of the supported range (transformers 4.57 and 5.x): everything here goes through remote code
loaded from the folder, as a user's program would.
"""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, pipeline

from dataset.processing import (IMAGE_MARKER, build_prompt, image_processor_for, load_pixel_values, open_image,
                                preprocess_image)
from inference.generation import GenerationSettings, answer_once
from inference.loading import load_model
from model.model_vlm import CLIP_IMAGE_SIZE, IMAGE_PLACEHOLDER_ID, IMAGE_TOKENS_PER_IMAGE, MiniMindVLM, VLMConfig
from model.processing_minimind_v import CHAT_TEMPLATE, MiniMindVImageProcessor, MiniMindVProcessor
from conftest import export_fp32_folder, save_random_tiny_vlm

CLIP_PROCESSOR = image_processor_for(VLMConfig())

MODEL_SEED = 5
ANSWER_TOKENS = 12
QUESTION = "What colour is the shape?"


@pytest.fixture(scope="module")
def random_pth(tmp_path_factory, tiny_clip_dir):
    return save_random_tiny_vlm(tmp_path_factory.mktemp("hf_interface") / "sft_vlm_64.pth", tiny_clip_dir, MODEL_SEED)


@pytest.fixture(scope="module")
def folder(random_pth, tiny_tokenizer_dir, tiny_clip_dir):
    return export_fp32_folder(random_pth, random_pth.parent / "MiniMind2-V-tiny", tiny_tokenizer_dir, tiny_clip_dir)


@pytest.fixture(scope="module")
def processor(folder):
    return AutoProcessor.from_pretrained(folder, trust_remote_code=True)


@pytest.fixture(scope="module")
def image_paths(shapes_data):
    return [shapes_data["eval_images"] / f"00000{i}.jpg" for i in range(3)]


def chat(*parts, system=None):
    """One user message of `parts` ("<image>" or text), as chat parts and as the project's marker text."""
    hf_parts = [{"type": "image"} if p == IMAGE_MARKER else {"type": "text", "text": p} for p in parts]
    prefix = [{"role": "system", "content": system}] if system else []
    return prefix + [{"role": "user", "content": hf_parts}], prefix + [{"role": "user", "content": "\n".join(parts)}]


CONVERSATIONS = [
    chat(IMAGE_MARKER, QUESTION),
    chat(QUESTION, IMAGE_MARKER),
    chat(IMAGE_MARKER, IMAGE_MARKER, "Which one is bigger? Mail me@example.com"),
    chat(IMAGE_MARKER, "Describe it.", system="You answer briefly."),
    chat("No image here."),
]


def test_chat_template_writes_the_projects_prompt(folder, processor, tiny_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    # The folder's tokenizer keeps its own template (its files are copied as they are); the processor's
    # (chat_template.json) is the project's chat format, which the offline tokenizer stand-in carries too.
    assert AutoTokenizer.from_pretrained(folder).chat_template == tokenizer.chat_template
    assert processor.chat_template == CHAT_TEMPLATE
    special = "@" * IMAGE_TOKENS_PER_IMAGE
    for hf_messages, project_messages in CONVERSATIONS:
        expected = build_prompt(tokenizer, project_messages, special, add_generation_prompt=True)
        rendered = processor.apply_chat_template(hf_messages, add_generation_prompt=True)
        assert rendered.count(IMAGE_MARKER) == sum(m["content"].count(IMAGE_MARKER) for m in project_messages)
        images = [Image.new("RGB", (32, 32))] * rendered.count(IMAGE_MARKER) or None
        ids = processor(images=images, text=rendered).input_ids[0]
        assert ids == tokenizer(expected, add_special_tokens=False).input_ids
    # A multi-turn chat with string contents renders as the tokenizer's own template does.
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": "Bye"}]
    assert processor.apply_chat_template(turns, add_generation_prompt=False) == \
        tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=False)


def test_chat_template_matches_the_real_minimind2_template(real_tokenizer_dir, tiny_clip_dir):
    tokenizer = AutoTokenizer.from_pretrained(real_tokenizer_dir)
    processor = MiniMindVProcessor(MiniMindVImageProcessor(CLIP_IMAGE_SIZE), tokenizer, image_placeholder="@",
                                   image_seq_length=IMAGE_TOKENS_PER_IMAGE)
    for hf_messages, project_messages in CONVERSATIONS:
        markers_as_text = [{"role": m["role"], "content": m["content"]} for m in project_messages]
        for add_generation_prompt in (False, True):
            assert processor.apply_chat_template(hf_messages, add_generation_prompt=add_generation_prompt) == \
                tokenizer.apply_chat_template(markers_as_text, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)


def test_tokenized_chat_expands_each_image_part_to_the_placeholder_run(processor, image_paths):
    messages = [{"role": "user", "content": [{"type": "image", "path": str(image_paths[0])},
                                             {"type": "image", "path": str(image_paths[1])},
                                             {"type": "text", "text": "Same colour?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}
    ids = inputs["input_ids"][0]
    is_image = (ids == IMAGE_PLACEHOLDER_ID).int()
    assert int(is_image.sum()) == 2 * IMAGE_TOKENS_PER_IMAGE
    assert int((is_image[1:] - is_image[:-1] == 1).sum()) == 2  # two separate runs
    assert torch.equal(inputs["pixel_values"], load_pixel_values(image_paths[:2], CLIP_PROCESSOR))


def test_pixel_values_are_the_projects_preprocessing(folder, processor, image_paths):
    grey16 = Image.fromarray(np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50)  # mode I;16
    rgba = Image.new("RGBA", (50, 20), (10, 200, 30, 128))
    images = [open_image(image_paths[0]), grey16, rgba]
    expected = torch.stack([preprocess_image(image, CLIP_PROCESSOR) for image in images])
    text = " ".join([IMAGE_MARKER] * len(images))
    assert torch.equal(processor(images=images, text=text, return_tensors="pt").pixel_values, expected)
    image_processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    assert torch.equal(image_processor(images, return_tensors="pt").pixel_values, expected)
    assert torch.equal(processor(images=[str(p) for p in image_paths], text=IMAGE_MARKER * 3).pixel_values,
                       load_pixel_values(image_paths, CLIP_PROCESSOR))


def test_images_and_markers_must_agree(processor, image_paths):
    with pytest.raises(ValueError, match=r"2 image\(s\) but 1 <image> marker"):
        processor(images=[str(p) for p in image_paths[:2]], text=f"{IMAGE_MARKER}\nWhat is it?")


def test_auto_model_for_image_text_to_text_reads_the_processors_output(folder, processor, random_pth, tiny_clip_dir,
                                                                       image_paths):
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__name__ == "MiniMindVLM" and model.vision_encoder is not None  # CLIP from vision_model/
    native = MiniMindVLM(VLMConfig(hidden_size=64, num_hidden_layers=2), vision_model_path=tiny_clip_dir)
    native.load_state_dict(torch.load(random_pth, weights_only=True))
    messages, _ = chat(IMAGE_MARKER, QUESTION)
    inputs = processor(images=[str(image_paths[0])], return_tensors="pt",
                       text=processor.apply_chat_template(messages, add_generation_prompt=True))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, native.eval()(**inputs).logits)


def test_pipeline_answers_as_the_native_model_does(folder, processor, random_pth, tiny_tokenizer_dir, tiny_clip_dir,
                                                   image_paths):
    native = load_model(random_pth, False, tiny_tokenizer_dir, tiny_clip_dir, "cpu", log=None)
    expected, _ = answer_once(native, QUESTION, [image_paths[1]],
                              GenerationSettings(max_new_tokens=ANSWER_TOKENS, temperature=0.0))
    assert expected  # a real answer to compare, not two empty strings
    pipe = pipeline("image-text-to-text", model=str(folder), trust_remote_code=True)

    def generate_kwargs():  # a fresh dict per call: transformers 4.57's pipeline writes max_new_tokens into it
        return {"do_sample": False}

    messages = [{"role": "user", "content": [{"type": "image", "path": str(image_paths[1])},
                                             {"type": "text", "text": QUESTION}]}]
    answer = pipe(text=messages, max_new_tokens=ANSWER_TOKENS, generate_kwargs=generate_kwargs())
    assert answer[0]["generated_text"][-1] == {"role": "assistant", "content": expected}
    # Plain text input: the prompt written out, the image a PIL image.
    prompt = processor.apply_chat_template(chat(IMAGE_MARKER, QUESTION)[0], add_generation_prompt=True)
    answer = pipe(images=open_image(image_paths[1]), text=prompt, max_new_tokens=ANSWER_TOKENS,
                  generate_kwargs=generate_kwargs(), return_full_text=False)
    assert answer[0]["generated_text"] == expected


# ------------------------------------------------------------------------------------ a minimind-3v folder

@pytest.fixture(scope="module")
def pth_3v(tmp_path_factory, tiny_siglip_dir):
    """An upstream-format minimind-3v file (no architecture file: recognised from its keys)."""
    from test_minimind3v import upstream_3v_file

    path = tmp_path_factory.mktemp("hf_interface_3v") / "sft_vlm_64.pth"
    upstream_3v_file(path, tiny_siglip_dir, MODEL_SEED)
    return path


@pytest.fixture(scope="module")
def folder_3v(pth_3v, tiny_minimind3_tokenizer_dir, tiny_siglip_dir):
    return export_fp32_folder(pth_3v, pth_3v.parent / "minimind-3v-tiny", tiny_minimind3_tokenizer_dir,
                              tiny_siglip_dir)


def test_3v_folder_through_auto_classes_and_pipeline(folder_3v, pth_3v, tiny_minimind3_tokenizer_dir,
                                                     tiny_siglip_dir, image_paths):
    processor = AutoProcessor.from_pretrained(folder_3v, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(folder_3v, trust_remote_code=True)
    assert type(model).__name__ == "MiniMindVLM" and type(model.vision_encoder).__name__ == "SiglipVisionModel"
    native = load_model(pth_3v, False, tiny_minimind3_tokenizer_dir, tiny_siglip_dir, "cpu", log=None)
    config = native.model.config
    tokenizer = native.tokenizer
    for hf_messages, project_messages in CONVERSATIONS:
        expected = build_prompt(tokenizer, project_messages, config.image_special_token, True, chat_format="minimind3")
        rendered = processor.apply_chat_template(hf_messages, add_generation_prompt=True)
        images = [Image.new("RGB", (32, 32))] * rendered.count(IMAGE_MARKER) or None
        assert processor(images=images, text=rendered).input_ids[0] == \
            tokenizer(expected, add_special_tokens=False).input_ids
    inputs = processor(images=[str(image_paths[0])], return_tensors="pt",
                       text=processor.apply_chat_template(chat(IMAGE_MARKER, QUESTION)[0], add_generation_prompt=True))
    assert inputs.pixel_values.shape == (1, 3, 256, 256)
    assert torch.equal(inputs.pixel_values, load_pixel_values(image_paths[:1], native.image_processor))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, native.model(**inputs).logits)
    expected, _ = answer_once(native, QUESTION, [image_paths[1]],
                              GenerationSettings(max_new_tokens=ANSWER_TOKENS, temperature=0.0))
    assert expected
    pipe = pipeline("image-text-to-text", model=str(folder_3v), trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "path": str(image_paths[1])},
                                             {"type": "text", "text": QUESTION}]}]
    answer = pipe(text=messages, max_new_tokens=ANSWER_TOKENS, generate_kwargs={"do_sample": False})
    assert answer[0]["generated_text"][-1] == {"role": "assistant", "content": expected}
