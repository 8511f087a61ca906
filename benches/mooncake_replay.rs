//! Replays the Mooncake FAST'25 conversation trace into the KV index, the way the anchors' own
//! trace benchmarks (Dynamo's `mooncake_bench`) do it, so the figures compare:
//!
//! - each hash id is one 512-token block whose tokens are the id repeated; a prompt is cut to
//!   `input_length` and only full blocks are hashed (`BlockHasher::new(512)`);
//! - requests go at random (seed 42) to 256 simulated workers, and the whole set is replicated
//!   4 times under new worker ids (1,024 workers; each block then has at least 4 holders);
//! - each worker's simulated engine stores what it serves (`Stored` with parents, new blocks
//!   only) and, when `--capacity N` blocks is set, evicts least-recently-used blocks leaf first
//!   (`Removed`). Events are generated before any clock starts.
//!
//! Measured, one step per (request, replica) in trace order: the reader thread looks the prompt
//! up ([`KvIndex::find_matches`]), the writer thread applies that worker's events. Both run flat
//! out on the two cores, kept within [`WINDOW_STEPS`] of each other (a router looks a prompt up
//! before its blocks are stored, and never far behind). Block ops = prompt blocks looked up +
//! blocks stored (a removal is an op of 0 blocks, as in the anchors); the clock stops when both
//! threads are done, so every counted event was applied. Light load: one lookup every
//! `--light-gap-us`, each step's events applied between lookups. Memory: the index alone,
//! estimated ([`KvIndexWriter::memory_bytes`]) and measured by a counting allocator.
//! `--partitions N` also runs [`ShardedIndex`] with one writer thread per partition.
//!
//! Run: `cargo bench --bench mooncake_replay [-- --capacity N --runs N --partitions N]`.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicUsize, Ordering::*};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;
use kvgate::contract::events::{EngineHash, KvEvent, KvEventKind, StoredBlock};
use kvgate::contract::WorkerId;
use kvgate::kv::hash::{BlockHasher, SeqHash};
use kvgate::kv::index::{KvIndex, KvIndexWriter, ShardedIndex};
use rand::{rngs::StdRng, Rng, SeedableRng};

const TRACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/mooncake/conversation_trace.jsonl");
const BLOCK_TOKENS: usize = 512;
const WORKERS: usize = 256;
const REPLICAS: usize = 4;
const SEED: u64 = 42;
/// How far (in steps) the reader and the writers may run ahead of each other.
const WINDOW_STEPS: usize = 64;

// ---- a counting allocator (on only while measuring memory) ----

