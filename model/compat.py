"""Where transformers 4.57.x and 5.x differ, said once. Shipped in exported folders beside the model code.

- generate() keeps the KV cache in its model kwargs as `past_key_values` (4.x, early 5.x) or `cache` (5.2x+);
  the model's own `prepare_inputs_for_generation` reads it under `GENERATE_CACHE_KWARG`.
- Output dataclasses name their cache field the same way (5.2x+ still accepts `past_key_values=` but logs a
  deprecation warning), so outputs are built with `OUTPUT_CACHE_FIELD`.
- The PIL-only CLIP (SigLIP) image processor is `CLIPImageProcessorPil` (`SiglipImageProcessorPil`) in 5.x
  (`CLIPImageProcessor` there wants torchvision) and `CLIPImageProcessor` (`SiglipImageProcessor`) in 4.x.
- Also read on both ends without a branch: `_tied_weights_keys` as a {target: source} dict (4.x iterates it and
  gets the tied names), `from_pretrained(dtype=...)` (4.56+), a config's `rope_parameters` (a plain attribute in
  4.x; `rope_scaling` exists only in 5.x), `tie_word_embeddings` always set by the config (4.x omits its default
  from config.json, 5.x reads a missing flag as False).
- A processor names its sub-processors' classes as class attributes in 4.x (`PROCESSOR_CLASS_ATTRIBUTES`); 5.x reads
  them from `__init__`'s signature and refuses the attributes.
- For a local folder, 4.x copies into its module cache only the files the auto_map file (model_vlm.py) imports
  itself, so model_vlm.py imports this module too.
- `from_pretrained(use_kernels=...)`: 5.x (whose dependencies include the `kernels` package) turns it on by default,
  and the first train()/eval() of the model on a GPU then swaps layers such as Llama's and Qwen2's rotary embedding
  for kernels downloaded from the hub: offline a ValueError ("could not verify publisher trust status", seen on an
  H200), online code other than the model's own. 4.57 takes the same keyword, off by default. Every model here loads
  with `NO_HUB_KERNELS`.
"""
import dataclasses
import inspect

from transformers import GenerationMixin
from transformers import __version__ as transformers_version
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

NEW_CACHE_NAME = "cache"
OLD_CACHE_NAME = "past_key_values"

GENERATE_CACHE_KWARG = (NEW_CACHE_NAME if NEW_CACHE_NAME in inspect.signature(
    GenerationMixin.prepare_inputs_for_generation).parameters else OLD_CACHE_NAME)
OUTPUT_CACHE_FIELD = (NEW_CACHE_NAME if NEW_CACHE_NAME in {field.name for field in dataclasses.fields(
    MoeCausalLMOutputWithPast)} else OLD_CACHE_NAME)


# from_pretrained keywords of every model this project loads: the model's own code, nothing fetched at run time.
NO_HUB_KERNELS = {"use_kernels": False}

TRANSFORMERS_MAJOR = int(transformers_version.split(".")[0])
PROCESSOR_CLASS_ATTRIBUTES = ({"image_processor_class": "AutoImageProcessor", "tokenizer_class": "AutoTokenizer"}
                              if TRANSFORMERS_MAJOR < 5 else {})


def pil_clip_image_processor_class():
    """CLIP's image processor on the PIL backend: no torchvision needed on either major."""
    return pil_image_processor_class("CLIPImageProcessor")


def pil_image_processor_class(name: str):
    """transformers' image processor `name` (e.g. SiglipImageProcessor) on the PIL backend: `{name}Pil` in 5.x."""
    import transformers

    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)
