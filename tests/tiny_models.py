"""Builders for tiny random-weight models used by the fast tests.

Everything is saved with ``save_pretrained`` so the engine's real loading path runs.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Hello! How can I help you today? I am a helpful assistant.",
    "Café, naïve, résumé, über, smörgåsbord: accented letters are fine.",
    "日本語のテキストと中文文本 and emoji 😀🎉🚀 mixed with words.",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 42 100 and punctuation ,.;:!?()[]{}<>",
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(path: Path, chat_template: str | None = CHAT_TEMPLATE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    return fast


# Every tiny text model's widths.
TINY_DIMS = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}


def _tiny_sliding_layers() -> dict:
    """Gemma 3's and Gemma 4's tiny layer stack: 4 layers of head size 16 alternating sliding-window
    (16 tokens) and full attention."""
    return {
        **TINY_DIMS,
        "num_hidden_layers": 4,
        "head_dim": 16,
        "max_position_embeddings": 1024,
        "sliding_window": 16,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
    }


def build_tiny_llama(
    path: Path, *, chat_template: str | None = CHAT_TEMPLATE, seed: int = 0, max_position_embeddings: int = 256
) -> Path:
    """A 2-layer Llama with a byte-level BPE tokenizer and a ChatML template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path, chat_template)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        **TINY_DIMS,
        num_hidden_layers=2,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform logits; sharpen them so greedy decoding is
    # well separated (no ties) and batch-invariance tests are meaningful.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path)
    (path / "README.md").write_text(json.dumps({"tiny": True}))
    return path


# A ChatML template whose image parts become the processor's placeholder (written per family).
def _vlm_template(placeholder: str) -> str:
    return (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'text' %}{{ part['text'] }}"
        "{% elif part['type'] == 'image' %}" + placeholder + "{% endif %}{% endfor %}{% endif %}"
        "{{ '<|im_end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


def _tiny_text_config(vocab_size: int, eos: int, max_position_embeddings: int = 1024):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        **TINY_DIMS,
        num_hidden_layers=2,
        max_position_embeddings=max_position_embeddings,
        eos_token_id=eos,
        initializer_range=0.3,
    )  # larger weights: outputs depend on the inputs


def _tiny_gemma4_text_config(tok, **overrides):
    """Gemma 4's text model, tiny: _tiny_sliding_layers, the last two layers reusing the first two's
    keys and values, per-layer inputs of 8."""
    import transformers

    return transformers.Gemma4TextConfig(
        **{
            "vocab_size": len(tok),
            **_tiny_sliding_layers(),
            "num_kv_shared_layers": 2,
            "hidden_size_per_layer_input": 8,
            "vocab_size_per_layer_input": len(tok),
            "eos_token_id": tok.eos_token_id,
            **overrides,
        }
    )


def build_tiny_gemma4_text(path: Path, seed: int = 0) -> Path:
    """Gemma 4's text model: 4 layers alternating sliding-window (16 tokens) and full attention, the
    last two reusing the keys and values of the first two (KV sharing), and per-layer inputs."""
    import torch
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path, CHAT_TEMPLATE)
    tok.save_pretrained(path)
    config = _tiny_gemma4_text_config(tok, initializer_range=0.3)
    torch.manual_seed(seed)
    transformers.Gemma4ForCausalLM(config).save_pretrained(path)
    return path


def build_tiny_llava(path: Path, seed: int = 0) -> Path:
    """LLaVA: a 1-layer CLIP vision tower on 28x28 images (4 patches -> 4 image tokens per image),
    a projector and the 2-layer Llama; a real LlavaProcessor (CLIP image processor)."""
    return _build_llava_family(path, seed, next_=False)


def build_tiny_llava_next(path: Path, seed: int = 0) -> Path:
    """LLaVA-NeXT: LLaVA's tiny tower and Llama with "anyres" tiling: an image is resized to the best
    of three grids (28x28, 28x56, 56x28), cut into 28x28 tiles plus a base view, and its features
    unpadded to the image's aspect ratio with a newline embedding per row; a real LlavaNextProcessor."""
    return _build_llava_family(path, seed, next_=True)


