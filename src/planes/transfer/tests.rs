//! Transfer plane tests: wire and arena units, TCP over 127.0.0.1 with a real listener, and the
//! in-process backend. Receivers verify every landed byte against the arena pattern.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::arena::{pattern_byte, SendArena};
use super::wire::{decode_header, encode_header, HeaderError, HEADER_LEN};
use super::*;

fn config(bytes_per_block: u64) -> TransferConfig {
    TransferConfig {
        verify_payload: true,
        arena_bytes: 3 * bytes_per_block.max(1),
        timeout: Duration::from_secs(10),
        ..TransferConfig::new(bytes_per_block)
    }
}

fn header(room: u64, num_blocks: u32, bytes_per_block: u64) -> TransferHeader {
    TransferHeader { room, request_id: room.wrapping_add(1000), num_blocks, bytes_per_block, first_token: Some(42) }
}

async fn receiver(config: TransferConfig) -> (String, mpsc::Receiver<Arrival>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = mpsc::channel(16);
    (addr, rx, spawn_receiver(listener, config, tx))
}

#[test]
fn header_round_trips_and_rejects_garbage() {
    for first_token in [Some(7), Some(0), None] {
        let h = TransferHeader { first_token, ..header(u64::MAX, u32::MAX, 1_835_008) };
        assert_eq!(decode_header(&encode_header(&h)), Ok(h));
    }
    let good = encode_header(&header(1, 2, 3));
    let mut bad = good;
    bad[0] = b'X';
    assert!(matches!(decode_header(&bad), Err(HeaderError::BadMagic(_))));
    let mut bad = good;
    bad[4] = 9;
    assert_eq!(decode_header(&bad), Err(HeaderError::BadVersion(9)));
    let mut bad = good;
    bad[6] = 0x82;
    assert!(matches!(decode_header(&bad), Err(HeaderError::BadFlags(_))));
}

