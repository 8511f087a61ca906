use std::collections::{BTreeMap, HashSet};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::kv::hash::SeqHash;
use crate::worker::engines::mocker::test_util::{config, request, NaiveIndex};

const SALT: u64 = 0xabc;

fn sched(page: u32, blocks: u64, budget: u32, seqs: u32) -> Scheduler {
    Scheduler::new(&config(page, blocks, budget, seqs), SALT, MockModel::new((100..1100).collect()))
}

#[derive(Debug, Default, Clone, PartialEq)]
struct Outcome {
    tokens: Vec<TokenId>,
    cached_tokens: u32,
    finish: Option<FinishReason>,
}

/// Steps until idle (bounded), checking the events against the cache after every step.
fn run(s: &mut Scheduler, index: &mut NaiveIndex, outcomes: &mut BTreeMap<SeqId, Outcome>) {
    let mut out = Vec::new();
    for _ in 0..100_000 {
        if s.is_idle() {
            return;
        }
        let plan = s.schedule();
        assert!(!plan.is_empty(), "a non-idle scheduler always makes progress");
        step(s, &plan, index, outcomes, &mut out);
    }
    panic!("did not finish");
}

fn step(
    s: &mut Scheduler,
    plan: &StepPlan,
    index: &mut NaiveIndex,
    outcomes: &mut BTreeMap<SeqId, Outcome>,
    out: &mut Vec<StepOutput>,
) {
    out.clear();
    s.complete(plan, out);
    for o in out.iter() {
        let r = outcomes.entry(o.seq).or_default();
        assert!(r.finish.is_none(), "output after finish");
        r.tokens.extend(o.token);
        r.cached_tokens = o.cached_tokens;
        r.finish = o.finish;
    }
    let mut evs = Vec::new();
    s.cache_mut().drain_events(&mut evs);
    evs.iter().for_each(|e| index.apply(e));
    s.cache().check_invariants();
    assert_eq!(index.cached, s.cache().cached_hashes().collect::<HashSet<SeqHash>>());
}

#[test]
fn rejects_what_can_never_run() {
    let mut s = sched(4, 4, 64, 4);
    assert_eq!(s.add(request(1, vec![], 4)), Err(Rejected::EmptyPrompt));
    assert_eq!(s.add(request(1, vec![1], 0)), Err(Rejected::NothingToGenerate));
    assert!(matches!(s.add(request(1, vec![1; 10], 7)), Err(Rejected::TooLong { capacity: 16, .. })));
    assert!(s.add(request(1, vec![1; 10], 6)).is_ok());
}

#[test]
fn chunked_prefill_spans_steps_within_budget() {
    let mut s = sched(16, 64, 32, 8);
    s.add(request(1, (0..100).collect(), 3)).unwrap();
    let mut out = Vec::new();
    let mut prefills = Vec::new();
    while out.is_empty() {
        let plan = s.schedule();
        prefills.push(plan.work.prefill_tokens);
        s.complete(&plan, &mut out);
    }
    assert_eq!(prefills, vec![32, 32, 32, 4]);
    // A second request's prefill shares the budget with the first one's decode.
    s.add(request(2, (500..600).collect(), 3)).unwrap();
    let plan = s.schedule();
    assert_eq!((plan.work.decode_seqs, plan.work.prefill_tokens), (1, 31));
}

#[test]
fn prefix_reuse_reports_cached_full_blocks() {
    let mut s = sched(16, 64, 256, 8);
    let (mut index, mut outcomes) = (NaiveIndex::default(), BTreeMap::new());
    let a: Vec<u32> = (0..40).collect();
    let first = s.add(request(1, a.clone(), 2)).unwrap();
    run(&mut s, &mut index, &mut outcomes);
    assert_eq!(outcomes[&first].cached_tokens, 0);

    let mut b: Vec<u32> = a[..35].to_vec();
    b.extend([7, 7, 7]);
    let shared = s.add(request(2, b, 2)).unwrap();
    // Same 48-token block-aligned prompt twice: the last block is recomputed for the sample.
    let aligned: Vec<u32> = (1000..1048).collect();
    let c1 = s.add(request(3, aligned.clone(), 2)).unwrap();
    run(&mut s, &mut index, &mut outcomes);
    let c2 = s.add(request(4, aligned, 2)).unwrap();
    run(&mut s, &mut index, &mut outcomes);
    assert_eq!(outcomes[&shared].cached_tokens, 32);
    assert_eq!(outcomes[&c1].cached_tokens, 0);
    assert_eq!(outcomes[&c2].cached_tokens, 32);
    assert_eq!(s.cache().active_blocks(), 0);
}