def _build_llava_family(path: Path, seed: int, next_: bool) -> Path:
    import torch
    import transformers

    family = "LlavaNext" if next_ else "Llava"
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path, None)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tiles = {"image_grid_pinpoints": [[28, 28], [28, 56], [56, 28]]} if next_ else {}
    image_processor = getattr(transformers, "LlavaNextImageProcessor" if next_ else "CLIPImageProcessor")(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, **tiles
    )
    processor = getattr(transformers, f"{family}Processor")(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
        chat_template=_vlm_template("<image>"),
    )
    config = getattr(transformers, f"{family}Config")(
        text_config=_tiny_text_config(len(tok), tok.eos_token_id),
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
            projection_dim=32,
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        initializer_range=0.3,
        **tiles,
    )
    torch.manual_seed(seed)
    getattr(transformers, f"{family}ForConditionalGeneration")(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_tiny_idefics3(path: Path, seed: int = 0) -> Path:
    """Idefics3: a 1-layer SigLIP-style tower on 56x56 tiles, pixel shuffle (scale 2: 4 image
    tokens per tile), images split into tiles plus a global view; a real Idefics3Processor."""
    return _build_idefics3_family(path, seed, smolvlm=False)


def build_tiny_smolvlm(path: Path, seed: int = 0) -> Path:
    """SmolVLM: Idefics3's architecture and tiling under its own classes, with SmolVLMProcessor, which
    holds a video processor: saved by the processor where torchvision is installed, else its files
    written part by part as a Hub checkpoint holds them (the loader then builds it without its video
    processor)."""
    return _build_idefics3_family(path, seed, smolvlm=True)


def _build_idefics3_family(path: Path, seed: int, smolvlm: bool) -> Path:
    import torch
    import transformers

    family = "SmolVLM" if smolvlm else "Idefics3"
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path, None)
    tok.add_special_tokens(
        {"additional_special_tokens": ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]}
    )
    module = f"transformers.models.{family.lower()}.image_processing_pil_{family.lower()}"
    image_processor = getattr(importlib.import_module(module), f"{family}ImageProcessorPil")(
        size={"longest_edge": 112}, max_image_size={"longest_edge": 56}, do_image_splitting=True
    )
    template = _vlm_template("<image>")
    config = getattr(transformers, f"{family}Config")(
        text_config=_tiny_text_config(len(tok), tok.eos_token_id),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        initializer_range=0.3,
    )
    torch.manual_seed(seed)
    getattr(transformers, f"{family}ForConditionalGeneration")(config).save_pretrained(path)
    if not smolvlm:
        transformers.Idefics3Processor(
            image_processor=image_processor, tokenizer=tok, image_seq_len=4, chat_template=template
        ).save_pretrained(path)
    elif has_torchvision():
        transformers.SmolVLMProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            video_processor=transformers.SmolVLMVideoProcessor(),
            image_seq_len=4,
            chat_template=template,
        ).save_pretrained(path)
    else:
        image_processor.save_pretrained(path)
        (path / "processor_config.json").write_text(
            json.dumps({"processor_class": "SmolVLMProcessor", "image_seq_len": 4}, indent=2)
        )
        video = {"video_processor_type": "SmolVLMVideoProcessor", "processor_class": "SmolVLMProcessor", "fps": 1}
        (path / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
        tok.chat_template = template
        tok.save_pretrained(path)
    return path


def build_tiny_gemma3(path: Path, seed: int = 0) -> Path:
    """Gemma 3: a 1-layer SigLIP tower on 28x28 images (16 patches pooled to 4 image tokens), and a
    4-layer Gemma 3 text model alternating sliding-window (16 tokens) and full attention. Its own
    masks let an image's tokens attend to each other both ways. A real Gemma3Processor; the
    tokenizer names its image tokens as Gemma's does (``extra_special_tokens``). Gemma's own
    initialisation (0.02): larger weights make its outputs the same token whatever the image."""
    import torch
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    names = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = build_tokenizer(path, None)
    tok.add_special_tokens({"additional_special_tokens": list(names.values())})
    tok.save_pretrained(path)
    tok = transformers.AutoTokenizer.from_pretrained(path, extra_special_tokens=names)
    processor = transformers.Gemma3Processor(
        image_processor=transformers.Gemma3ImageProcessor(size={"height": 28, "width": 28}),
        tokenizer=tok,
        image_seq_length=4,
        chat_template=_vlm_template("<start_of_image>"),
    )
    text = transformers.Gemma3TextConfig(vocab_size=len(tok), **_tiny_sliding_layers(), eos_token_id=tok.eos_token_id)
    vision = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=7
    )
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in names.items()}
    config = transformers.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=ids["boi_token"],
        eoi_token_index=ids["eoi_token"],
        image_token_index=ids["image_token"],
    )
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # the projector's weight starts at zero: every image would look the same
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.3)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_tiny_gemma4(path: Path, seed: int = 0, images_both_ways: bool = False) -> Path:
    """Gemma 4 with images: build_tiny_gemma4_text's text model (KV-shared layers, per-layer
    embeddings) and a 1-layer vision tower (4-pixel patches pooled 2x2, 70 soft tokens at most).
    ``images_both_ways``: ``use_bidirectional_attention="vision"``, as Gemma 4's larger models set,
    so an image's tokens attend to each other both ways; otherwise causally, as in its smaller ones.
    Its processor's files are written part by part, as a Hub checkpoint holds them (its video
    processor needs torchvision to be built, the loader then leaves it out)."""
    import torch
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    names = {
        "boi_token": "<|image>",
        "eoi_token": "<image|>",
        "image_token": "<|image|>",
        "boa_token": "<|audio>",
        "eoa_token": "<audio|>",
        "audio_token": "<|audio|>",
    }
    tok = build_tokenizer(path, None)
    tok.add_special_tokens({"additional_special_tokens": [*names.values(), "<|video|>"]})
    tok.save_pretrained(path)
    tok = transformers.AutoTokenizer.from_pretrained(path, extra_special_tokens=names)
    tok.chat_template = _vlm_template("<|image|>")
    tok.save_pretrained(path)
    image_processor = transformers.Gemma4ImageProcessorPil(patch_size=4, max_soft_tokens=70, pooling_kernel_size=2)
    processor = {
        "processor_class": "Gemma4Processor",
        "image_seq_length": 70,
        "image_processor": {**image_processor.to_dict(), "image_processor_type": "Gemma4ImageProcessor"},
        "feature_extractor": transformers.Gemma4AudioFeatureExtractor().to_dict(),
    }
    (path / "processor_config.json").write_text(json.dumps(processor, indent=2, default=str))
    video = {"video_processor_type": "Gemma4VideoProcessor", "processor_class": "Gemma4Processor"}
    (path / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in names.items()}
    text = _tiny_gemma4_text_config(
        tok,
        global_head_dim=32,
        use_bidirectional_attention="vision" if images_both_ways else None,
        initializer_range=0.1,  # Gemma's 0.02 leaves near-even logprobs: ties a batch's rounding could flip
    )
    vision = transformers.Gemma4VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        patch_size=4,
        pooling_kernel_size=2,
        position_embedding_size=64,
    )
    config = transformers.Gemma4Config(
        text_config=text,
        vision_config=vision,
        audio_config=None,
        boi_token_id=ids["boi_token"],
        eoi_token_id=ids["eoi_token"],
        image_token_id=ids["image_token"],
        video_token_id=tok.convert_tokens_to_ids("<|video|>"),
        audio_token_id=ids["audio_token"],
        boa_token_id=ids["boa_token"],
        eoa_token_index=ids["eoa_token"],
    )
    torch.manual_seed(seed)
    transformers.Gemma4ForConditionalGeneration(config).save_pretrained(path)
    return path


