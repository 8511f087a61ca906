//! The worker task end to end, on the real runtime clock (no `test-util`): large speed-ups for
//! behaviour, speed-up 1 and generous tolerances where timing itself is checked.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};

use crate::contract::events::KvEventKind;
use crate::contract::{FinishReason, GenerateRequest, TokenId, WorkerId, WorkerOutput};
use crate::planes::events::{self, EventSubscriber, InProcessSubscriber};
use crate::planes::request::{WorkItem, RESPONSE_STREAM_DEPTH};
use crate::worker::engines::mocker::test_util::{config, request, NaiveIndex};
use crate::worker::engines::mocker::timing::{self, StepWork};
use crate::worker::engines::mocker::MockerConfig;
use crate::worker::{spawn, EventRing, Mocker, WorkerHandle};

const EOS: TokenId = 2;
const LIMIT: Duration = Duration::from_secs(20);

struct Harness {
    worker: WorkerHandle,
    inbox: mpsc::Sender<WorkItem>,
    events: InProcessSubscriber,
}

fn start(config: MockerConfig) -> Harness {
    let (tx, rx) = mpsc::channel(64);
    let (publisher, events) = events::in_process();
    // The corpus contains the eos id, which must never be emitted.
    let corpus: Arc<[TokenId]> = (0..500).collect();
    let worker = spawn(WorkerId(7), Mocker::new(WorkerId(7), config, corpus), rx, publisher, EventRing::default());
    Harness { worker, inbox: tx, events }
}

async fn send(h: &Harness, r: GenerateRequest, depth: usize) -> mpsc::Receiver<WorkerOutput> {
    let (reply, rx) = mpsc::channel(depth);
    h.inbox.send(WorkItem { request: r, reply }).await.unwrap();
    rx
}

#[derive(Debug, PartialEq)]
struct Done {
    cached_tokens: u32,
    tokens: Vec<TokenId>,
    finish: FinishReason,
}

