//! The per-token cost of output parsing (`--reasoning-parser`, `--tool-call-parser`): text
//! deltas of a plain answer pushed through no parser (what a request without one does: the
//! generation appends the delta to its output), a reasoning parser, and a reasoning plus a
//! tool-call parser. A request that needs no parser gets none (`OutputParser::new` is `None`),
//! so its per-token path is the first case.
//!
//! `cargo bench --bench output_parsers`

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use kvgate::openai::parse::{OutputParser, ParseEvent, ParserSpec, PromptEnd, ReasoningKind, ToolCallKind};

/// Word-sized deltas of a plain answer, as the incremental detokenizer yields them.
fn deltas() -> Vec<String> {
    let words = ["The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ",", " and"];
    (0..1024).map(|i| words[i % words.len()].to_string()).collect()
}

fn spec(reasoning: bool, tools: bool) -> ParserSpec {
    ParserSpec {
        reasoning: reasoning.then_some(ReasoningKind::Qwen3),
        tool_call: tools.then_some(ToolCallKind::Hermes),
        prompt_end: PromptEnd::Other,
        prefill: String::new(),
        id_seed: 1,
    }
}

fn bench(c: &mut Criterion) {
    let deltas = deltas();
    let mut g = c.benchmark_group("per_token");
    g.throughput(Throughput::Elements(deltas.len() as u64));
    g.bench_function("no_parser", |b| {
        b.iter(|| {
            let mut out = String::new();
            for d in &deltas {
                out.push_str(black_box(d));
            }
            out
        })
    });
    for (name, reasoning, tools) in [("qwen3", true, false), ("qwen3_hermes", true, true)] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut p = OutputParser::new(spec(reasoning, tools)).expect("a parser");
                let mut events: Vec<ParseEvent> = Vec::new();
                let mut content = 0usize;
                for d in &deltas {
                    events.clear();
                    p.push(black_box(d), 1, &mut events);
                    content += events.len();
                }
                p.finish(&mut events);
                content
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
