"""CLIP BPE tokenizer: bundled vocabulary, ids against transformers' CLIPTokenizer (built offline from
the same vocabulary) and against ids of OpenAI's tokenizer written out here."""

import gzip
import hashlib
import html
import json
import random

import ftfy
import pytest
import torch

from mulmodseg.text import decode, tokenize
from mulmodseg.text.prompts import CLASS_SETS, MODALITY_PHRASES, TEMPLATES, make_prompts
from mulmodseg.text.tokenizer import (
    EOT_ID,
    NUM_MERGES,
    SOT_ID,
    VOCAB_PATH,
    VOCAB_SHA256,
    VOCAB_SIZE,
    Tokenizer,
    bytes_to_unicode,
    clean_text,
    default_tokenizer,
)


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """transformers' CLIPTokenizer on files written from our vocabulary (no network)."""
    transformers = pytest.importorskip("transformers")
    ours = default_tokenizer()
    folder = tmp_path_factory.mktemp("clip_tok")
    (folder / "vocab.json").write_text(json.dumps(ours.encoder), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in ours.merges) + "\n", encoding="utf-8"
    )
    # transformers 5.x takes vocab=/merges= (vocab_file= is silently ignored there); 4.x takes files
    try:
        tok = transformers.CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    except TypeError:
        tok = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    assert tok("a spleen")["input_ids"] == [SOT_ID, 320, 588, 15940, EOT_ID], "oracle built wrong"
    return tok


def _unpadded(row: torch.Tensor) -> list:
    ids = row.tolist()
    return ids[: ids.index(EOT_ID) + 1]


def test_bundled_vocabulary_file():
    assert hashlib.sha256(VOCAB_PATH.read_bytes()).hexdigest() == VOCAB_SHA256
    assert (VOCAB_PATH.parent / "LICENSE-CLIP").read_text().count("Copyright (c) 2021 OpenAI") == 1
    with gzip.open(VOCAB_PATH, "rt", encoding="utf-8") as f:
        assert len(f.read().split("\n")) == 262146
    tok = Tokenizer()
    assert len(tok.merges) == NUM_MERGES == 48894
    assert tok.merges[-1] == ("jeky", "ll</w>")
    assert len(tok.encoder) == VOCAB_SIZE == 49408
    assert tok.encoder["<|startoftext|>"] == SOT_ID == 49406
    assert tok.encoder["<|endoftext|>"] == EOT_ID == 49407
    assert tok.encoder["!"] == 0 and tok.encoder["!</w>"] == 256


def test_bytes_to_unicode_table():
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord(" ")] == chr(256 + 32) and table[0] == chr(256)
    assert list(table)[:3] == [ord("!"), ord('"'), ord("#")]


V3_PREFIX = {"MR": [320, 13838, 42310, 14231, 539, 320], "CT": [320, 11639, 775, 999, 22399, 14231, 539, 320]}
REFERENCE_CLASS_IDS = {
    "background": [5994],
    "spleen": [588, 15940],
    "right kidney": [1155, 14610],
    "left kidney": [1823, 14610],
    "gall bladder": [33374, 33593],
    "esophagus": [957, 38634, 8018],
    "liver": [12639],
    "stomach": [14722],
    "arota": [7514, 1397],
    "postcava": [3489, 48682],
    "pancreas": [27708, 601],
    "right adrenal gland": [1155, 24204, 566, 41441],
    "left adrenal gland": [1823, 24204, 566, 41441],
    "duodenum": [691, 78, 1177, 1008],
}


def test_reference_prompt_ids():
    """Ids of OpenAI's SimpleTokenizer for all 28 reference V3 prompts and the V2 example."""
    assert list(REFERENCE_CLASS_IDS) == list(CLASS_SETS["amos_reference"])
    for modality, row in zip(("MR", "CT"), make_prompts(CLASS_SETS["amos_reference"], ["MR", "CT"], "v3")):
        ids = tokenize(row)
        assert ids.shape == (14, 77) and ids.dtype == torch.int64
        for cls, prompt_ids in zip(REFERENCE_CLASS_IDS.values(), ids):
            expected = [SOT_ID, *V3_PREFIX[modality], *cls, 269, EOT_ID]
            assert prompt_ids.tolist() == expected + [0] * (77 - len(expected))
    assert _unpadded(tokenize("A computed tomography imaging of a spleen.")[0]) == [
        49406, 320, 11639, 775, 999, 22399, 14231, 539, 320, 588, 15940, 269, 49407,
    ]  # fmt: skip
    assert _unpadded(tokenize("There is a spleen in this computed tomography imaging.")[0]) == [
        49406, 997, 533, 320, 588, 15940, 530, 589, 11639, 775, 999, 22399, 14231, 269, 49407,
    ]  # fmt: skip


