"""A small real tokenizer and processor files for the random-weight presets (LLaVA-OneVision, Qwen-VL), offline.

Real checkpoints bring their own tokenizer and chat template (`AutoTokenizer` from the same path). The presets have random weights and nothing can be downloaded, so this module
builds a stand-in that behaves like Qwen2's: a byte-level BPE (Qwen2's pre-tokenizer regex, NFC,
byte-level decoding) trained with the `tokenizers` library on a short English text written for
it, followed by the Qwen2 special tokens in Qwen2's order and LLaVA-OneVision's placeholders:

    <|endoftext|>  <|im_start|>  <|im_end|>  <image>  <video>      (five consecutive ids)

Ids. The BPE has exactly `BPE_VOCAB_SIZE` entries, so by default the special tokens take ids
1024..1028 (`<image>` = 1027, `<video>` = 1028): the tiny preset's config uses those ids and a
vocabulary of 1029 rows. The real-size presets keep the public ids (`<image>` = 151646,
`<video>` = 151647); for them `build_tokenizer(image_token_id=151646)` pads the BPE vocabulary with
reserved entries (`<|reserved_N|>`) that no merge can produce, so the special tokens land on the
public ids while the text is still tokenised by the small BPE. Padding rather than rewriting the
config keeps a preset's config identical to the checkpoint it mirrors.

The chat template is LLaVA-OneVision's (llava-hf processors): `<|im_start|>{role} ` then the
`<image>`/`<video>` placeholders, then `\\n{text}` for each text item, then `<|im_end|>`; the
generation prompt is `<|im_start|>assistant\\n`. `save_processor` writes a preset's tokenizer and
image-processor files in a llava-hf checkpoint's layout (no `LlavaOnevisionProcessor` object: it
requires a video processor, and transformers' video processors need torchvision).

Qwen-VL presets (`family="qwen_vl"`; Qwen3-VL too: its template renders a video the same way,
`<|vision_start|><|video_pad|><|vision_end|>`, and real checkpoints bring their own) get Qwen2's special tokens in Qwen2's order, from
`<|endoftext|>` to `<|video_pad|>` (14 tokens; on the real-size presets at their public ids
151643..151656, `<|video_pad|>` = 151656), and the Qwen2-VL chat template: a default system turn
when none is given, `<|im_start|>{role}\n`, content items in order (a video renders as
`<|vision_start|><|video_pad|><|vision_end|>`, text as is), `<|im_end|>\n`; the generation prompt
is `<|im_start|>assistant\n`. `save_processor` writes the tokenizer and a Qwen2-VL
`preprocessor_config.json` for them.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import LlavaOnevisionConfig, PretrainedConfig, PreTrainedTokenizerFast
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ..errors import ConfigError
from ..hosts.qwen_preprocess import QWEN3_VL_MEAN, QWEN3_VL_STD
from ..preprocess import LLAVA_OV_MEAN, LLAVA_OV_STD

# Size of the trained byte-level BPE (256 byte symbols + 768 merges); special tokens follow it.
BPE_VOCAB_SIZE = 1024

# Qwen2's special tokens, in Qwen2's id order, then LLaVA-OneVision's image/video placeholders.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
IMAGE_TOKEN_OFFSET = SPECIAL_TOKENS.index("<image>")  # <image> id = first special id + 3

# Qwen2's special tokens through Qwen2-VL's vision placeholders, in id order (151643..151656).
QWEN_VL_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)
QWEN_VL_IMAGE_TOKEN_OFFSET = QWEN_VL_SPECIAL_TOKENS.index("<|image_pad|>")

# Qwen2's pre-tokenizer split (tokenizer.json of Qwen/Qwen2-0.5B).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The chat template of the llava-hf LLaVA-OneVision processors (Qwen2 roles, placeholders first).
LLAVA_OV_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The chat template of the Qwen2-VL / Qwen2.5-VL processors (chat_template.json of Qwen/Qwen2-VL-7B-Instruct).
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Training text for the BPE: plain English about scenes, video and questions, written for streamtc.
_CORPUS = """\
You are a helpful assistant. The user shows you a video and asks a question about it. Watch the
frames carefully and answer the question. If the question gives options, answer with the option's
letter from the given choices directly. Options are written as A. first choice, B. second choice,
C. third choice and D. fourth choice. The answer is A. The answer is B. The answer is C. The answer
is D. Answer: A. Answer: B. Answer: C. Answer: D. (A) (B) (C) (D) Yes. No. I am not sure.

A man walks down a busy street in the morning. He is holding a cup of coffee in his right hand and
a phone in his left hand. Cars pass by, a red bus stops at the corner, and a woman with a blue
umbrella waits for the light to change. The camera follows the man as he crosses the road. A dog
runs after a ball in the park, and two children laugh while they play on the grass. Later the
weather changes: dark clouds cover the sky, the wind moves the trees, and it starts to rain.