struct Counting;
static COUNTING: AtomicBool = AtomicBool::new(false);
static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded unchanged to mimalloc's allocator, which upholds the
// GlobalAlloc contract; the counting beside it touches only atomics and never allocates.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        if COUNTING.load(Relaxed) {
            LIVE_BYTES.fetch_add(l.size() as isize, Relaxed);
        }
        // SAFETY: the caller's guarantees for `alloc` are passed on unchanged.
        unsafe { mimalloc::MiMalloc.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        if COUNTING.load(Relaxed) {
            LIVE_BYTES.fetch_sub(l.size() as isize, Relaxed);
        }
        // SAFETY: `p` came from this allocator, which is mimalloc's, with layout `l`.
        unsafe { mimalloc::MiMalloc.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, new: usize) -> *mut u8 {
        if COUNTING.load(Relaxed) {
            LIVE_BYTES.fetch_add(new as isize - l.size() as isize, Relaxed);
        }
        // SAFETY: as for `dealloc`; `new` is the caller's valid new size.
        unsafe { mimalloc::MiMalloc.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

// ---- the workload ----

#[derive(serde::Deserialize)]
struct Request {
    input_length: usize,
    hash_ids: Vec<u64>,
}

struct Args {
    capacity: usize,
    runs: usize,
    partitions: usize,
    light_gap_us: u64,
    /// Only apply the events with one writer this many times (for a profiler), then exit.
    writer_only: usize,
}

fn args() -> Args {
    let mut a = Args { capacity: 0, runs: 5, partitions: 2, light_gap_us: 50, writer_only: 0 };
    let argv: Vec<String> = std::env::args().collect();
    for pair in argv.windows(2) {
        let v = || pair[1].parse::<usize>().expect("a number");
        match pair[0].as_str() {
            "--capacity" => a.capacity = v(),
            "--runs" => a.runs = v().max(1),
            "--partitions" => a.partitions = v(),
            "--light-gap-us" => a.light_gap_us = v() as u64,
            "--writer-only" => a.writer_only = v(),
            _ => {}
        }
    }
    a
}

/// One simulated engine's prefix cache: LRU by use tick, evicted leaf first.
struct Engine {
    salt: u64,
    capacity: usize,
    tick: u64,
    last_use: std::collections::HashMap<SeqHash, u64>,
    by_tick: std::collections::BTreeMap<u64, SeqHash>,
}

impl Engine {
    fn touch(&mut self, s: SeqHash) {
        self.tick += 1;
        if let Some(old) = self.last_use.insert(s, self.tick) {
            self.by_tick.remove(&old);
        }
        self.by_tick.insert(self.tick, s);
    }

    /// Serves a prompt: the events its engine publishes (evictions, then stores).
    fn serve(&mut self, seq: &[SeqHash]) -> Vec<KvEventKind> {
        let salt = self.salt;
        let eh = move |s: SeqHash| EngineHash(s.0 ^ salt);
        let (held, missing): (Vec<SeqHash>, Vec<SeqHash>) = seq.iter().partition(|s| self.last_use.contains_key(s));
        // Held blocks of this prompt become most recent, the first block last (leaf first out).
        held.iter().rev().for_each(|&s| self.touch(s));
        let missing_n = missing.len();
        let mut events = Vec::new();
        if self.capacity > 0 && self.last_use.len() + missing_n > self.capacity {
            let n = self.last_use.len() + missing_n - self.capacity;
            let evicted: Vec<SeqHash> = (0..n).filter_map(|_| self.by_tick.pop_first()).map(|(_, s)| s).collect();
            evicted.iter().for_each(|s| {
                self.last_use.remove(s);
            });
            let engine_hashes = evicted.iter().map(|&s| eh(s)).collect();
            events.push(KvEventKind::Removed { engine_hashes });
        }
        // New blocks, as runs of consecutive missing blocks, each with its parent.
        let mut run: Option<(Option<SeqHash>, Vec<StoredBlock>)> = None;
        for (j, &s) in seq.iter().enumerate() {
            if self.last_use.contains_key(&s) {
                events.extend(run.take().map(|(parent, blocks)| KvEventKind::Stored { parent, blocks }));
                continue;
            }
            let parent = j.checked_sub(1).map(|p| seq[p]);
            let r = run.get_or_insert_with(|| (parent, Vec::new()));
            r.1.push(StoredBlock { seq_hash: s, engine_hash: eh(s) });
        }
        events.extend(run.map(|(parent, blocks)| KvEventKind::Stored { parent, blocks }));
        missing.iter().rev().for_each(|&s| self.touch(s));
        events
    }
}

/// The pre-generated replay: one step per (request, replica).
struct Workload {
    /// Per step, the prompt's sequence hashes.
    prompts: Vec<std::sync::Arc<[SeqHash]>>,
    /// All events in step order, and `step_end[k]` = events in steps `0..=k`.
    events: Vec<KvEvent>,
    step_end: Vec<usize>,
    lookup_blocks: usize,
    stored_blocks: usize,
    removed_blocks: usize,
}

fn workload(reqs: &[Request], capacity: usize) -> Workload {
    let hasher = BlockHasher::new(BLOCK_TOKENS);
    let mut rng = StdRng::seed_from_u64(SEED);
    let longest = reqs.iter().map(|r| r.input_length / BLOCK_TOKENS).max().unwrap_or(0);
    let capacity = if capacity > 0 { capacity.max(longest) } else { 0 };
    let mut engines: Vec<Engine> = (0..WORKERS as u64)
        .map(|w| Engine {
            salt: w.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            capacity,
            tick: 0,
            last_use: Default::default(),
            by_tick: Default::default(),
        })
        .collect();
    let mut next_id = vec![0u64; WORKERS * REPLICAS];
    let mut w = Workload {
        prompts: Vec::new(),
        events: Vec::new(),
        step_end: Vec::new(),
        lookup_blocks: 0,
        stored_blocks: 0,
        removed_blocks: 0,
    };
    for r in reqs {
        let tokens: Vec<u32> = r
            .hash_ids
            .iter()
            .flat_map(|&id| std::iter::repeat_n(id as u32, BLOCK_TOKENS))
            .take(r.input_length)
            .collect();
        let seq: std::sync::Arc<[SeqHash]> = hasher.seq_hashes(&tokens).into();
        let base = rng.random_range(0..WORKERS);
        let kinds = engines[base].serve(&seq);
        for replica in 0..REPLICAS {
            let worker = base + replica * WORKERS;
            w.prompts.push(seq.clone());
            w.lookup_blocks += seq.len();
            for kind in &kinds {
                match kind {
                    KvEventKind::Stored { blocks, .. } => w.stored_blocks += blocks.len(),
                    KvEventKind::Removed { engine_hashes } => w.removed_blocks += engine_hashes.len(),
                    KvEventKind::Cleared => {}
                }
                next_id[worker] += 1;
                let (worker, event_id) = (WorkerId(worker as u64), next_id[worker]);
                w.events.push(KvEvent { worker, event_id, timestamp_us: 0, kind: kind.clone() });
            }
            w.step_end.push(w.events.len());
        }
    }
    w
}

// ---- measurement ----

struct Run {
    elapsed: Duration,
    latencies_ns: Vec<u64>,
    /// Time the reader and the writers spent waiting for each other (the window).
    reader_wait: Duration,
    writer_wait: Duration,
}

/// Waits for `cond`, returning how long that took (zero without a clock read if already true).
fn wait_until(cond: impl Fn() -> bool) -> Duration {
    if cond() {
        return Duration::ZERO;
    }
    let start = Instant::now();
    let mut spins = 0u32;
    while !cond() {
        spins += 1;
        if spins < 128 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    start.elapsed()
}

/// One saturated replay: a reader thread and one writer thread per event stream (a stream per
/// partition; every stream has one part per event, so `step_end` indexes all of them).
fn saturate(
    w: &Workload,
    lookup: &(dyn Fn(&[SeqHash]) + Sync),
    writers: Vec<(KvIndexWriter, Vec<KvEvent>)>,
) -> (Run, Vec<KvIndexWriter>) {
    let steps = w.prompts.len();
    let read_done = CachePadded::new(AtomicUsize::new(0));
    let write_done: Vec<CachePadded<AtomicUsize>> =
        writers.iter().map(|_| CachePadded::new(AtomicUsize::new(0))).collect();
    let barrier = Barrier::new(writers.len() + 1);
    let (read_done, write_done, barrier) = (&read_done, &write_done, &barrier);
    std::thread::scope(|scope| {
        let handles: Vec<_> = writers
            .into_iter()
            .enumerate()
            .map(|(i, (mut writer, events))| {
                scope.spawn(move || {
                    barrier.wait();
                    let (mut from, mut waited) = (0, Duration::ZERO);
                    for k in 0..steps {
                        if k > WINDOW_STEPS {
                            waited += wait_until(|| read_done.load(Acquire) >= k - WINDOW_STEPS);
                        }
                        for e in &events[from..w.step_end[k]] {
                            writer.apply(e).expect("events in order");
                        }
                        from = w.step_end[k];
                        write_done[i].store(k + 1, Release);
                    }
                    (writer, Instant::now(), waited)
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let mut latencies_ns = Vec::with_capacity(steps);
        let mut reader_wait = Duration::ZERO;
        for (k, prompt) in w.prompts.iter().enumerate() {
            if k > WINDOW_STEPS {
                reader_wait += wait_until(|| write_done.iter().all(|d| d.load(Acquire) >= k - WINDOW_STEPS));
            }
            let t = Instant::now();
            lookup(black_box(prompt));
            latencies_ns.push(t.elapsed().as_nanos() as u64);
            read_done.store(k + 1, Release);
        }
        let mut end = Instant::now();
        let (mut done, mut writer_wait) = (Vec::new(), Duration::ZERO);
        for h in handles {
            let (writer, t, waited) = h.join().expect("writer panicked");
            end = end.max(t);
            writer_wait = writer_wait.max(waited);
            done.push(writer);
        }
        (Run { elapsed: end - start, latencies_ns, reader_wait, writer_wait }, done)
    })
}

/// Light load: one lookup every `gap`, that step's events applied right after it.
fn light(w: &Workload, gap: Duration) -> Vec<u64> {
    let (index, mut writer) = KvIndex::new();
    let read_done = CachePadded::new(AtomicUsize::new(0));
    let write_done = CachePadded::new(AtomicUsize::new(0));
    let steps = w.prompts.len();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut from = 0;
            for k in 0..steps {
                let _ = wait_until(|| read_done.load(Acquire) > k);
                w.events[from..w.step_end[k]].iter().for_each(|e| writer.apply(e).expect("in order"));
                from = w.step_end[k];
                write_done.store(k + 1, Release);
            }
        });
        let start = Instant::now();
        let mut latencies_ns = Vec::with_capacity(steps);
        for (k, prompt) in w.prompts.iter().enumerate() {
            let _ = wait_until(|| write_done.load(Acquire) >= k);
            let tick = start + gap * k as u32;
            while Instant::now() < tick {
                std::hint::spin_loop();
            }
            let t = Instant::now();
            black_box(index.find_matches(black_box(prompt)));
            latencies_ns.push(t.elapsed().as_nanos() as u64);
            read_done.store(k + 1, Release);
        }
        latencies_ns
    })
}

fn percentiles(mut ns: Vec<u64>) -> String {
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
    format!("p50 {:.2} µs, p99 {:.2} µs, p99.9 {:.2} µs, max {:.1} µs", at(0.5), at(0.99), at(0.999), at(1.0))
}

fn block_ops(w: &Workload) -> usize {
    w.lookup_blocks + w.stored_blocks
}

fn report(label: &str, w: &Workload, mut runs: Vec<Run>) {
    for (i, r) in runs.iter().enumerate() {
        let rate = block_ops(w) as f64 / r.elapsed.as_secs_f64();
        let lookups: u64 = r.latencies_ns.iter().sum();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!("  {label} run {i}: {:.1} ms, {:.2} M block ops/s (reader: {:.1} ms in lookups, {:.1} ms waiting; writer waiting {:.1} ms)",
            ms(r.elapsed), rate / 1e6, lookups as f64 / 1e6, ms(r.reader_wait), ms(r.writer_wait));
    }
    runs.sort_by_key(|r| r.elapsed);
    let median = runs.swap_remove(runs.len() / 2);
    let secs = median.elapsed.as_secs_f64();
    println!(
        "{label}: median {:.2} M block ops/s ({:.2} M lookup blocks/s + {:.2} M stored blocks/s), {:.0} events/s",
        block_ops(w) as f64 / secs / 1e6,
        w.lookup_blocks as f64 / secs / 1e6,
        w.stored_blocks as f64 / secs / 1e6,
        w.events.len() as f64 / secs
    );
    println!("{label}: lookup latency at saturation (median run): {}", percentiles(median.latencies_ns));
}

/// Applies every event on this thread alone, returning the elapsed time.
fn writers_alone(streams: Vec<(KvIndexWriter, Vec<KvEvent>)>) -> Duration {
    let start = Instant::now();
    std::thread::scope(|scope| {
        for (mut writer, events) in streams {
            scope.spawn(move || events.iter().for_each(|e| writer.apply(e).expect("in order")));
        }
    });
    start.elapsed()
}

fn sharded_streams(w: &Workload, n: usize) -> (std::sync::Arc<ShardedIndex>, Vec<(KvIndexWriter, Vec<KvEvent>)>) {
    let (index, writers) = ShardedIndex::new(n);
    let mut streams: Vec<Vec<KvEvent>> = vec![Vec::with_capacity(w.events.len()); n];
    for e in &w.events {
        for (p, part) in index.split(e).into_iter().enumerate() {
            streams[p].push(part);
        }
    }
    (index, writers.into_iter().zip(streams).collect())
}

fn main() {
    let a = args();
    let Ok(text) = std::fs::read_to_string(TRACE) else {
        println!("mooncake_replay: skipping, {TRACE} not present");
        return;
    };
    let reqs: Vec<Request> = text.lines().map(|l| serde_json::from_str(l).expect("a trace line")).collect();
    let t = Instant::now();
    let w = workload(&reqs, a.capacity);
    let cap =
        if a.capacity > 0 { format!("{} blocks per worker", a.capacity) } else { "unbounded (no eviction)".into() };
    println!(
        "mooncake_replay: {} requests → {} steps ({} workers × {} replicas), capacity {cap}; generated in {:.1} s",
        reqs.len(),
        w.prompts.len(),
        WORKERS,
        REPLICAS,
        t.elapsed().as_secs_f64()
    );
    println!(
        "workload: {} lookup blocks + {} stored blocks = {} block ops; {} events ({} removed blocks)",
        w.lookup_blocks,
        w.stored_blocks,
        block_ops(&w),
        w.events.len(),
        w.removed_blocks
    );

    if a.writer_only > 0 {
        for _ in 0..a.writer_only {
            let (_, writer) = KvIndex::new();
            let t = writers_alone(vec![(writer, w.events.clone())]);
            println!("single writer alone: {:.1} ms", t.as_secs_f64() * 1e3);
        }
        return;
    }

    // Memory of the index alone: estimate vs a counting allocator, one thread.
    let before = LIVE_BYTES.load(Relaxed);
    COUNTING.store(true, SeqCst);
    let (index, mut writer) = KvIndex::new();
    w.events.iter().for_each(|e| writer.apply(e).expect("in order"));
    let measured = LIVE_BYTES.load(Relaxed) - before;
    COUNTING.store(false, SeqCst);
    let pairs = index.num_entries();
    let (est, read) = (writer.memory_bytes(), index.memory_bytes());
    println!("index: {} blocks, {} block-holder pairs; memory estimate {:.1} MiB ({:.1} B/pair; read side {:.1} B/pair), allocator-measured {:.1} MiB ({:.1} B/pair)",
        index.num_blocks(), pairs, est as f64 / 1048576.0, est as f64 / pairs as f64, read as f64 / pairs as f64,
        measured as f64 / 1048576.0, measured as f64 / pairs as f64);
    drop((index, writer));

    let single = || {
        let (index, writer) = KvIndex::new();
        let lookup = move |p: &[SeqHash]| drop(black_box(index.find_matches(p)));
        (lookup, vec![(writer, w.events.clone())])
    };
    let alone = writers_alone(single().1);
    println!(
        "single writer alone: {:.1} ms, {:.2} M stored blocks/s",
        alone.as_secs_f64() * 1e3,
        w.stored_blocks as f64 / alone.as_secs_f64() / 1e6
    );
    let runs = (0..a.runs)
        .map(|_| {
            let (lookup, writers) = single();
            saturate(&w, &lookup, writers).0
        })
        .collect();
    report("single writer + reader", &w, runs);

    if a.partitions > 1 {
        let n = a.partitions;
        let alone = writers_alone(sharded_streams(&w, n).1);
        println!(
            "{n} partition writers alone: {:.1} ms, {:.2} M stored blocks/s",
            alone.as_secs_f64() * 1e3,
            w.stored_blocks as f64 / alone.as_secs_f64() / 1e6
        );
        let runs = (0..a.runs)
            .map(|_| {
                let (index, streams) = sharded_streams(&w, n);
                let lookup = move |p: &[SeqHash]| drop(black_box(index.find_matches(p)));
                saturate(&w, &lookup, streams).0
            })
            .collect();
        report(&format!("{n} partitions ({n} writers) + reader"), &w, runs);
    }

    let gap = Duration::from_micros(a.light_gap_us);
    println!("light load (one lookup every {} µs): {}", a.light_gap_us, percentiles(light(&w, gap)));
}