#[test]
fn arena_slices_cover_the_payload_in_order() {
    for (bpb, target) in [(10_000usize, 25_000u64), (8192, 3 * 8192), (4096, 1), (5, 1 << 20)] {
        let arena = SendArena::new(bpb, target, u64::MAX);
        assert!(arena.slots() >= 1);
        assert_eq!(arena.bytes().as_ptr() as usize % 4096, 0);
        let (blocks, mut x, mut out) = (7u64, 0u64, Vec::new());
        while x < blocks * bpb as u64 {
            let mut slices = Vec::new();
            arena.payload_slices(blocks, x, 2, 3 * 4096, &mut slices);
            assert!(!slices.is_empty());
            for s in &slices {
                out.extend_from_slice(s);
                x += s.len() as u64;
            }
        }
        assert_eq!(out.len() as u64, blocks * bpb as u64);
        assert!(out.iter().enumerate().all(|(i, &b)| b == pattern_byte((i % bpb) as u64)));
    }
    // Capped by the largest transfer: one slot when a transfer is at most one block.
    assert_eq!(SendArena::new(4096, 1 << 30, 4096).slots(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_round_trip_moves_every_byte() {
    for bpb in [10_000u64, 16_384] {
        let (addr, mut arrivals, _rx) = receiver(config(bpb)).await;
        let sender = TransferSender::new(config(bpb));
        for (room, blocks, first_token) in [(1, 7, Some(3)), (2, 1, None), (3, 0, Some(1))] {
            let h = TransferHeader { first_token, ..header(room, blocks, bpb) };
            let sent = sender.send(&addr, h).await.unwrap();
            assert_eq!((sent.blocks, sent.bytes), (blocks, u64::from(blocks) * bpb));
            let arrival = arrivals.recv().await.unwrap();
            assert_eq!(arrival.header, h);
            assert_eq!(arrival.stats.bytes, u64::from(blocks) * bpb);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_bytes_per_block_sends_header_and_trailer_only() {
    let (addr, mut arrivals, _rx) = receiver(config(0)).await;
    let sender = TransferSender::new(config(0));
    let stats = sender.send(&addr, header(5, 12, 0)).await.unwrap();
    assert_eq!((stats.blocks, stats.bytes), (12, 0));
    assert_eq!(arrivals.recv().await.unwrap().header, header(5, 12, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_to_one_receiver() {
    let bpb = 65_536;
    let (addr, mut arrivals, _rx) = receiver(config(bpb)).await;
    let mut tasks = Vec::new();
    for s in 0..4u64 {
        let (sender, addr) = (TransferSender::new(config(bpb)), addr.clone());
        tasks.push(tokio::spawn(async move {
            for t in 0..3u64 {
                sender.send(&addr, header(s * 10 + t, 9, bpb)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut rooms: Vec<u64> = (0..12).map(|_| arrivals.try_recv().unwrap().header.room).collect();
    rooms.sort_unstable();
    assert_eq!(rooms, [0, 1, 2, 10, 11, 12, 20, 21, 22, 30, 31, 32]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connection_is_reused_and_a_closed_one_replaced() {
    // One connection at most: a second transfer succeeds only on the pooled connection.
    let (addr, mut arrivals, _rx) = receiver(TransferConfig { max_connections: 1, ..config(4096) }).await;
    let sender = TransferSender::new(config(4096));
    for room in 0..3 {
        sender.send(&addr, header(room, 4, 4096)).await.unwrap();
        assert_eq!(sender.idle_connections(&addr), 1);
        assert_eq!(arrivals.recv().await.unwrap().header.room, room);
    }
    // Another sender's connection is beyond the receiver's limit: closed on accept.
    let refused = TransferSender::new(config(4096)).send(&addr, header(3, 4, 4096)).await;
    assert!(matches!(refused, Err(TransferError::Io { .. })), "{refused:?}");
    // The receiver closes idle connections; the sender notices and connects afresh.
    let idle = TransferConfig { idle_timeout: Duration::from_millis(100), ..config(4096) };
    let (addr, mut arrivals, _rx) = receiver(idle).await;
    sender.send(&addr, header(7, 2, 4096)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    sender.send(&addr, header(8, 2, 4096)).await.unwrap();
    assert_eq!(arrivals.recv().await.unwrap().header.room, 7);
    assert_eq!(arrivals.recv().await.unwrap().header.room, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_refuses_block_size_mismatch_and_oversize() {
    let (addr, mut arrivals, _rx) = receiver(TransferConfig { max_transfer_bytes: 1 << 20, ..config(8192) }).await;
    let other_model = TransferSender::new(config(4096));
    match other_model.send(&addr, header(1, 3, 4096)).await {
        Err(TransferError::Refused { reason, .. }) => assert!(reason.contains("bytes_per_block 4096"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // 64 MiB against a 1 MiB limit: refused right after the header, while the sender writes.
    let big = TransferSender::new(TransferConfig { max_transfer_bytes: u64::MAX, ..config(8192) });
    match big.send(&addr, header(2, 8192, 8192)).await {
        Err(TransferError::Refused { reason, .. }) => assert!(reason.contains("limit of 1048576"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(big.idle_connections(&addr), 0);
    big.send(&addr, header(3, 128, 8192)).await.unwrap();
    assert_eq!(arrivals.recv().await.unwrap().header.room, 3);
    // A header that disagrees with the sender's own arena never leaves the process.
    assert!(matches!(big.send(&addr, header(4, 1, 4096)).await, Err(TransferError::Invalid { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_receiver_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let hold = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(stream);
    });
    let bpb = 1 << 20;
    let sender = TransferSender::new(TransferConfig { timeout: Duration::from_millis(300), ..config(bpb) });
    match sender.send(&addr, header(1, 32, bpb)).await {
        Err(TransferError::Timeout { after, .. }) => assert_eq!(after, Duration::from_millis(300)),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(sender.idle_connections(&addr), 0);
    hold.abort();
}

async fn read_to_end(mut stream: TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await.unwrap().unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_refused_or_closed_without_harm() {
    let (addr, mut arrivals, _rx) = receiver(config(4096)).await;
    // Not a transfer at all: refused with a reason, then closed.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(&[0xAB; 100]).await.unwrap();
    let answer = read_to_end(s).await;
    assert_eq!(answer[0], 1);
    assert!(String::from_utf8_lossy(&answer[3..]).contains("not a KV transfer"));
    // A valid header with a wrong trailer: closed without an answer.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(&encode_header(&header(9, 1, 4096))).await.unwrap();
    s.write_all(&vec![0u8; 4096]).await.unwrap();
    s.write_all(&[0xFF; 8]).await.unwrap();
    assert_eq!(read_to_end(s).await, Vec::<u8>::new());
    // A truncated header, then the peer goes away.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(&encode_header(&header(9, 1, 4096))[..HEADER_LEN / 2]).await.unwrap();
    drop(s);
    // Corrupted payload bytes are caught (verify_payload) and refused.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(&encode_header(&header(10, 1, 4096))).await.unwrap();
    s.write_all(&vec![0u8; 4096]).await.unwrap();
    s.write_all(&10u64.to_le_bytes()).await.unwrap();
    let answer = read_to_end(s).await;
    assert!(String::from_utf8_lossy(&answer[3..]).contains("differs from the arena pattern at byte"));
    // The receiver still serves real transfers.
    TransferSender::new(config(4096)).send(&addr, header(11, 2, 4096)).await.unwrap();
    assert_eq!(arrivals.recv().await.unwrap().header.room, 11);
    assert!(arrivals.try_recv().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_round_trip_and_errors() {
    let bpb = 12_288;
    let (tx, mut arrivals) = mpsc::channel(4);
    let guard = bind_in_process(TransferConfig { recv_buffer_bytes: 20_000, ..config(bpb) }, tx);
    assert!(guard.address().starts_with("inproc://"));
    let sender = TransferSender::new(config(bpb));
    let stats = sender.send(guard.address(), header(1, 10, bpb)).await.unwrap();
    assert_eq!(stats.bytes, 10 * bpb);
    let arrival = arrivals.recv().await.unwrap();
    assert_eq!((arrival.header, arrival.stats.bytes), (header(1, 10, bpb), 10 * bpb));
    let other_model = TransferSender::new(config(4096));
    let refused = other_model.send(guard.address(), header(2, 1, 4096)).await;
    assert!(matches!(refused, Err(TransferError::Refused { .. })), "{refused:?}");

    let addr = guard.address().to_owned();
    drop(guard);
    assert!(matches!(sender.send(&addr, header(3, 1, bpb)).await, Err(TransferError::Connect { .. })));
    let unknown = sender.send("inproc://nobody", header(4, 1, bpb)).await;
    assert!(matches!(unknown, Err(TransferError::Connect { .. })), "{unknown:?}");
}
