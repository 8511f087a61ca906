"""Writes a tiny random-weight Qwen3 GGUF with Qwen3-0.6B's real tokenizer.

    python make_gguf.py TOKENIZER_DIR OUT.gguf

TOKENIZER_DIR holds tokenizer.json, tokenizer_config.json and (optionally) config.json and
chat_template.jinja, e.g. ../shared/models/qwen3-0.6b. The weights are random (fixed seed), so
the text it generates is noise, but the vocabulary, merges, special tokens and chat template are
Qwen3's: llama-server's /tokenize gives the same ids as kvgate's tokenizer, and token-id prompts
mean the same thing to both. Shape (ENGINES.md §4a): architecture qwen3, 2 blocks, embedding
64, 2 heads, 1 KV head, head dim 32, feed-forward 128, f16 matrices (f32 norms, as llama.cpp's
own converter writes them), tied embeddings (no output.weight). About 25 MB.

The vocabulary is built as llama.cpp's convert_hf_to_gguf.py builds a gpt2-model one: all ids
below vocab_size, ids without a token as [PADn] (UNUSED), added tokens as CONTROL when special
(or shaped <|...|>), else USER_DEFINED.
"""

import json
import os
import sys

import gguf
import numpy as np

SEED = 20261205
N_BLOCKS = 2
N_EMBD = 64
N_HEAD = 2
N_HEAD_KV = 1
HEAD_DIM = 32
N_FF = 128
# Qwen3-0.6B's figures where the shape does not matter.
VOCAB_SIZE = 151936
CONTEXT_LENGTH = 40960
ROPE_THETA = 1000000.0
RMS_EPS = 1e-6


def load_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def looks_special(text):
    return text.startswith("<|") and text.endswith("|>")


def vocabulary(tok, vocab_size):
    model = tok["model"]
    assert model["type"] == "BPE", model["type"]
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {}
    for a in tok.get("added_tokens", []):
        by_id[a["id"]] = a["content"]
        added[a["id"]] = a
    assert max(by_id) < vocab_size, (max(by_id), vocab_size)
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            text = by_id[i]
            tokens.append(text)
            special = added[i].get("special", False) or looks_special(text)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def token_id(tok, text):
    if text is None:
        return None
    if isinstance(text, dict):
        text = text.get("content")
    for a in tok.get("added_tokens", []):
        if a["content"] == text:
            return a["id"]
    return tok["model"]["vocab"].get(text)


def main():
    src, out = sys.argv[1], sys.argv[2]
    tok = load_json(os.path.join(src, "tokenizer.json"))
    tok_cfg = load_json(os.path.join(src, "tokenizer_config.json"))
    cfg_path = os.path.join(src, "config.json")
    cfg = load_json(cfg_path) if os.path.exists(cfg_path) else {}
    vocab_size = int(cfg.get("vocab_size", VOCAB_SIZE))

    template = None
    jinja = os.path.join(src, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as f:
            template = f.read()
    elif isinstance(tok_cfg.get("chat_template"), str):
        template = tok_cfg["chat_template"]

    tokens, types, merges = vocabulary(tok, vocab_size)
    eos = token_id(tok, tok_cfg.get("eos_token")) or cfg.get("eos_token_id")
    pad = token_id(tok, tok_cfg.get("pad_token"))
    bos = cfg.get("bos_token_id", token_id(tok, "<|endoftext|>"))

    tmp = out + ".tmp"
    w = gguf.GGUFWriter(tmp, "qwen3")
    w.add_name("kvgate-test-qwen3-tiny-random")
    w.add_context_length(CONTEXT_LENGTH)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_BLOCKS)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(RMS_EPS)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if eos is not None:
        w.add_eos_token_id(int(eos))
    if bos is not None:
        w.add_bos_token_id(int(bos))
    if pad is not None:
        w.add_pad_token_id(int(pad))
    w.add_add_bos_token(bool(tok_cfg.get("add_bos_token", False)))
    if template is not None:
        w.add_chat_template(template)

    rng = np.random.default_rng(SEED)

    def matrix(rows, cols):
        # numpy (rows, cols) = ggml ne (cols, rows): rows outputs of cols inputs.
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    def norm(n):
        return np.ones(n, dtype=np.float32)

    w.add_tensor("token_embd.weight", matrix(vocab_size, N_EMBD))
    w.add_tensor("output_norm.weight", norm(N_EMBD))
    for b in range(N_BLOCKS):
        p = f"blk.{b}."
        w.add_tensor(p + "attn_norm.weight", norm(N_EMBD))
        w.add_tensor(p + "attn_q.weight", matrix(N_HEAD * HEAD_DIM, N_EMBD))
        w.add_tensor(p + "attn_k.weight", matrix(N_HEAD_KV * HEAD_DIM, N_EMBD))
        w.add_tensor(p + "attn_v.weight", matrix(N_HEAD_KV * HEAD_DIM, N_EMBD))
        w.add_tensor(p + "attn_output.weight", matrix(N_EMBD, N_HEAD * HEAD_DIM))
        w.add_tensor(p + "attn_q_norm.weight", norm(HEAD_DIM))
        w.add_tensor(p + "attn_k_norm.weight", norm(HEAD_DIM))
        w.add_tensor(p + "ffn_norm.weight", norm(N_EMBD))
        w.add_tensor(p + "ffn_gate.weight", matrix(N_FF, N_EMBD))
        w.add_tensor(p + "ffn_up.weight", matrix(N_FF, N_EMBD))
        w.add_tensor(p + "ffn_down.weight", matrix(N_EMBD, N_FF))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)
    print(f"{out}: {os.path.getsize(out)} bytes, {len(tokens)} tokens, {len(merges)} merges, eos {eos}")


if __name__ == "__main__":
    main()
