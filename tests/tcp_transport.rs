//! The TCP request plane end to end on 127.0.0.1 port 0: a real mocker worker behind
//! `serve_worker`, and `TcpRequestPlane` clients on a tokio runtime and on a monoio shard.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvgate::contract::control::{RecoveryError, RecoverySource};
use kvgate::contract::frame::{self, Frame, StreamId};
use kvgate::contract::{FinishReason, GenerateRequest, LoadReport, SamplingParams, Target, WorkerId, WorkerOutput};
use kvgate::planes::request::tcp::{serve_worker, TcpRequestPlane, CONNECT_TIMEOUT};
use kvgate::planes::request::{RequestPlane, ResponseStream, TransportError, WORKER_QUEUE_DEPTH};
use kvgate::worker::{spawn, EventRing, Mocker, MockerArgs, MockerConfig, Recovery, WorkerHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// The mock model cycles through this corpus, so every stream's tokens count up by one.
const CORPUS: u32 = 1000;
/// Long enough that a stream is still running when a test cancels it or kills its worker.
const LONG: u32 = 200_000;
const PATIENCE: Duration = Duration::from_secs(20);
/// What "promptly" means for a cancel or a broken connection (a `LONG` stream runs for many
/// seconds, so finishing by itself does not pass for either).
const PROMPTLY: Duration = Duration::from_secs(2);

struct Worker {
    id: WorkerId,
    addr: SocketAddr,
    handle: WorkerHandle,
    server: JoinHandle<()>,
    shutdown: watch::Sender<bool>,
}

async fn start_worker(id: u64) -> Worker {
    let id = WorkerId(id);
    let (inbox, rx) = mpsc::channel(WORKER_QUEUE_DEPTH);
    let (publisher, mut events) = kvgate::planes::events::in_process();
    tokio::spawn(
        async move { while kvgate::planes::events::EventSubscriber::next_batch(&mut events).await.is_some() {} },
    );
    let args = MockerArgs { speedup_ratio: 200.0, ..MockerArgs::default() };
    let config = MockerConfig::from_args(&args, 16).unwrap();
    let handle = spawn(id, Mocker::new(id, config, (0..CORPUS).collect()), rx, publisher, EventRing::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (shutdown, signal) = watch::channel(false);
    let server = tokio::spawn(serve_worker(listener, inbox, handle.control(), signal));
    Worker { id, addr, handle, server, shutdown }
}

impl Worker {
    /// Where a frontend sends this worker's requests (as its worker snapshot would say).
    fn to(&self) -> Target {
        Target { worker: self.id, endpoint: Some(self.addr) }
    }
}

/// A frontend's plane; the workers' addresses come with each call.
fn plane_for(_workers: &[(WorkerId, SocketAddr)]) -> TcpRequestPlane {
    TcpRequestPlane::new()
}

fn request(i: u64, max_tokens: u32) -> GenerateRequest {
    let sampling = SamplingParams { max_tokens, ignore_eos: true, seed: Some(i), ..SamplingParams::default() };
    let token_ids = (0..64).map(|t| (i as u32) * 1000 + t).collect();
    GenerateRequest { request_id: i, token_ids, sampling, eos_token_ids: vec![], disagg: None, trace: None }
}

/// Every output of a stream, up to and including its last.
async fn collect(mut s: ResponseStream) -> Vec<WorkerOutput> {
    let mut out = Vec::new();
    while let Some(o) = s.recv().await {
        let last = matches!(o, WorkerOutput::Finished { .. } | WorkerOutput::Error(_));
        out.push(o);
        if last {
            break;
        }
    }
    out
}

/// A complete stream: `Started`, `n` tokens counting up, `Finished { Length }`.
fn assert_complete(outputs: &[WorkerOutput], n: u32) {
    assert!(matches!(outputs.first(), Some(WorkerOutput::Started { .. })), "{outputs:?}");
    assert_eq!(outputs.last(), Some(&WorkerOutput::Finished { reason: FinishReason::Length }));
    let tokens: Vec<u32> = outputs
        .iter()
        .filter_map(|o| match o {
            WorkerOutput::Tokens(t) => Some(t.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(tokens.len(), n as usize);
    for w in tokens.windows(2) {
        assert_eq!(w[1], (w[0] + 1) % CORPUS, "tokens out of order");
    }
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    within_time(PATIENCE, what, f).await
}

async fn within_time<T>(limit: Duration, what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, f).await.unwrap_or_else(|_| panic!("{what} took over {limit:?}"))
}

async fn idle(load: &mut watch::Receiver<LoadReport>) {
    within_time(
        PROMPTLY,
        "the worker to go idle",
        load.wait_for(|l| l.running_requests == 0 && l.waiting_requests == 0 && l.active_blocks == 0),
    )
    .await
    .unwrap();
}

/// Control-plane (tokio, multi-thread) callers need `Send` futures from both seams.
#[allow(dead_code)]
fn futures_are_send(plane: &TcpRequestPlane) {
    fn send<T: Send>(_: T) {}
    send(plane.generate(Target::in_process(WorkerId(1)), request(0, 1)));
    send(plane.recover(Target::in_process(WorkerId(1)), 0));
}

#[tokio::test]
async fn concurrent_streams_arrive_whole_and_in_order_on_tokio() {
    let w = start_worker(1).await;
    let plane = plane_for(&[(w.id, w.addr)]);
    let mut streams = Vec::new();
    for i in 0..64 {
        streams.push(plane.generate(w.to(), request(i, 40 + i as u32)).await.unwrap());
    }
    let all = within("64 streams", futures::future::join_all(streams.into_iter().map(collect))).await;
    for (i, outputs) in all.iter().enumerate() {
        assert_complete(outputs, 40 + i as u32);
    }
}

#[tokio::test]
async fn a_stalled_consumer_holds_up_only_its_own_stream() {
    let w = start_worker(2).await;
    let plane = plane_for(&[(w.id, w.addr)]);
    let stalled = plane.generate(w.to(), request(1, 3000)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let other = plane.generate(w.to(), request(2, 100)).await.unwrap();
    assert_complete(&within("the other stream", collect(other)).await, 100);
    // The stalled stream lost nothing while it was not read (credit held its worker back).
    assert_complete(&within("the stalled stream", collect(stalled)).await, 3000);
}

#[tokio::test]
async fn dropping_a_stream_cancels_it_on_the_worker() {
    let mut w = start_worker(3).await;
    let plane = plane_for(&[(w.id, w.addr)]);
    let mut s = plane.generate(w.to(), request(1, LONG)).await.unwrap();
    for _ in 0..3 {
        s.recv().await.unwrap();
    }
    within("the request to run", w.handle.load.wait_for(|l| l.running_requests == 1)).await.unwrap();
    drop(s);
    idle(&mut w.handle.load).await;
}

#[tokio::test]
async fn a_killed_worker_ends_open_streams_and_then_fails_fast() {
    let w = start_worker(4).await;
    let plane = plane_for(&[(w.id, w.addr)]);
    let to = w.to();
    let mut s = plane.generate(to, request(1, LONG)).await.unwrap();
    s.recv().await.unwrap();
    w.server.abort();
    drop(w.handle);
    let rest = within_time(PROMPTLY, "the broken stream to end", collect(s)).await;
    assert!(matches!(rest.last(), Some(WorkerOutput::Error(_))), "{rest:?}");
    for _ in 0..2 {
        let t = Instant::now();
        let again = plane.generate(to, request(2, 8)).await;
        assert!(matches!(again, Err(TransportError::WorkerGone(id)) if id == w.id));
        assert!(t.elapsed() < CONNECT_TIMEOUT, "took {:?}", t.elapsed());
    }
    assert!(matches!(
        plane.generate(Target::in_process(WorkerId(99)), request(3, 8)).await,
        Err(TransportError::WorkerGone(_))
    ));
}

#[tokio::test]
async fn shutdown_drains_open_streams_and_refuses_new_ones() {
    let w = start_worker(5).await;
    let plane = plane_for(&[(w.id, w.addr)]);
    let mut s = plane.generate(w.to(), request(1, 2000)).await.unwrap();
    // Running on the worker (a request still in the socket when the drain ends is lost).
    assert!(matches!(s.recv().await, Some(WorkerOutput::Started { .. })));
    w.shutdown.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let refused =
        within("a refused stream", async { collect(plane.generate(w.to(), request(2, 8)).await.unwrap()).await }).await;
    assert!(matches!(&refused[..], [WorkerOutput::Error(_)]), "{refused:?}");
    let mut rest = vec![WorkerOutput::Started { cached_tokens: 0, computed_tokens: 0 }];
    rest.extend(within("the draining stream", collect(s)).await);
    assert_complete(&rest, 2000);
    within("serve_worker to return", w.server).await.unwrap();
}

/// A dump is stamped when it is taken; everything else must match exactly.
fn without_dump_times(r: Recovery) -> Recovery {
    match r {
        Recovery::Dump { mut events, last_event_id } => {
            events.iter_mut().for_each(|e| e.timestamp_us = 0);
            Recovery::Dump { events, last_event_id }
        }
        replay => replay,
    }
}

#[tokio::test]
async fn recovery_over_tcp_matches_the_workers_own_answer() {
    let mut w = start_worker(6).await;
    let plane = plane_for(&[(w.id, w.addr)]);
    for i in 0..8 {
        let s = plane.generate(w.to(), request(i, 20)).await.unwrap();
        assert_complete(&collect(s).await, 20);
    }
    idle(&mut w.handle.load).await;
    let control = w.handle.control();
    let Recovery::Dump { last_event_id, .. } = control.recover(u64::MAX / 2).await.unwrap() else {
        panic!("an id from the future gets a dump");
    };
    assert!(last_event_id > 2);
    for since in [0, last_event_id - 2, last_event_id, u64::MAX / 2] {
        let local = without_dump_times(control.recover(since).await.unwrap());
        let remote = without_dump_times(plane.recover(w.to(), since).await.unwrap());
        assert_eq!(remote, local, "since {since}");
    }
    assert!(matches!(plane.recover(Target::in_process(WorkerId(99)), 0).await, Err(RecoveryError::Unknown(_))));
}

#[tokio::test]
async fn a_malformed_frame_gets_a_connection_error_and_a_close() {
    let w = start_worker(7).await;
    let mut raw = tokio::net::TcpStream::connect(w.addr).await.unwrap();
    raw.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
    let mut got = Vec::new();
    within("the worker to close", raw.read_to_end(&mut got)).await.unwrap();
    match frame::decode(&got).unwrap() {
        Some((Frame::Error { stream, message }, used)) => {
            assert_eq!((stream, used), (StreamId::CONNECTION, got.len()));
            assert!(message.contains("MAX_FRAME_BYTES"), "{message}");
        }
        other => panic!("expected an Error frame, got {other:?}"),
    }
}

#[test]
fn streams_and_cancellation_on_a_monoio_shard() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let mut w = rt.block_on(start_worker(8));
    let plane = Arc::new(plane_for(&[(w.id, w.addr)]));
    let (to, mut load) = (w.to(), w.handle.load.clone());
    let shard = std::thread::spawn(move || {
        let mut shard = monoio::RuntimeBuilder::<monoio::FusionDriver>::new().enable_timer().build().unwrap();
        shard.block_on(async move {
            let mut tasks = Vec::new();
            for i in 0..32 {
                let s = plane.generate(to, request(i, 30 + i as u32)).await.unwrap();
                tasks.push(monoio::spawn(collect(s)));
            }
            for (i, t) in tasks.into_iter().enumerate() {
                let outputs = monoio::time::timeout(PATIENCE, t).await.expect("a stream on the shard");
                assert_complete(&outputs, 30 + i as u32);
            }
            let mut s = plane.generate(to, request(99, LONG)).await.unwrap();
            for _ in 0..3 {
                s.recv().await.unwrap();
            }
            // The connection stays open: only the relay's Cancel can free the request.
            drop(s);
            let idle = load.wait_for(|l| l.running_requests == 0 && l.active_blocks == 0);
            monoio::time::timeout(PROMPTLY, idle).await.expect("cancelled from the shard").unwrap();
        });
    });
    shard.join().expect("the shard's assertions hold");
    rt.block_on(idle(&mut w.handle.load));
}