#[test]
fn memory_pressure_preempts_and_every_request_completes_unchanged() {
    let prompts: Vec<Vec<u32>> = (0..12u32).map(|i| (0..(5 + i * 2)).map(|t| t % 7 + i / 4).collect()).collect();
    let mut results = Vec::new();
    for blocks in [1000, 14] {
        let mut s = sched(4, blocks, 64, 8);
        let (mut index, mut outcomes) = (NaiveIndex::default(), BTreeMap::new());
        for (i, p) in prompts.iter().enumerate() {
            s.add(request(i as u64, p.clone(), 20)).unwrap();
        }
        run(&mut s, &mut index, &mut outcomes);
        assert_eq!(outcomes.len(), prompts.len());
        for o in outcomes.values() {
            assert_eq!((o.tokens.len(), o.finish), (20, Some(FinishReason::Length)));
        }
        results.push((s.preemptions(), outcomes));
    }
    assert_eq!(results[0].0, 0);
    assert!(results[1].0 > 0, "a 14-block cache must preempt");
    let tokens = |r: &BTreeMap<SeqId, Outcome>| r.values().map(|o| o.tokens.clone()).collect::<Vec<_>>();
    assert_eq!(tokens(&results[0].1), tokens(&results[1].1), "preemption does not change outputs");
}

#[test]
fn max_num_seqs_bounds_the_batch() {
    let mut s = sched(4, 1000, 1000, 3);
    for i in 0..10 {
        s.add(request(i, vec![i as u32; 9], 5)).unwrap();
    }
    let mut out = Vec::new();
    while !s.is_idle() {
        let plan = s.schedule();
        assert!(plan.entries.len() <= 3);
        assert!(s.load().running_requests <= 3);
        s.complete(&plan, &mut out);
    }
}

#[test]
fn cancel_frees_blocks_which_stay_cached() {
    let mut s = sched(4, 100, 100, 4);
    let id = s.add(request(1, (0..20).collect(), 50)).unwrap();
    let mut out = Vec::new();
    for _ in 0..5 {
        let plan = s.schedule();
        s.complete(&plan, &mut out);
    }
    assert!(s.cache().active_blocks() > 0);
    assert!(s.cancel(id));
    assert!(!s.cancel(id));
    assert_eq!(s.cache().active_blocks(), 0);
    assert!(s.cache().evictable_blocks() >= 5, "prompt blocks stay cached");
    assert!(s.is_idle());
}

#[test]
fn events_match_cache_under_random_workload_with_cancels_and_resets() {
    let mut rng = SmallRng::seed_from_u64(42);
    let mut s = sched(4, 40, 48, 6);
    let (mut index, mut outcomes) = (NaiveIndex::default(), BTreeMap::new());
    let mut out = Vec::new();
    let mut live: Vec<SeqId> = Vec::new();
    let mut resets = 0;
    for i in 0..3000u64 {
        if rng.random_bool(0.3) && s.sequences() < 16 {
            let root = rng.random_range(0..3u32) * 100;
            let mut p: Vec<u32> = (root..root + rng.random_range(1..20)).collect();
            p.extend((0..rng.random_range(0..6)).map(|_| rng.random_range(0..4u32)));
            let mut r = request(i, p, rng.random_range(1..30));
            r.sampling.ignore_eos = rng.random_bool(0.5);
            live.push(s.add(r).unwrap());
        }
        if rng.random_bool(0.03) && !live.is_empty() {
            s.cancel(live.swap_remove(rng.random_range(0..live.len())));
        }
        // Resets happen between steps, busy or idle (running sequences keep their blocks).
        if rng.random_bool(if s.is_idle() { 0.2 } else { 0.02 }) {
            s.cache_mut().reset();
            resets += 1;
        }
        if !s.is_idle() {
            let plan = s.schedule();
            step(&mut s, &plan, &mut index, &mut outcomes, &mut out);
        }
        live.retain(|id| outcomes.get(id).is_none_or(|o| o.finish.is_none()));
    }
    // Whatever was admitted and not cancelled finishes.
    run(&mut s, &mut index, &mut outcomes);
    assert!(resets > 0 && s.preemptions() > 0, "resets {resets}, preemptions {}", s.preemptions());
}

