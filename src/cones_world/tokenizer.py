"""A CLIP tokenizer for a closed vocabulary.

Stable Diffusion's tokenizer is CLIP's byte-level BPE. We keep the exact same pre-processing and file
format (vocab.json + merges.txt + tokenizer.json), but train the merges on our own word list so that every
word of the world, the rare identifier tokens included, is one token, as `sks` is one token in real SD.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTokenizer

from cones import files

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# The split pattern of CLIP's tokenizer, so that our files mean the same to any CLIPTokenizer.
_CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def build_clip_tokenizer(words: Iterable[str], out_dir: str, model_max_length: int = 32) -> CLIPTokenizer:
    """Train BPE merges until each of `words` is a single token; save and return a `CLIPTokenizer`.

    Writes vocab.json and merges.txt (what older transformers read) and tokenizer.json (newer ones).
    """
    words = sorted({w.lower() for w in words})
    bpe = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token=EOS))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=1_000_000,  # never the limit: merging stops once every word is whole
        min_frequency=1,
        special_tokens=[BOS, EOS],
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([" ".join(words)], trainer)
    os.makedirs(out_dir, exist_ok=True)
    bpe.model.save(out_dir)
    tokenizer = CLIPTokenizer(
        vocab=os.path.join(out_dir, "vocab.json"),
        merges=os.path.join(out_dir, "merges.txt"),
        model_max_length=model_max_length,
    )
    tokenizer.save_pretrained(out_dir)
    split = [w for w in words if len(tokenizer.tokenize(w)) != 1]
    if split:
        raise RuntimeError(f"words not single tokens after training merges: {split[:5]}")
    return CLIPTokenizer.from_pretrained(out_dir)


def restrict_to_words(
    source: str, out_dir: str, words: Iterable[str], model_max_length: int
) -> CLIPTokenizer:
    """`source`'s tokenizer, same ids, with only `words` left whole: every other word loses its last merge
    and its vocabulary entry, so it splits into pieces that no caption ever used.

    Why: a UNet conditioned on the world CLIP's text tower should hear the diffusion captions' words alone. The
    CLIP's detail words ("stripes", "dots") would otherwise reach it and name the very features the world
    keeps unnamed; cut this way they arrive as untrained sub-word pieces, as a typo does in Stable Diffusion.
    """
    import json

    keep = {w.lower() + "</w>" for w in words}
    with open(os.path.join(source, "tokenizer.json")) as f:
        spec = json.load(f)
    model = spec["model"]
    merges = [m if isinstance(m, list) else m.split(" ") for m in model["merges"]]
    needed = set(keep)  # the kept words and every piece their merges pass through
    for a, b in reversed(merges):
        if a + b in needed:
            needed |= {a, b}
    cut = {
        token for token in model["vocab"] if token.endswith("</w>") and len(token) > 5 and token not in needed
    }
    model["merges"] = [m for m in merges if m[0] + m[1] not in cut]
    model["vocab"] = {token: i for token, i in model["vocab"].items() if token not in cut}
    os.makedirs(out_dir, exist_ok=True)
    files.write_text(
        os.path.join(out_dir, "tokenizer.json"), json.dumps(spec, ensure_ascii=False), overwrite=True
    )
    files.write_text(
        os.path.join(out_dir, "vocab.json"), json.dumps(model["vocab"], ensure_ascii=False), overwrite=True
    )
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in model["merges"])
    files.write_text(os.path.join(out_dir, "merges.txt"), merges_text, overwrite=True)
    tokenizer = CLIPTokenizer(
        vocab=os.path.join(out_dir, "vocab.json"),
        merges=os.path.join(out_dir, "merges.txt"),
        model_max_length=model_max_length,
    )
    tokenizer.save_pretrained(out_dir)
    for word in cut:
        if len(tokenizer.tokenize(word[: -len("</w>")])) < 2:
            raise RuntimeError(f"{word!r} is still one token after cutting its merge.")
    return CLIPTokenizer.from_pretrained(out_dir)
