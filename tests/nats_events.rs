//! The KV event plane over a real nats-server (Debian `nats-server`), started per test.

mod support;

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use async_nats::connection::State;
use kvgate::contract::events::{EngineHash, KvEvent, KvEventKind, StoredBlock};
use kvgate::contract::WorkerId;
use kvgate::kv::SeqHash;
use kvgate::planes::events::nats::{connect, NatsPublisher, NatsSubscriber};
use kvgate::planes::events::{EventPublisher, EventSubscriber};
use support::Nats;

const NS: &str = "dynamo";
const MODEL: &str = "Qwen/Qwen3 0.6B";
const WAIT: Duration = Duration::from_secs(10);

fn batch(worker: u64, first_id: u64, n: u64) -> Vec<KvEvent> {
    (first_id..first_id + n)
        .map(|id| KvEvent {
            worker: WorkerId(worker),
            event_id: id,
            timestamp_us: 1_700_000_000_000_000 + id,
            kind: match id % 3 {
                0 => KvEventKind::Stored {
                    parent: Some(SeqHash(id)),
                    blocks: vec![StoredBlock { seq_hash: SeqHash(id + 1), engine_hash: EngineHash(id) }],
                },
                1 => KvEventKind::Removed { engine_hashes: vec![EngineHash(id), EngineHash(id + 7)] },
                _ => KvEventKind::Cleared,
            },
        })
        .collect()
}

async fn next(sub: &mut NatsSubscriber, within: Duration) -> Option<Vec<KvEvent>> {
    tokio::time::timeout(within, sub.next_batch()).await.ok().flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_round_trip_and_garbage_is_skipped() {
    support::init_logs();
    let nats = Nats::start();
    let (pub_client, sub_client) =
        (connect(&nats.url(), "worker").await.unwrap(), connect(&nats.url(), "frontend").await.unwrap());
    let mut sub = NatsSubscriber::subscribe(&sub_client, NS, Some(MODEL)).await.unwrap();
    let mut every_model = NatsSubscriber::subscribe(&sub_client, NS, None).await.unwrap();
    sub_client.flush().await.unwrap(); // the SUBs reached the server
    assert_eq!(sub.subject(), "dynamo.kv_events.Qwen/Qwen3_0_6B");
    let malformed = sub.malformed_counter();

    let publisher = NatsPublisher::new(pub_client.clone(), NS, MODEL);
    let other = NatsPublisher::new(pub_client.clone(), NS, "other-model");
    other.publish(batch(9, 1, 1)).await;
    pub_client.publish(publisher.subject().to_string(), "not a batch".into()).await.unwrap();
    publisher.publish(Vec::new()).await; // nothing to send
    let sent: Vec<Vec<KvEvent>> = (0..3).map(|i| batch(1, 1 + i * 4, 4)).collect();
    for b in &sent {
        publisher.publish(b.clone()).await;
    }
    pub_client.flush().await.unwrap();

    for want in &sent {
        assert_eq!(next(&mut sub, WAIT).await.as_ref(), Some(want), "in order, other model not seen");
    }
    assert_eq!(malformed.load(Relaxed), 1, "garbage counted and skipped");
    assert_eq!(publisher.publish_errors(), 0);

    assert_eq!(next(&mut every_model, WAIT).await.unwrap()[0].worker, WorkerId(9), "wildcard sees every model");
    for want in &sent {
        assert_eq!(next(&mut every_model, WAIT).await.as_ref(), Some(want));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscriber_survives_a_nats_restart() {
    support::init_logs();
    let mut nats = Nats::start();
    let (pub_client, sub_client) =
        (connect(&nats.url(), "worker").await.unwrap(), connect(&nats.url(), "frontend").await.unwrap());
    let mut sub = NatsSubscriber::subscribe(&sub_client, NS, Some(MODEL)).await.unwrap();
    sub_client.flush().await.unwrap();
    let publisher = NatsPublisher::new(pub_client.clone(), NS, MODEL);
    publisher.publish(batch(1, 1, 2)).await;
    assert_eq!(next(&mut sub, WAIT).await, Some(batch(1, 1, 2)));

    nats.restart();

    // Both clients reconnect by themselves; the subscription is re-sent by async-nats.
    let deadline = Instant::now() + WAIT;
    while pub_client.connection_state() != State::Connected || sub_client.connection_state() != State::Connected {
        assert!(Instant::now() < deadline, "clients did not reconnect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Core NATS is at-most-once: publish until one arrives (the subscriber's SUB may reach the
    // new server a moment after the publisher's reconnect), then check later ones all arrive.
    let mut id = 10;
    let first = loop {
        assert!(Instant::now() < deadline, "no batch published after the restart arrived");
        publisher.publish(batch(1, id, 1)).await;
        id += 1;
        if let Some(b) = next(&mut sub, Duration::from_millis(200)).await {
            break b;
        }
    };
    assert!(first[0].event_id >= 10, "{first:?}");
    while let Some(b) = next(&mut sub, Duration::from_millis(100)).await {
        assert!(b[0].event_id < id); // drain late duplicates of the probing loop
    }
    let after: Vec<Vec<KvEvent>> = (0..5).map(|i| batch(1, 100 + i * 2, 2)).collect();
    for b in &after {
        publisher.publish(b.clone()).await;
    }
    for want in &after {
        assert_eq!(next(&mut sub, WAIT).await.as_ref(), Some(want));
    }
    assert_eq!(publisher.publish_errors(), 0);
}

#[tokio::test]
async fn an_unreachable_server_fails_clearly() {
    let port = support::free_port();
    let err = connect(&format!("nats://127.0.0.1:{port}"), "x").await.err().unwrap();
    assert!(err.to_string().contains("NATS_SERVER"), "{err}");
    assert!(err.retryable());
}
