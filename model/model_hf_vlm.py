"""TransformersVLM: any transformers causal LM (Qwen2/Qwen2.5, Llama, SmolLM2, ...) as the language model of the
configured vision stack (model_vlm.VisionStack: VISION_ENCODERS, PROJECTORS, the splice into placeholder runs).

The LM is one attribute, `language_model` (what AutoModelForCausalLM builds from the folder), the projector
`vision_proj`; the frozen encoder is held outside the module tree as MiniMindVLM holds it, so `state_dict()` is
`language_model.*` + `vision_proj.*`. An image is a run of `image_token_count` IMAGE_PLACEHOLDER tokens, a special
token added to the LM's tokenizer when it lacks one (processing_minimind_v.add_image_placeholder; the embeddings
grow to fit). Prompts come from the tokenizer's own chat template (chat_format "tokenizer", dataset/processing.py).
"""
import inspect
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .compat import NO_HUB_KERNELS, OUTPUT_CACHE_FIELD
from .model_minimind import IGNORE_INDEX, MiniMindForCausalLM, target_positions
from .model_vlm import (CLIP_HIDDEN_SIZE, DEFAULT_NUM_QUERY_TOKENS, DEFAULT_VISION_ENCODER, IMAGE_TOKENS_PER_IMAGE,
                        PROJECTORS, VISION_ENCODERS, MiniMindVLM, VisionStack, VLMConfig, encoder_feature_count,
                        load_vision_encoder, read_encoder_folder, set_vision_fields)
from .processing_minimind_v import add_image_placeholder

# The placeholder token (Qwen2-VL's name; Qwen2.5 tokenizers already have it, others get it added).
IMAGE_PLACEHOLDER = "<|image_pad|>"
TOKENIZER_CHAT_FORMAT = "tokenizer"  # dataset/processing.py: the prompt is the tokenizer's own chat template


class TransformersVLMConfig(PretrainedConfig):
    """A transformers causal LM's config (`text_config`) with the vision fields of model_vlm.VLMConfig, under the
    same names, so that data, training and inference read either config alike."""
    model_type = "minimind-v-transformers-lm"
    sub_configs = {"text_config": AutoConfig}  # serialised as a nested config (4.x and 5.x read this name)

    def __init__(self, text_config=None, language_model: str = None,
                 image_special_token: str = IMAGE_PLACEHOLDER * IMAGE_TOKENS_PER_IMAGE, image_ids: list = None,
                 ve_hidden_size: int = CLIP_HIDDEN_SIZE, vision_encoder: str = DEFAULT_VISION_ENCODER,
                 projector: str = "linear", image_feature_count: int = IMAGE_TOKENS_PER_IMAGE,
                 image_processing: dict = None, chat_format: str = TOKENIZER_CHAT_FORMAT,
                 vision_model_subfolder: str = None, max_seq_len: int = None,
                 num_query_tokens: int = DEFAULT_NUM_QUERY_TOKENS, qformer_config: dict = None, **kwargs):
        if isinstance(text_config, dict):
            text_config = AutoConfig.for_model(**text_config)
        self.text_config = text_config
        # The folder the LM and its tokenizer came from (inference reads the tokenizer there).
        self.language_model = None if language_model is None else str(language_model)
        self.max_seq_len = max_seq_len  # the training cut (not the LM's context)
        set_vision_fields(self, image_special_token, image_ids or [], ve_hidden_size, vision_encoder, projector,
                          image_feature_count, image_processing, chat_format, vision_model_subfolder, num_query_tokens,
                          qformer_config)
        super().__init__(**kwargs)

    @property
    def image_token_count(self) -> int:
        """Placeholder tokens per image in the prompt (the projector's output count)."""
        return len(self.image_ids)

    projector_output_count = VLMConfig.projector_output_count  # reads only the projector fields both configs have

    # The LM's shape, read from its config (one home): weight file names, logs and inference limits use them.
    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def num_hidden_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    @property
    def max_position_embeddings(self) -> int:
        return self.text_config.max_position_embeddings

    @property
    def use_moe(self) -> bool:
        return False

    @property
    def lm_family(self) -> str:
        """Not a MiniMind family (model_minimind.LM_FAMILIES): no preset has it (presets.preset_for)."""
        return "transformers"

    def get_text_config(self, *args, **kwargs):
        return self.text_config


def language_model_config(folder, tokenizer, vision_model_path, vision_encoder: str = DEFAULT_VISION_ENCODER,
                          text_config=None, **config_fields) -> TransformersVLMConfig:
    """The config of a VLM on the LM `folder` (its config.json unless `text_config` is given) and the encoder folder
    `vision_model_path` of kind `vision_encoder`: the tokenizer (the LM folder's) gets the image placeholder
    (add_image_placeholder), and an image is a run of as many placeholders as the projector makes of the encoder's
    features (each feature, or a Q-Former's queries)."""
    import transformers

    image_token_id = add_image_placeholder(tokenizer, IMAGE_PLACEHOLDER)
    vision_config_class = getattr(transformers, VISION_ENCODERS[vision_encoder].model_class).config_class
    if not (Path(vision_model_path) / "config.json").is_file():
        load_vision_encoder(vision_model_path, kind=vision_encoder)  # its one-line error says how to get one
    vision_config = vision_config_class.from_pretrained(str(vision_model_path))
    config = TransformersVLMConfig(
        text_config=text_config or AutoConfig.from_pretrained(str(folder)), language_model=str(folder),
        ve_hidden_size=vision_config.hidden_size, image_feature_count=encoder_feature_count(vision_config),
        vision_encoder=vision_encoder, image_processing=read_encoder_folder(vision_model_path) or None,
        **config_fields)
    count = config.projector_output_count()  # the encoder's features, or a Q-Former's queries
    config.image_special_token, config.image_ids = IMAGE_PLACEHOLDER * count, [image_token_id] * count
    return config


