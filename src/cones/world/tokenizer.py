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

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# The split pattern of CLIP's tokenizer, so that our files mean the same to any CLIPTokenizer.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


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