def _oracle_strings():
    """Strings on which ftfy and HTML unescaping change nothing, so transformers must agree exactly."""
    strings = []
    for classes in CLASS_SETS.values():
        for template in TEMPLATES.values():
            strings += [p for row in make_prompts(classes, list(MODALITY_PHRASES), template) for p in row]
    strings += [
        "", "   ", "a", "A", "LIVER", "LiVeR and SpLeEn", "Right Kidney!", "covid19 2024 3.14159 0007 12,345",
        "T1-weighted MR, T2-weighted MR; PET/CT?", "left/right (L/R) [mm] {x} <y> #tag @user $5 50% a+b=c",
        "it's what we're, they've, I'm, we'll, he'd", "IT'S OK", "hello!!! ... ??? --- ***", "a_b_c snake_case",
        "tab\tseparated\nnew line  spaces", "naïve café résumé Ångström Straße", "Ωmega αβγ Москва",
        "中文 日本語 한국어", "emoji 😀🧠 mixed", "x" * 300, "spleen " * 60,
    ]  # fmt: skip
    rng = random.Random(4)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'-_/()[]+=%éüßñçΩπ中文"
    strings += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(150)]
    return strings


def test_ids_match_transformers(hf_tokenizer):
    strings = _oracle_strings()
    assert len(strings) > 300
    ours = tokenize(strings, truncate=True)
    theirs = hf_tokenizer(strings, padding="max_length", max_length=77, truncation=True)["input_ids"]
    for text, row, expected in zip(strings, ours, theirs):
        assert html.unescape(ftfy.fix_text(text)) == text  # so no legitimate difference applies
        expected = expected[: expected.index(EOT_ID) + 1]  # transformers pads with EOT, CLIP with 0
        assert _unpadded(row) == expected, text
        assert row[len(expected) :].eq(0).all()


# Where CLIP's ftfy + double html.unescape changes the text, transformers (which skips both) differs.
# Ids of OpenAI's tokenizer (open_clip 3.3.0 SimpleTokenizer, same cleaning) on these strings:
ORIGINAL_TOKENIZER_IDS = {
    "fish &amp;amp; chips": [2759, 261, 8855],
    "A &lt;b&gt; tag": [320, 283, 321, 285, 3640],
    "\u201cquoted\u201d liver \u2014 here": [257, 27706, 257, 12639, 2005, 763],
    "caf\u00c3\u00a9 au lait": [15304, 2566, 572, 585],
    "don\u2019t stop": [847, 713, 1691],
    "5 &gt; 3": [276, 285, 274],
    "&quot;spleen&quot;": [257, 588, 15940, 257],
}


def test_cleaning_cases_follow_original_tokenizer(hf_tokenizer):
    for text, ids in ORIGINAL_TOKENIZER_IDS.items():
        assert _unpadded(tokenize(text)[0]) == [SOT_ID, *ids, EOT_ID], text
    assert hf_tokenizer("fish &amp;amp; chips")["input_ids"][1:-1] != ORIGINAL_TOKENIZER_IDS["fish &amp;amp; chips"]
    assert clean_text("  Fish &amp;amp;\t\nChips ") == "fish & chips"


def test_too_long_text():
    long_text = "liver " * 80
    with pytest.raises(ValueError, match="truncate=True"):
        tokenize(long_text)
    ids = tokenize(["spleen", long_text], truncate=True)
    assert ids[1, 0] == SOT_ID and ids[1, -1] == EOT_ID and ids[1].ne(0).all()
    assert ids[1, 1:-1].eq(12639).all()
    assert tokenize("liver " * 75).ne(0).all()  # 75 + SOT + EOT = 77 exactly fits
    assert tokenize("liver", context_length=5).tolist() == [[SOT_ID, 12639, EOT_ID, 0, 0]]
    assert tokenize("liver", context_length=2, truncate=True).tolist() == [[SOT_ID, EOT_ID]]
    for length in (0, 1, -3):
        with pytest.raises(ValueError, match=f"context_length must be at least 2 .*got {length}"):
            tokenize("liver", context_length=length, truncate=True)


def test_decode_round_trips():
    strings = _oracle_strings()[:200] + list(ORIGINAL_TOKENIZER_IDS)
    ids = tokenize(strings, truncate=True)
    texts = decode(ids)
    assert texts[0] == "a photo of a background ." and decode(ids[0]) == texts[0]
    assert torch.equal(tokenize(texts, truncate=True), ids)
    assert decode([320, 588, 15940]) == "a spleen"
    assert decode(tokenize("naïve 中文")[0]) == "naïve 中文"


def test_special_tokens_in_text_and_cache():
    tok = Tokenizer()
    assert tok.encode("a <|endoftext|> b") == [tok.encoder["a</w>"], EOT_ID, tok.encoder["b</w>"]] == [320, EOT_ID, 321]
    assert tok.encode("spleen spleen") == [588, 15940, 588, 15940]
    assert tok._bpe("spleen") == ("sp", "leen</w>")


def test_vocabulary_is_read_lazily(tmp_path):
    tok = Tokenizer(tmp_path / "absent.txt.gz")  # constructing reads nothing
    with pytest.raises(FileNotFoundError):
        tok.encode("liver")
    assert default_tokenizer() is default_tokenizer()
