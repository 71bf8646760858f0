"""Prompt building and option-letter parsing (streamtc.prompts), and the built-in tokenizer."""

from __future__ import annotations

import pytest

from streamtc.errors import ConfigError, InputError
from streamtc.presets import build_config
from streamtc.prompts import (
    MC_INSTRUCTION,
    chat_messages,
    format_options,
    multiple_choice_question,
    parse_option_letter,
    split_video_prompt,
)
from streamtc.presets.tokenizer import BPE_VOCAB_SIZE, SPECIAL_TOKENS, build_tokenizer, save_processor, tokenizer_for_config

OPTIONS = ["a red cup", "a phone", "a blue umbrella", "nothing"]


# -- multiple-choice prompt -------------------------------------------------------------------


def test_multiple_choice_prompt_has_the_benchmark_form() -> None:
    prompt = multiple_choice_question("What is the man holding?", OPTIONS)
    assert prompt.splitlines() == [
        "What is the man holding?",
        "A. a red cup",
        "B. a phone",
        "C. a blue umbrella",
        "D. nothing",
        MC_INSTRUCTION,
    ]
    assert MC_INSTRUCTION == "Answer with the option's letter from the given choices directly."


@pytest.mark.parametrize("lettered", [["A. x", "B. y"], ["(A) x", "(B) y"], ["A) x", "B) y"], ["A:x", "B: y"]])
def test_lettered_options_keep_their_letters(lettered: list[str]) -> None:
    assert format_options(lettered) == ["A. x", "B. y"]


def test_options_lettered_out_of_order_are_relettered() -> None:
    assert format_options(["B. x", "A. y"]) == ["A. B. x", "B. A. y"]


def test_no_options_is_an_input_error() -> None:
    with pytest.raises(InputError):
        format_options([])


# -- letter parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("B", "B"),
        ("b", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        (" [c] ", "C"),
        ("**D**", "D"),
        ("B. a phone", "B"),
        ("(c) a blue umbrella", "C"),
        ("d) nothing", "D"),
        ("A: a red cup", "A"),
        ("The answer is B", "B"),
        ("The answer is B.", "B"),
        ("the answer is (c)", "C"),
        ("Answer: d", "D"),
        ("The correct answer is: A", "A"),
        ("I would pick option C because the cup is blue.", "C"),
        ("Probably (D), since nothing is in his hands.", "D"),
        ("a phone", "B"),
        ("He is holding a blue umbrella.", "C"),
    ],
)
def test_parse_option_letter_accepts_common_forms(text: str, letter: str) -> None:
    assert parse_option_letter(text, OPTIONS) == letter


@pytest.mark.parametrize(
    "text",
    [
        "",
        "E",  # not one of four options
        "A man is walking down the street.",  # the article "A" is not a choice
        "the answer is a cup",  # lowercase article after "answer is"
        "I am not sure.",
        "Either (A) or (B).",  # two candidates
    ],
)
def test_parse_option_letter_rejects_non_answers(text: str) -> None:
    assert parse_option_letter(text, OPTIONS) is None


def test_parse_option_letter_with_a_count_only() -> None:
    assert parse_option_letter("c", 3) == "C"
    assert parse_option_letter("D", 3) is None
    assert parse_option_letter("a phone", 4) is None  # option texts are unknown
    with pytest.raises(InputError):
        parse_option_letter("A", 0)


# -- chat prompt ------------------------------------------------------------------------------


def test_video_prompt_splits_the_llava_ov_template_at_the_video() -> None:
    tokenizer = build_tokenizer()
    prompt = split_video_prompt(tokenizer, "What happens?", "You are a helpful assistant.")
    assert prompt.prefix == "<|im_start|>system \nYou are a helpful assistant.<|im_end|><|im_start|>user "
    assert prompt.suffix == "\nWhat happens?<|im_end|><|im_start|>assistant\n"
    assert split_video_prompt(tokenizer, "Another question", "You are a helpful assistant.").prefix == prompt.prefix
    assert split_video_prompt(tokenizer, "Q", None).prefix == "<|im_start|>user "
    assert chat_messages("Q")[0]["content"][0] == {"type": "video"}


def test_video_prompt_needs_a_template_with_one_video() -> None:
    tokenizer = build_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    with pytest.raises(ConfigError, match="exactly one"):
        split_video_prompt(tokenizer, "Q")
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        split_video_prompt(tokenizer, "Q")


# -- built-in tokenizer -----------------------------------------------------------------------


def test_tokenizer_special_ids_match_the_tiny_preset() -> None:
    config = build_config("tiny-llava-ov")
    tokenizer = tokenizer_for_config(config)
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert ids == list(range(BPE_VOCAB_SIZE, BPE_VOCAB_SIZE + 5))
    assert (tokenizer.image_token_id, tokenizer.video_token_id) == (config.image_token_id, config.video_token_id)
    assert len(tokenizer) == config.text_config.vocab_size
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def test_tokenizer_round_trips_text_and_is_deterministic() -> None:
    text = "<|im_start|>user <video>\nWhat is the man holding? Ünïcödé, 12:30!<|im_end|>"
    first, second = build_tokenizer(), build_tokenizer()
    ids = first(text, add_special_tokens=False)["input_ids"]
    assert ids == second(text, add_special_tokens=False)["input_ids"]
    assert first.decode(ids) == text
    assert ids.count(first.video_token_id) == 1
    assert len(ids) < len(text) / 2  # a trained BPE, not bytes


def test_padded_tokenizer_reaches_the_public_llava_ov_ids() -> None:
    config = build_config("llava-ov-0.5b")
    tokenizer = tokenizer_for_config(config)
    assert (tokenizer.image_token_id, tokenizer.video_token_id) == (151646, 151647)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645
    small = build_tokenizer()
    text = "What is the man holding?"
    assert tokenizer(text)["input_ids"] == small(text)["input_ids"]  # padding never emitted
    with pytest.raises(ConfigError):
        build_tokenizer(image_token_id=10)


def test_saved_processor_files_load_with_auto_classes(tmp_path) -> None:
    from transformers import AutoImageProcessor, AutoTokenizer

    config = build_config("tiny-llava-ov")
    save_processor(config, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.video_token_id == config.video_token_id
    assert split_video_prompt(tokenizer, "Q").suffix == "\nQ<|im_end|><|im_start|>assistant\n"
    image_processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert image_processor.size["height"] == config.vision_config.image_size
