//! KV transfer plane throughput on loopback (Qwen3-0.6B blocks: 1,835,008 bytes = 1.75 MiB).
//! Results and commands: perf/TRANSFER_RESULTS.md.
//!
//! - `transfer/tcp/64x1.75MiB/…`: `TransferSender::send` of 64 blocks (112 MiB) to
//!   `spawn_receiver` on 127.0.0.1 over a reused connection, acknowledgement included: the
//!   defaults (kernel-autotuned socket buffers, 64 MiB arena, 1 MiB receive buffer); fixed
//!   4 MiB socket buffers; one contiguous 112 MiB slice instead of 64 (arena ≥ transfer); a
//!   4 MiB receive buffer; a 2-slot arena that stays in cache (optimistic: real KV is not
//!   cache-hot). `TRANSFER_SWEEP_SOCK` / `TRANSFER_SWEEP_RECV` (comma-separated KiB) replace
//!   these cases with a grid of socket buffer × receive buffer sizes.
//! - `transfer/tcp/2_concurrent_…`: two senders at once to one receiver (aggregate).
//! - `transfer/tcp/1x1.75MiB/…`: one block (latency).
//! - `transfer/inproc/…`: the same 64 blocks to an `inproc://` receiver (one memcpy).
//! - `transfer/memcpy/…`: baselines: 112 MiB into 112 MiB (memory bandwidth), and the arena into
//!   a reused 1 MiB buffer (the in-process copy without the async plumbing).
//! - `transfer/raw/…`: blocking sockets without the library, 112 MiB then a 1-byte answer:
//!   writev, MSG_ZEROCOPY (prints how many sends the kernel reports it copied anyway), and
//!   vmsplice + splice through a 1 MiB pipe.

use std::io::{IoSlice, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use kvgate::planes::transfer::arena::{AlignedBuf, SendArena};
use kvgate::planes::transfer::{bind_in_process, spawn_receiver, TransferConfig, TransferHeader, TransferSender};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;

const BPB: u64 = 1_835_008;
const BLOCKS: u32 = 64;
const BYTES: u64 = BPB * BLOCKS as u64;

fn header(num_blocks: u32) -> TransferHeader {
    TransferHeader { room: 7, request_id: 7, num_blocks, bytes_per_block: BPB, first_token: Some(1) }
}

fn drained() -> mpsc::Sender<kvgate::planes::transfer::Arrival> {
    let (tx, mut rx) = mpsc::channel(64);
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    tx
}

/// A receiver on 127.0.0.1 and a sender with one warm pooled connection to it.
fn tcp_pair(rt: &Runtime, sender: TransferConfig, receiver: TransferConfig) -> (String, TransferSender) {
    let addr = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        spawn_receiver(listener, receiver, drained());
        addr
    });
    let sender = TransferSender::new(sender);
    rt.block_on(sender.send(&addr, header(BLOCKS))).unwrap();
    (addr, sender)
}

fn tcp(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let base = TransferConfig::new(BPB);
    let sockbuf = TransferConfig { socket_buffer_bytes: Some(4 << 20), ..base.clone() };
    let contiguous = TransferConfig { arena_bytes: 128 << 20, ..base.clone() };
    let cache_resident = TransferConfig { arena_bytes: 4 << 20, ..base.clone() };
    let big_recv = TransferConfig { recv_buffer_bytes: 4 << 20, ..base.clone() };
    let mut cases = vec![
        ("vectored_autotuned", base.clone(), base.clone()),
        ("vectored_sockbuf_4MiB", sockbuf.clone(), sockbuf),
        ("contiguous_autotuned", contiguous, base.clone()),
        ("vectored_recvbuf_4MiB", base.clone(), big_recv),
        ("vectored_arena_2_slots_cache_resident", cache_resident, base.clone()),
    ];
    // TRANSFER_SWEEP_SOCK / TRANSFER_SWEEP_RECV: comma-separated KiB (socket buffer 0 = kernel
    // autotuning) replace the cases above by their grid.
    let kib = |var: &str, default: &str| -> Vec<usize> {
        let list = std::env::var(var).unwrap_or_else(|_| default.to_owned());
        list.split(',').map(|k| k.trim().parse::<usize>().expect("KiB") << 10).collect()
    };
    if std::env::var_os("TRANSFER_SWEEP_SOCK").is_some() || std::env::var_os("TRANSFER_SWEEP_RECV").is_some() {
        cases.clear();
        for sock in kib("TRANSFER_SWEEP_SOCK", "0") {
            for recv in kib("TRANSFER_SWEEP_RECV", "4096") {
                let socket_buffer_bytes = (sock > 0).then_some(sock);
                let config = TransferConfig { socket_buffer_bytes, recv_buffer_bytes: recv, ..base.clone() };
                let name = format!("sockbuf_{}KiB_recvbuf_{}KiB", sock >> 10, recv >> 10);
                cases.push((name.leak(), config.clone(), config));
            }
        }
    }
    let mut g = c.benchmark_group("transfer/tcp");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Bytes(BYTES));
    for (name, sender_config, receiver_config) in cases {
        let (addr, sender) = tcp_pair(&rt, sender_config, receiver_config);
        g.bench_function(format!("64x1.75MiB/{name}"), |b| {
            b.iter(|| rt.block_on(sender.send(&addr, header(BLOCKS))).unwrap())
        });
    }
    // Two senders at once to one receiver (aggregate throughput).
    let (addr, sender) = tcp_pair(&rt, base.clone(), base.clone());
    let other = TransferSender::new(base.clone());
    rt.block_on(other.send(&addr, header(BLOCKS))).unwrap();
    g.throughput(Throughput::Bytes(2 * BYTES));
    g.bench_function("2_concurrent_x_64x1.75MiB/vectored_autotuned", |b| {
        b.iter(|| {
            rt.block_on(async {
                let (a, b) = tokio::join!(
                    tokio::spawn({
                        let (s, a) = (sender.clone(), addr.clone());
                        async move { s.send(&a, header(BLOCKS)).await }
                    }),
                    tokio::spawn({
                        let (s, a) = (other.clone(), addr.clone());
                        async move { s.send(&a, header(BLOCKS)).await }
                    }),
                );
                a.unwrap().unwrap();
                b.unwrap().unwrap();
            })
        })
    });
    g.throughput(Throughput::Bytes(BPB));
    g.bench_function("1x1.75MiB/vectored_autotuned", |b| {
        b.iter(|| rt.block_on(sender.send(&addr, header(1))).unwrap())
    });
    g.finish();
}