#[test]
fn an_imported_prompt_is_not_recomputed_and_generates_what_an_aggregated_run_does() {
    let prompt: Vec<TokenId> = (0..40).collect();
    // Aggregated reference.
    let mut agg = sched(16, 64, 256, 8);
    let mut index = NaiveIndex::default();
    let mut outcomes = BTreeMap::new();
    let id = agg.add(request(1, prompt.clone(), 12)).unwrap();
    run(&mut agg, &mut index, &mut outcomes);
    let reference = outcomes[&id].tokens.clone();

    // Disaggregated decode: the first token comes with the import, no step prefills the prompt.
    let mut s = sched(16, 64, 256, 8);
    let mut index = NaiveIndex::default();
    let imported = s.add_imported(request(1, prompt.clone(), 12), 0).unwrap();
    assert_eq!((imported.token, imported.finish), (Some(reference[0]), None));
    let seq = imported.seq.expect("queued");
    let plan = s.schedule();
    assert_eq!(plan.work.prefill_tokens, 0, "the prompt's KV was received: {plan:?}");
    assert_eq!(plan.entries, vec![PlannedSeq { seq, tokens: 1 }]);
    let mut outcomes = BTreeMap::new();
    let mut out = Vec::new();
    step(&mut s, &plan, &mut index, &mut outcomes, &mut out);
    assert_eq!(out[0].computed_tokens, 0);
    // The prompt's two full blocks are now cached (and published) on the decode worker.
    let hashes = BlockHasher::new(16).seq_hashes(&prompt);
    assert!(hashes.iter().all(|h| index.cached.contains(h)), "imported blocks were stored");
    run(&mut s, &mut index, &mut outcomes);
    let mut tokens = vec![reference[0]];
    tokens.extend(&outcomes[&seq].tokens);
    assert_eq!(tokens, reference);

    // max_tokens 1: the imported first token ends the request; nothing is queued.
    let done = s.add_imported(request(2, prompt, 1), 0).unwrap();
    assert_eq!((done.seq, done.finish), (None, Some(FinishReason::Length)));
    assert!(s.is_idle());
}

#[test]
fn an_import_that_skips_cached_blocks_uses_them_and_recomputes_them_if_evicted() {
    let first: Vec<TokenId> = (0..40).collect();
    let mut second = first.clone();
    second.extend(500..530);
    let mut s = sched(16, 64, 256, 8);
    let (mut index, mut outcomes) = (NaiveIndex::default(), BTreeMap::new());
    s.add_imported(request(1, first.clone(), 4), 0).unwrap();
    run(&mut s, &mut index, &mut outcomes);
    // Turn 2 skips turn 1's two full blocks: they are in this cache, nothing is prefilled.
    let seq = s.add_imported(request(2, second.clone(), 4), 32).unwrap().seq.unwrap();
    let plan = s.schedule();
    assert_eq!((plan.work.prefill_tokens, plan.entries.clone()), (0, vec![PlannedSeq { seq, tokens: 1 }]));
    run(&mut s, &mut index, &mut outcomes);

    // A fresh worker never held them: the skipped prefix is recomputed locally.
    let mut cold = sched(16, 64, 256, 8);
    let seq = cold.add_imported(request(3, second.clone(), 4), 32).unwrap().seq.unwrap();
    let plan = cold.schedule();
    assert_eq!(plan.entries, vec![PlannedSeq { seq, tokens: second.len() + 1 }]);
    assert_eq!(plan.work.prefill_tokens, second.len() as u64 + 1);
}

#[test]
fn a_held_sequence_keeps_its_blocks_until_released() {
    let mut s = sched(16, 8, 256, 8);
    let (mut index, mut outcomes) = (NaiveIndex::default(), BTreeMap::new());
    let id = s.add(request(1, (0..40).collect(), 1)).unwrap();
    s.hold_on_finish(id);
    run(&mut s, &mut index, &mut outcomes);
    assert!(s.is_idle() && s.held() == 1);
    assert_eq!(s.cache().held_by(id), 3, "prompt blocks stay referenced while transferred");
    assert_eq!(s.load().active_blocks, 3);
    s.release(id);
    assert_eq!((s.held(), s.cache().held_by(id), s.load().active_blocks), (0, 0, 0));
    // Still cached (evictable): the next identical prompt hits.
    let again = s.add(request(2, (0..40).collect(), 1)).unwrap();
    run(&mut s, &mut index, &mut outcomes);
    assert_eq!(outcomes[&again].cached_tokens, 32);
}