/// Reads a whole stream, checking its shape: Started, Tokens..., Finished.
async fn collect(mut rx: mpsc::Receiver<WorkerOutput>) -> Done {
    let read = async {
        let Some(WorkerOutput::Started { cached_tokens, .. }) = rx.recv().await else { panic!("no Started") };
        let mut tokens = Vec::new();
        loop {
            match rx.recv().await {
                Some(WorkerOutput::Tokens(t)) => tokens.extend(t),
                Some(WorkerOutput::Finished { reason }) => {
                    assert!(rx.recv().await.is_none(), "Finished is last");
                    return Done { cached_tokens, tokens, finish: reason };
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    };
    timeout(LIMIT, read).await.expect("stream finished in time")
}

#[tokio::test]
async fn second_request_reuses_the_cached_prefix() {
    let h = start(config(16, 1000, 8192, 64));
    let a: Vec<u32> = (1000..1040).collect();
    assert_eq!(collect(send(&h, request(1, a.clone(), 4), 8).await).await.cached_tokens, 0);
    let mut b = a[..35].to_vec();
    b.extend([9, 9, 9, 9]);
    assert_eq!(collect(send(&h, request(2, b, 4), 8).await).await.cached_tokens, 32);
}

#[tokio::test]
async fn outputs_are_deterministic_and_lengths_honoured() {
    let h = start(config(16, 1000, 8192, 64));
    let prompt: Vec<u32> = (10..60).collect();
    let exact = request(1, prompt.clone(), 300);
    let one = collect(send(&h, exact.clone(), 8).await).await;
    let two = collect(send(&h, exact, 8).await).await;
    assert_eq!((one.tokens.len(), one.finish), (300, FinishReason::Length));
    assert_eq!(one.tokens, two.tokens);
    assert!(!one.tokens.contains(&EOS));

    let mut natural = request(3, prompt, 10_000);
    natural.sampling.ignore_eos = false;
    let d = collect(send(&h, natural, RESPONSE_STREAM_DEPTH).await).await;
    assert_eq!(d.finish, FinishReason::Eos);
    assert!((8..=512).contains(&d.tokens.len()), "{}", d.tokens.len());

    let zero = collect(send(&h, request(4, vec![1], 0), 8).await).await;
    assert_eq!((zero.tokens.len(), zero.finish), (0, FinishReason::Length));
}

#[tokio::test]
async fn refused_requests_get_an_error() {
    let h = start(config(4, 4, 64, 4));
    let mut rx = send(&h, request(1, vec![1; 100], 4), 8).await;
    let msg = timeout(LIMIT, rx.recv()).await.unwrap();
    assert!(
        matches!(msg, Some(WorkerOutput::Error(e)) if e.message.contains("--num-gpu-blocks") && e.fault == crate::contract::Fault::Client)
    );
}

#[tokio::test]
async fn dropping_the_stream_cancels_and_frees_blocks() {
    let mut h = start(MockerConfig { speedup_ratio: 50.0, ..config(16, 1000, 8192, 64) });
    let mut rx = send(&h, request(1, (0..100).collect(), 5000), 8).await;
    for _ in 0..3 {
        timeout(LIMIT, rx.recv()).await.unwrap().unwrap();
    }
    assert!(h.worker.load.borrow().active_blocks > 0);
    drop(rx);
    let idle = h.worker.load.wait_for(|l| l.active_blocks == 0 && l.running_requests == 0);
    timeout(LIMIT, idle).await.unwrap().unwrap();
}

#[tokio::test]
async fn under_memory_pressure_every_request_completes() {
    let h = start(config(4, 16, 64, 8));
    let mut streams = Vec::new();
    for i in 0..10u64 {
        let prompt: Vec<u32> = (0..20).map(|t| (t + i as u32 * 3) % 11).collect();
        streams.push(send(&h, request(i, prompt, 30), 4).await);
    }
    for rx in streams {
        let d = collect(rx).await;
        assert_eq!((d.tokens.len(), d.finish), (30, FinishReason::Length));
    }
}

#[tokio::test]
async fn a_slow_client_gets_everything_in_order() {
    let h = start(config(16, 1000, 8192, 64));
    let fast = collect(send(&h, request(1, vec![5; 20], 100), RESPONSE_STREAM_DEPTH).await).await;
    let rx = send(&h, request(1, vec![5; 20], 100), 1).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(collect(rx).await.tokens, fast.tokens);
}

#[tokio::test]
async fn events_are_contiguous_and_consistent() {
    let mut h = start(config(4, 24, 64, 8));
    let mut streams = Vec::new();
    for i in 0..12u64 {
        let prompt: Vec<u32> = (0..(8 + i as u32 * 2)).map(|t| t % 5 + (i % 3) as u32).collect();
        streams.push(send(&h, request(i, prompt, 12), 4).await);
    }
    for rx in streams {
        collect(rx).await;
    }
    drop(h.inbox);
    timeout(LIMIT, h.worker.join()).await.expect("worker ends once its inbox is closed");
    let (mut index, mut next_id, mut removed) = (NaiveIndex::default(), 1, 0);
    while let Some(batch) = h.events.next_batch().await {
        for e in batch {
            assert_eq!((e.worker, e.event_id), (WorkerId(7), next_id));
            assert!(e.timestamp_us > 0);
            next_id += 1;
            if let KvEventKind::Stored { blocks, .. } = &e.kind {
                assert!(blocks.iter().all(|b| b.engine_hash.0 != b.seq_hash.0));
            }
            if let KvEventKind::Removed { engine_hashes } = &e.kind {
                removed += engine_hashes.len();
            }
            index.apply(&e.kind);
        }
    }
    assert!(removed > 0, "a 24-block cache must evict");
    assert!(index.cached.len() <= 24);
}

#[tokio::test]
async fn stop_drains_in_flight_requests() {
    let h = start(config(16, 1000, 8192, 64));
    let rx = send(&h, request(1, vec![3; 40], 50), RESPONSE_STREAM_DEPTH).await;
    let stopping = tokio::spawn(h.worker.stop());
    assert_eq!(collect(rx).await.tokens.len(), 50);
    timeout(LIMIT, stopping).await.unwrap().unwrap();
    let (reply, _rx) = mpsc::channel(1);
    assert!(h.inbox.send(WorkItem { request: request(2, vec![1], 1), reply }).await.is_err());
}

/// Time to the first output, measured from the send.
async fn ttft(h: &Harness, r: GenerateRequest) -> (Duration, u32) {
    let t0 = Instant::now();
    let mut rx = send(h, r, RESPONSE_STREAM_DEPTH).await;
    let Some(WorkerOutput::Started { cached_tokens, .. }) = timeout(LIMIT, rx.recv()).await.unwrap() else { panic!() };
    let took = t0.elapsed();
    collect_rest(rx).await;
    (took, cached_tokens)
}

async fn collect_rest(mut rx: mpsc::Receiver<WorkerOutput>) {
    while timeout(LIMIT, rx.recv()).await.unwrap().is_some() {}
}

#[tokio::test]
async fn a_cached_prefix_shortens_time_to_first_token() {
    let (page, prompt_len) = (16u32, 4096u32);
    let h = start(MockerConfig { speedup_ratio: 1.0, ..config(page, 2000, 8192, 64) });
    let prompt: Vec<u32> = (0..prompt_len).map(|t| t % 1000).collect();
    let (cold, c0) = ttft(&h, request(1, prompt.clone(), 1)).await;
    let (warm, c1) = ttft(&h, request(2, prompt, 1)).await;
    // The cold step prefills the whole prompt; the warm one only the last block.
    assert_eq!((c0, c1), (0, prompt_len - page));
    let ms = |t: u64| timing::step_duration(&StepWork { prefill_tokens: t, ..Default::default() }, 1.0);
    let (want_cold, want_warm) = (ms(prompt_len as u64), ms(page as u64));
    for (got, want) in [(cold, want_cold), (warm, want_warm)] {
        assert!(got >= want, "{got:?} < modeled {want:?}");
        assert!(got < want * 2 + Duration::from_millis(60), "{got:?} far above modeled {want:?}");
    }
    assert!(warm < cold, "warm {warm:?} vs cold {cold:?}");
}