fn in_process(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let guard = rt.block_on(async { bind_in_process(TransferConfig::new(BPB), drained()) });
    let sender = TransferSender::new(TransferConfig::new(BPB));
    rt.block_on(sender.send(guard.address(), header(BLOCKS))).unwrap();
    let mut g = c.benchmark_group("transfer/inproc");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Bytes(BYTES));
    g.bench_function("64x1.75MiB", |b| b.iter(|| rt.block_on(sender.send(guard.address(), header(BLOCKS))).unwrap()));
    g.finish();
}

fn memcpy(c: &mut Criterion) {
    let arena = SendArena::new(BPB as usize, 64 << 20, u64::MAX);
    let mut src = AlignedBuf::zeroed(BYTES as usize);
    src.as_mut_slice().fill(0x5a);
    let mut dst = AlignedBuf::zeroed(BYTES as usize);
    dst.as_mut_slice().fill(0xa5);
    let mut small = AlignedBuf::zeroed(1 << 20);
    let mut g = c.benchmark_group("transfer/memcpy");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Bytes(BYTES));
    g.bench_function("112MiB_to_112MiB", |b| b.iter(|| dst.as_mut_slice().copy_from_slice(black_box(src.as_slice()))));
    g.bench_function("arena_64x1.75MiB_to_1MiB", |b| {
        b.iter(|| {
            let mut slices = Vec::new();
            arena.payload_slices(u64::from(BLOCKS), 0, usize::MAX, u64::MAX, &mut slices);
            for s in &slices {
                for chunk in s.chunks(small.len()) {
                    small.as_mut_slice()[..chunk.len()].copy_from_slice(chunk);
                }
            }
            black_box(small.as_slice()[0])
        })
    });
    g.finish();
}

/// A blocking loopback pair (kernel-autotuned buffers) whose server reads `BYTES` into a 4 MiB buffer, then answers 1 byte.
fn raw_pair() -> TcpStream {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    for s in [&client, &server] {
        s.set_nodelay(true).unwrap();
    }
    std::thread::spawn(move || {
        let mut buf = AlignedBuf::zeroed(4 << 20);
        loop {
            let mut left = BYTES as usize;
            while left > 0 {
                let want = left.min(buf.len());
                match server.read(&mut buf.as_mut_slice()[..want]) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => left -= n,
                }
            }
            if server.write_all(&[0]).is_err() {
                return;
            }
        }
    });
    client
}

/// Calls `send(chunk)` (returns bytes taken) over the payload in ≤ `chunk` pieces.
fn each_chunk(arena: &SendArena, chunk: usize, mut send: impl FnMut(&[u8]) -> usize) {
    let mut slices = Vec::new();
    arena.payload_slices(u64::from(BLOCKS), 0, usize::MAX, u64::MAX, &mut slices);
    for s in &slices {
        for piece in s.chunks(chunk) {
            let mut off = 0;
            while off < piece.len() {
                off += send(&piece[off..]);
            }
        }
    }
}

const SO_ZEROCOPY: libc::c_int = 60;
const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;
const SO_EE_CODE_ZEROCOPY_COPIED: u8 = 1;