def decoder_layers(language_model) -> nn.ModuleList:
    """The LM's stack of decoder blocks: the first ModuleList of its base model (`model.layers` in Llama, Qwen2,
    SmolLM2, Mistral, ...), found without naming it."""
    base = language_model.get_decoder() if hasattr(language_model, "get_decoder") else language_model
    for module in base.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return module
    raise ValueError(f"{type(language_model).__name__}: no list of decoder layers found")


class TransformersVLM(VisionStack, PreTrainedModel, GenerationMixin):
    config_class = TransformersVLMConfig
    base_model_prefix = ""
    _supports_sdpa = True
    prefill_only_inputs = ("pixel_values", "image_features")

    def __init__(self, config: TransformersVLMConfig, vision_model_path=None, language_model=None):
        """`language_model`: a loaded transformers causal LM (from_language_model passes the folder's weights);
        None: built from config.text_config with fresh weights (a state_dict is loaded next)."""
        vision_encoder = self.load_described_encoder(config, vision_model_path)
        super().__init__(config)
        self.__dict__["vision_encoder"] = vision_encoder  # outside the module registry, as in MiniMindVLM
        if language_model is None:
            language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.language_model = language_model
        self.vision_proj = PROJECTORS[config.projector].from_config(config)
        self.post_init()

    @classmethod
    def from_language_model(cls, folder, tokenizer, vision_model_path, vision_encoder: str = DEFAULT_VISION_ENCODER,
                            **config_fields):
        """The LM folder's weights with a fresh `vision_proj` and the encoder of `vision_model_path`
        (language_model_config); the LM's embeddings grow to the tokenizer's size, placeholder included."""
        language_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **NO_HUB_KERNELS)
        # attn_implementation: the LM's choice, which the new config would otherwise reset on its sub-config.
        config = language_model_config(folder, tokenizer, vision_model_path, vision_encoder,
                                       text_config=language_model.config,
                                       attn_implementation=language_model.config._attn_implementation,
                                       **config_fields)
        if language_model.get_input_embeddings().num_embeddings < len(tokenizer):
            language_model.resize_token_embeddings(len(tokenizer))
        return cls(config, vision_model_path=vision_model_path, language_model=language_model)

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    @property
    def cache_kwarg(self) -> str:
        """The name the LM's forward takes its KV cache under: `cache` in transformers 5.2x+, else
        `past_key_values` (compat.GENERATE_CACHE_KWARG is the same split, for generate())."""
        return "cache" if "cache" in inspect.signature(self.language_model.forward).parameters else "past_key_values"

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return decoder_layers(self.language_model)

    def _init_weights(self, module):
        """Only vision_proj is new here: it keeps its constructor's init (the LM initialises itself)."""

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=False, logits_to_keep=0,
                labels=None, pixel_values=None, image_features=None, inputs_embeds=None, loss_only=False,
                return_dict=True, image_positions=None, first_target=None, target_index=None, **kwargs):
        """The LM's forward on its input embeddings with the prompt's images spliced in (VisionStack). With labels:
        the mean cross-entropy over the positions whose next token is a target, as MiniMindVLM's (loss_only: the
        vocabulary projection only from the batch's first target on, and no logits returned)."""
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        inputs_embeds = self.embed_with_images(input_ids, inputs_embeds, pixel_values, image_features,
                                               past_key_values, image_positions)
        first = 0
        if labels is not None:
            if first_target is None or target_index is None:
                first_target, target_index = target_positions(labels)
            first = first_target if loss_only else 0
            logits_to_keep = labels.shape[1] - first  # positions >= first
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=use_cache,
                                  logits_to_keep=logits_to_keep, **{self.cache_kwarg: past_key_values}, **kwargs)
        logits, loss = out.logits, None
        if labels is not None:
            # Position t predicts token t + 1; the logits start at position `first`.
            rows, columns = target_index // (labels.shape[1] - 1), target_index % (labels.shape[1] - 1)
            loss = F.cross_entropy(logits[rows, columns - first].float(), labels[rows, columns + 1],
                                   ignore_index=IGNORE_INDEX)
            if loss_only:
                logits = None
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=inputs_embeds.new_zeros(()), logits=logits,
                                         **{OUTPUT_CACHE_FIELD: getattr(out, OUTPUT_CACHE_FIELD, None)})

    # One generate() step's inputs: the tokens not yet in the cache, the images on the step that starts from an
    # empty cache (MiniMind's contract; it uses nothing MiniMind-specific).
    prepare_inputs_for_generation = MiniMindForCausalLM.prepare_inputs_for_generation


# The model classes by config.json model_type: what loaders of a saved folder build (both read the same fields).
VLM_CLASSES = {MiniMindVLM.config_class.model_type: MiniMindVLM, TransformersVLMConfig.model_type: TransformersVLM}