QWEN2VL_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]


def has_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


QWEN2VL_SIZE = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
QWEN2VL_TEMPLATE = _vlm_template("<|vision_start|><|image_pad|><|vision_end|>")


def qwen2vl_processor(tok, processor_class: str = "Qwen2VLProcessor"):
    """A real Qwen2VLProcessor (or Qwen2_5_VLProcessor, which takes the same parts): images resized
    to 56x56..112x112 pixels (multiples of 28), 14-pixel patches merged 2x2, so 2 to 16 image tokens
    an image. Needs torchvision (its video processor)."""
    import transformers
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    return getattr(transformers, processor_class)(
        image_processor=Qwen2VLImageProcessor(size=QWEN2VL_SIZE),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(size=QWEN2VL_SIZE),
        chat_template=QWEN2VL_TEMPLATE,
    )


def save_qwen2vl_processor_files(tok, path: Path, processor_class: str = "Qwen2VLProcessor") -> None:
    """Without torchvision Qwen2VLProcessor cannot be built, so its files are written part by part,
    as a Hub checkpoint of Qwen2-VL holds them: the image processor's preprocessor_config.json
    (naming the processor class), the video processor's config, the tokenizer and the chat
    template."""
    from transformers import Qwen2VLImageProcessor

    Qwen2VLImageProcessor(size=QWEN2VL_SIZE).save_pretrained(path)
    config = json.loads((path / "preprocessor_config.json").read_text())
    config["processor_class"] = processor_class
    (path / "preprocessor_config.json").write_text(json.dumps(config, indent=2))
    video = {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "processor_class": processor_class,
        "size": QWEN2VL_SIZE,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }
    (path / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    tok.chat_template = QWEN2VL_TEMPLATE
    tok.save_pretrained(path)


def build_tiny_qwen2vl(path: Path, seed: int = 0) -> Path:
    """Qwen2-VL (multimodal rotary positions): a 1-layer vision tower with 14-pixel patches merged 2x2,
    and a 2-layer text model with M-RoPE, with its processor: saved by the processor where torchvision
    is installed, else its files written part by part (the processor needs torchvision to be built;
    the loader then builds it without its video processor)."""
    return _build_qwen_vl(path, seed, "Qwen2VL")


def build_tiny_qwen25vl(path: Path, seed: int = 0) -> Path:
    """Qwen2.5-VL: Qwen2-VL's M-RoPE text model and processor, and its own vision tower (windowed
    attention in one block, full in the other; RMSNorm and a gated MLP)."""
    return _build_qwen_vl(path, seed, "Qwen2_5_VL")


def _build_qwen_vl(path: Path, seed: int, family: str) -> Path:
    import torch
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path, CHAT_TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens": QWEN2VL_TOKENS})
    tok.save_pretrained(path)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN2VL_TOKENS}
    if family == "Qwen2VL":
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
    else:
        vision = dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, window_size=56,
            fullatt_block_indexes=[1],
        )  # fmt: skip
    config = getattr(transformers, f"{family}Config")(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
            eos_token_id=tok.eos_token_id,
            initializer_range=0.3,
        ),
        vision_config=dict(vision, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    getattr(transformers, f"{family}ForConditionalGeneration")(config).save_pretrained(path)
    processor_class = f"{family}Processor"
    if has_torchvision():
        qwen2vl_processor(tok, processor_class).save_pretrained(path)
    else:
        save_qwen2vl_processor_files(tok, path, processor_class)
    return path
