from __future__ import annotations

import pytest
from checkpoints import write_byte_tokenizer

from fuserve.workers.detokenizer import IncrementalDetokenizer
from fuserve.workers.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("tok")
    write_byte_tokenizer(folder, 384)
    return Tokenizer.from_hf_dir(folder)


def stream(tok: Tokenizer, text: str, stop: list[str]) -> tuple[list[str], IncrementalDetokenizer]:
    d = IncrementalDetokenizer(tok, stop)
    deltas = []
    ids = tok.encode(text)
    for i, t in enumerate(ids):
        d.add([t])
        deltas.append(d.flush(final=d.stopped or i == len(ids) - 1))
        if d.stopped:
            break
    return deltas, d


def test_multibyte_characters_arrive_whole(tok: Tokenizer) -> None:
    deltas, d = stream(tok, "héllo 世界 🙂!", [])
    assert "".join(deltas) == d.text == "héllo 世界 🙂!"
    assert all("\ufffd" not in x for x in deltas)


def test_stop_string_truncates_and_streams_consistently(tok: Tokenizer) -> None:
    deltas, d = stream(tok, "one two\n\nthree", ["\n\n", "zzz"])
    assert d.stopped and d.text == "one two"
    assert "".join(deltas) == "one two"


def test_partial_stop_is_held_back_then_released(tok: Tokenizer) -> None:
    d = IncrementalDetokenizer(tok, ["END"])
    d.add(tok.encode("abcE"))
    assert d.flush(final=False) == "abc"
    d.add(tok.encode("x"))
    assert d.flush(final=False) == "Ex"


def test_chat_template_renders(tok: Tokenizer) -> None:
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.backend.token_to_id("<|im_start|>") in ids