In the kitchen, a woman cuts vegetables on a wooden board. She puts the onions and the carrots into
a pot, adds water and salt, and turns on the stove. Then she opens the fridge, takes out a bottle of
milk and pours it into a glass. The clock on the wall shows half past seven. Someone knocks on the
door, and she walks to the hall to open it. A friend comes in with a bag of apples and a loaf of
bread. They sit at the table, talk about the day and drink tea together.

What is the man holding? What color is the car? How many people are in the room? Where is the cat
sitting? What happens after the door opens? Why does the woman turn around? Which object appears
first in the video? What did the person do before leaving the room? Is the light on or off? Count
the number of birds on the wire. Describe the scene in one sentence. What is written on the sign?
When does the train arrive? Who is speaking at the beginning of the clip? What will happen next?

The video shows a football match in a large stadium. The players in white shirts attack from the
left side, and the goalkeeper in green jumps to catch the ball. The crowd stands up and cheers when
the striker scores a goal in the second half. The referee blows the whistle, shows a yellow card
and points to the centre of the field. At the end of the game the team celebrates, and the coach
shakes hands with the other coach. The score on the board reads two to one.

A car drives along a mountain road at sunset. The sun is low and orange, the sky turns pink and
purple, and the shadows of the hills grow longer. The driver stops at a small village, buys fruit
from a market stall and talks with an old man who sells fresh fish. A cyclist passes the car, rings
a bell and waves. Further on, the road follows a river; a bridge of grey stone crosses the water,
and a boat with a white sail moves slowly toward the lake.

In the office, several people sit in front of computers. One of them writes notes in a book, another
reads a letter, and a third draws a chart on the whiteboard with a black marker. The chart shows the
numbers for each month of the year: January, February, March, April, May, June, July, August,
September, October, November and December. A printer on the desk prints three pages, and a woman
picks them up and puts them in a folder. The meeting starts at nine and ends at ten.

At the beach, waves roll onto the sand. A girl builds a castle with a yellow bucket and a small
shovel, and her brother looks for shells near the water. Their parents rest under a large striped
umbrella and read books. A seagull lands next to the towel, takes a piece of bread and flies away.
Later, the family packs the bag, shakes the sand off the towels and walks back to the car park.

The camera is mounted on a helmet. The person rides a bicycle through a forest, turns right at a
wooden sign, and climbs a steep hill. At the top there is a view of the valley, with fields,
houses, a church tower and a long road. The rider takes a photo, drinks some water and checks a map
on the phone before riding down the other side of the hill, faster and faster, until the road is
flat again.

In a workshop, a man repairs an old chair. He removes the broken leg, measures a new piece of wood,
cuts it with a saw and smooths it with paper. He glues the new leg in place, waits for the glue to
dry, and paints the whole chair dark brown. On the shelf behind him there are tools: a hammer, a
screwdriver, pliers, a tape measure and a box of nails. The radio plays music the whole time.

A cooking show: the chef explains each step to the camera. First, heat the oil in a pan. Second, add
the garlic and stir for one minute. Third, add the tomatoes, the pepper and the herbs. Fourth, let
the sauce cook for twenty minutes, then pour it over the pasta. The chef tastes the sauce, smiles,
and says that it needs a little more salt. The audience claps at the end of the show.