/// Reads MSG_ZEROCOPY completions; returns (sends completed, of which the kernel copied).
fn drain_errqueue(fd: libc::c_int) -> (u64, u64) {
    let (mut done, mut copied) = (0, 0);
    loop {
        let mut control = [0u64; 16];
        // SAFETY: msghdr is plain old data; we point it at our control buffer.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: valid fd and msghdr.
        if unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) } < 0 {
            return (done, copied);
        }
        // SAFETY: the kernel filled `control` with `msg_controllen` bytes of cmsgs.
        let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        if !cmsg.is_null() {
            // SAFETY: an IP_RECVERR cmsg carries a sock_extended_err.
            let err = unsafe { &*(libc::CMSG_DATA(cmsg) as *const libc::sock_extended_err) };
            if err.ee_origin == SO_EE_ORIGIN_ZEROCOPY {
                let sends = u64::from(err.ee_data.wrapping_sub(err.ee_info)) + 1;
                done += sends;
                if err.ee_code & SO_EE_CODE_ZEROCOPY_COPIED != 0 {
                    copied += sends;
                }
            }
        }
    }
}

fn raw(c: &mut Criterion) {
    let arena = SendArena::new(BPB as usize, 64 << 20, u64::MAX);
    let mut g = c.benchmark_group("transfer/raw");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Bytes(BYTES));
    let round_trip = |client: &mut TcpStream, send: &mut dyn FnMut(&mut TcpStream)| {
        send(client);
        let mut ack = [0u8];
        client.read_exact(&mut ack).unwrap();
    };

    let mut client = raw_pair();
    g.bench_function("writev_64x1.75MiB", |b| {
        b.iter(|| {
            round_trip(&mut client, &mut |s| {
                let mut slices = Vec::new();
                arena.payload_slices(u64::from(BLOCKS), 0, usize::MAX, u64::MAX, &mut slices);
                let mut iov: &mut [IoSlice<'_>] = &mut slices;
                while !iov.is_empty() {
                    let n = s.write_vectored(iov).unwrap();
                    IoSlice::advance_slices(&mut iov, n);
                }
            })
        })
    });

    let mut client = raw_pair();
    let fd = client.as_raw_fd();
    let one: libc::c_int = 1;
    // SAFETY: valid fd and option value.
    let rc = unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, SO_ZEROCOPY, (&one as *const libc::c_int).cast(), 4) };
    assert_eq!(rc, 0, "SO_ZEROCOPY: {}", std::io::Error::last_os_error());
    let (mut done, mut copied) = (0u64, 0u64);
    g.bench_function("msg_zerocopy_64x1.75MiB", |b| {
        b.iter(|| {
            round_trip(&mut client, &mut |_| {
                each_chunk(&arena, 1 << 20, |piece| {
                    // SAFETY: `piece` lives in the immutable arena, which outlives the transfer.
                    let n = unsafe { libc::send(fd, piece.as_ptr().cast(), piece.len(), libc::MSG_ZEROCOPY) };
                    let (d, k) = drain_errqueue(fd);
                    (done, copied) = (done + d, copied + k);
                    if n < 0 {
                        let e = std::io::Error::last_os_error();
                        assert_eq!(e.raw_os_error(), Some(libc::ENOBUFS), "{e}");
                        std::thread::sleep(Duration::from_micros(50));
                        return 0;
                    }
                    n as usize
                })
            })
        })
    });
    let (d, k) = drain_errqueue(fd);
    if done + d > 0 {
        println!("MSG_ZEROCOPY: {} sends completed, {} reported as copied by the kernel", done + d, copied + k);
    }

    let mut client = raw_pair();
    let fd = client.as_raw_fd();
    let mut pipe = [0 as libc::c_int; 2];
    // SAFETY: pipe writes two fds into the array.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    // SAFETY: valid pipe fd; the size is within fs.pipe-max-size (1 MiB by default).
    let pipe_size = unsafe { libc::fcntl(pipe[1], libc::F_SETPIPE_SZ, 1 << 20) }.max(4096) as usize;
    g.bench_function("vmsplice_splice_64x1.75MiB", |b| {
        b.iter(|| {
            round_trip(&mut client, &mut |_| {
                each_chunk(&arena, pipe_size, |piece| {
                    let iov = libc::iovec { iov_base: piece.as_ptr() as *mut _, iov_len: piece.len() };
                    // SAFETY: the arena is immutable and outlives the pipe's page references.
                    let n = unsafe { libc::vmsplice(pipe[1], &iov, 1, 0) };
                    assert!(n > 0, "vmsplice: {}", std::io::Error::last_os_error());
                    let mut left = n as usize;
                    while left > 0 {
                        // SAFETY: valid fds; null offsets for a pipe and a socket.
                        let m = unsafe {
                            libc::splice(
                                pipe[0],
                                std::ptr::null_mut(),
                                fd,
                                std::ptr::null_mut(),
                                left,
                                libc::SPLICE_F_MOVE,
                            )
                        };
                        assert!(m > 0, "splice: {}", std::io::Error::last_os_error());
                        left -= m as usize;
                    }
                    n as usize
                })
            })
        })
    });
    g.finish();
}

criterion_group!(benches, tcp, in_process, memcpy, raw);
criterion_main!(benches);