Numbers and time: one, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, twenty,
thirty, forty, fifty, one hundred. 0 1 2 3 4 5 6 7 8 9 10 12 15 20 30 45 60 90 100 2024 2025.
Seconds, minutes, hours, days, weeks. At 00:05 the door opens; at 00:12 a man enters; at 01:30 the
lights go out. Left, right, up, down, front, back, inside, outside, above, below, near, far.
Colors: red, orange, yellow, green, blue, purple, pink, brown, black, white, grey, gold and silver.
"""


def _train_bpe() -> Tokenizer:
    """Train the byte-level BPE on `_CORPUS`; deterministic, offline, a few milliseconds."""
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    bpe.train_from_iterator([_CORPUS], trainer)
    if bpe.get_vocab_size() != BPE_VOCAB_SIZE:
        raise ConfigError(f"the built-in BPE reached {bpe.get_vocab_size()} tokens, expected {BPE_VOCAB_SIZE}")
    return bpe


def _pad_vocab(bpe: Tokenizer, size: int) -> Tokenizer:
    """Return `bpe` with reserved entries appended up to `size` ids; no merge produces them."""
    data = json.loads(bpe.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    vocab.update({f"<|reserved_{i}|>": i for i in range(len(vocab), size)})
    return Tokenizer.from_str(json.dumps(data))


def build_tokenizer(image_token_id: int | None = None, family: str = "llava_onevision") -> PreTrainedTokenizerFast:
    """A Qwen2-style fast tokenizer with the chat template of `family` ("llava_onevision" or "qwen_vl").

    image_token_id: where the image placeholder (`<image>`, or `<|image_pad|>` for Qwen-VL) must
    sit. None puts the special tokens right after the BPE; a larger id pads the vocabulary first.
    """
    if family not in ("llava_onevision", "qwen_vl"):
        raise ConfigError(f"family must be 'llava_onevision' or 'qwen_vl', got {family!r}")
    qwen = family == "qwen_vl"
    specials, offset = (QWEN_VL_SPECIAL_TOKENS, QWEN_VL_IMAGE_TOKEN_OFFSET) if qwen else (SPECIAL_TOKENS,
                                                                                          IMAGE_TOKEN_OFFSET)
    first_special = BPE_VOCAB_SIZE if image_token_id is None else image_token_id - offset
    if first_special < BPE_VOCAB_SIZE:
        raise ConfigError(
            f"image_token_id must be >= {BPE_VOCAB_SIZE + offset} (the built-in BPE has "
            f"{BPE_VOCAB_SIZE} tokens before the special ones), got {image_token_id}"
        )
    bpe = _train_bpe()
    if first_special > BPE_VOCAB_SIZE:
        bpe = _pad_vocab(bpe, first_special)
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    placeholders = ({"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"} if qwen
                    else {"image_token": "<image>", "video_token": "<video>"})
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=placeholders,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = QWEN_VL_CHAT_TEMPLATE if qwen else LLAVA_OV_CHAT_TEMPLATE
    return tokenizer


def _is_qwen_vl(config: PretrainedConfig) -> bool:
    return config.model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def tokenizer_for_config(config: PretrainedConfig) -> PreTrainedTokenizerFast:
    """`build_tokenizer` placed on the config's image/video placeholder ids (LLaVA-OneVision or
    Qwen-VL), checked against its vocabulary."""
    if config.video_token_id != config.image_token_id + 1:
        raise ConfigError(
            f"the built-in tokenizer puts the video placeholder right after the image one; config has "
            f"image_token_id={config.image_token_id}, video_token_id={config.video_token_id}"
        )
    tokenizer = build_tokenizer(config.image_token_id, "qwen_vl" if _is_qwen_vl(config) else "llava_onevision")
    vocab_size = config.get_text_config().vocab_size
    if len(tokenizer) > vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary only {vocab_size}")
    return tokenizer


def build_image_processor(config: LlavaOnevisionConfig) -> LlavaOnevisionImageProcessorPil:
    """LLaVA-OneVision's PIL image processor at the tower's resolution, with the llava-hf
    checkpoints' SigLIP normalisation (mean = std = 0.5) and anyres grid in multiples of it."""
    size = config.vision_config.image_size
    return LlavaOnevisionImageProcessorPil(
        size={"height": size, "width": size},
        image_mean=list(LLAVA_OV_MEAN),
        image_std=list(LLAVA_OV_STD),
        image_grid_pinpoints=[[size * i, size * j] for i in range(1, 7) for j in range(1, 7)],
    )


def build_qwen_vl_image_processor(config: PretrainedConfig) -> Qwen2VLImageProcessorPil:
    """Qwen2-VL's PIL image processor with the vision config's patch, temporal patch and merge
    sizes (normalisation as the public checkpoints: CLIP's, or 0.5 for Qwen3-VL, whose checkpoints
    ship this same image processor)."""
    vision = config.vision_config
    normalisation = ({"image_mean": list(QWEN3_VL_MEAN), "image_std": list(QWEN3_VL_STD)}
                     if config.model_type == "qwen3_vl" else {})
    return Qwen2VLImageProcessorPil(patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                                    merge_size=vision.spatial_merge_size, **normalisation)


def save_processor(config: PretrainedConfig, directory: str | Path) -> None:
    """Write the processor files of a checkpoint for a preset config into `directory`:
    tokenizer (with `chat_template.jinja`) and `preprocessor_config.json` (llava-hf or Qwen-VL layout).

    `AutoTokenizer` / `AutoImageProcessor` load what this writes, which is all
    `StreamingSession.from_pretrained` reads besides the weights.
    """
    tokenizer_for_config(config).save_pretrained(directory)
    processor = build_qwen_vl_image_processor(config) if _is_qwen_vl(config) else build_image_processor(config)
    processor.save_pretrained(directory)


__all__ = [
    "BPE_VOCAB_SIZE",
    "SPECIAL_TOKENS",
    "LLAVA_OV_CHAT_TEMPLATE",
    "QWEN_VL_CHAT_TEMPLATE",
    "QWEN_VL_SPECIAL_TOKENS",
    "build_tokenizer",
    "tokenizer_for_config",
    "build_image_processor",
    "build_qwen_vl_image_processor",
    "save_processor",
]
