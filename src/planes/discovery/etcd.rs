//! etcd discovery: workers register with a lease; the frontend watches the prefix.
//!
//! Keys: `/{namespace}/workers/{model}/{role}/{instance_id}` (role `aggregated`, `prefill` or
//! `decode`; instance id = [`WorkerId`](crate::contract::WorkerId) in hex), value = the
//! [`WorkerInfo`] as JSON, attached to a lease of `--lease-ttl` seconds. So
//! `etcdctl get --prefix /dynamo/workers/` lists every live worker.
//!
//! Invariant: a registered key exists exactly while its worker keeps its lease alive. A graceful
//! [`EtcdRegistration::revoke`] (or Drop) revokes the lease; a killed worker's key goes when the
//! lease expires; a live worker whose lease was lost (etcd restarted past it) grants a new one
//! and puts its key again.
//!
//! Concurrency: [`EtcdDiscovery`] is a cloneable handle (etcd-client multiplexes one HTTP/2
//! channel). Each registration has one keep-alive task ([`lease`]) and each watch one task
//! ([`watcher`]); every mutable thing has exactly one of them as owner. Every unary etcd call is
//! bounded by [`REQUEST_TIMEOUT`]; every retry waits a bounded, jittered backoff
//! ([`BACKOFF_MIN`]..[`BACKOFF_MAX`]).

mod lease;
mod watcher;

use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions};
use rand::Rng;
use tokio::sync::watch;

use super::{WorkerInfo, WorkerSnapshot};
use crate::contract::WorkerRole;

pub use lease::EtcdRegistration;

/// `ETCD_ENDPOINTS` when unset.
pub const DEFAULT_ETCD_ENDPOINTS: &str = "http://127.0.0.1:2379";
/// `--lease-ttl` when unset.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// One unary etcd call; past it the call counts as failed (a dead endpoint would otherwise park
/// the call in the client's balancer forever).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// First retry delay after an etcd failure.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest retry delay: bounds how stale a snapshot stays after etcd comes back.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Errors at the etcd boundary. `retryable()` says whether trying again can help.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error(
        "cannot reach etcd at {endpoints}: {source} (is etcd running there? ETCD_ENDPOINTS or \
         the endpoints flag say where)"
    )]
    Connect {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error(
        "etcd at {endpoints} did not answer within {} ms (is etcd running there? \
         ETCD_ENDPOINTS or the endpoints flag say where)",
        REQUEST_TIMEOUT.as_millis()
    )]
    ConnectTimeout { endpoints: String },
    #[error("etcd {op} failed: {source}")]
    Request {
        op: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd {op} timed out after {} ms", REQUEST_TIMEOUT.as_millis())]
    Timeout { op: &'static str },
    #[error("invalid discovery name {value:?}: {reason}")]
    InvalidName { value: String, reason: &'static str },
    #[error("lease TTL must be at least 1 s (got {0:?}); change --lease-ttl")]
    InvalidTtl(Duration),
    #[error("keep-alive task of {key} ended abnormally")]
    KeepAliveTask {
        key: String,
        #[source]
        source: tokio::task::JoinError,
    },
}

impl EtcdError {
    /// Whether the same call may succeed later (etcd down or slow) rather than being our fault.
    pub fn retryable(&self) -> bool {
        matches!(self, Self::Connect { .. } | Self::ConnectTimeout { .. } | Self::Request { .. } | Self::Timeout { .. })
    }
}

/// Runs one etcd call under [`REQUEST_TIMEOUT`].
pub(crate) async fn call<T>(
    op: &'static str,
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, EtcdError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
        Ok(r) => r.map_err(|source| EtcdError::Request { op, source }),
        Err(_) => Err(EtcdError::Timeout { op }),
    }
}

fn role_name(role: WorkerRole) -> &'static str {
    match role {
        WorkerRole::Aggregated => "aggregated",
        WorkerRole::Prefill => "prefill",
        WorkerRole::Decode => "decode",
    }
}

fn check_name(value: &str, what: &'static str) -> Result<(), EtcdError> {
    if value.is_empty() {
        return Err(EtcdError::InvalidName { value: value.into(), reason: what });
    }
    Ok(())
}

/// `/{namespace}/workers/`: the prefix every worker key lives under.
pub fn workers_prefix(namespace: &str) -> String {
    format!("/{namespace}/workers/")
}

/// `/{namespace}/workers/{model}/{role}/{instance_id}`.
pub fn worker_key(namespace: &str, info: &WorkerInfo) -> String {
    format!("{}{}/{}/{}", workers_prefix(namespace), info.model, role_name(info.role), info.id)
}

/// Bounded exponential backoff with jitter (each delay is drawn from [d/2, d]).
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Self { next: BACKOFF_MIN }
    }

    pub(crate) fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }

    pub(crate) fn delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(BACKOFF_MAX);
        d.mul_f64(rand::rng().random_range(0.5..=1.0))
    }
}

/// A connection to etcd, scoped to one namespace. Cheap to clone.
#[derive(Clone)]
pub struct EtcdDiscovery {
    client: Client,
    namespace: String,
}

impl EtcdDiscovery {
    /// Connects and checks that etcd answers (one read under [`REQUEST_TIMEOUT`]).
    pub async fn connect(endpoints: &[String], namespace: &str) -> Result<Self, EtcdError> {
        check_name(namespace, "the namespace must not be empty")?;
        if namespace.contains('/') {
            return Err(EtcdError::InvalidName {
                value: namespace.into(),
                reason: "the namespace must not contain '/'",
            });
        }
        let shown = endpoints.join(",");
        let opts = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
        let mut client = Client::connect(endpoints, Some(opts))
            .await
            .map_err(|source| EtcdError::Connect { endpoints: shown.clone(), source })?;
        let probe = GetOptions::new().with_prefix().with_count_only();
        match call("get", client.get(workers_prefix(namespace), Some(probe))).await {
            Ok(_) => {}
            Err(EtcdError::Request { source, .. }) => return Err(EtcdError::Connect { endpoints: shown, source }),
            Err(EtcdError::Timeout { .. }) => return Err(EtcdError::ConnectTimeout { endpoints: shown }),
            Err(e) => return Err(e),
        }
        Ok(Self { client, namespace: namespace.to_string() })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The underlying client (for tools and tests).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Grants a lease of `ttl`, puts the worker's key on it and keeps it alive until the returned
    /// guard is revoked or dropped.
    pub async fn register(&self, info: WorkerInfo, ttl: Duration) -> Result<EtcdRegistration, EtcdError> {
        check_name(&info.model, "the model name must not be empty")?;
        if ttl < Duration::from_secs(1) {
            return Err(EtcdError::InvalidTtl(ttl));
        }
        let key = worker_key(&self.namespace, &info);
        let value = serde_json::to_vec(&info).expect("WorkerInfo serializes");
        lease::register(self.client.clone(), key, value, ttl.as_secs() as i64).await
    }

    /// Reads the live workers (of `model`, or all) and keeps the returned channel up to date
    /// until every receiver is dropped. Fails only if the first read fails.
    pub async fn watch(&self, model: Option<&str>) -> Result<watch::Receiver<WorkerSnapshot>, EtcdError> {
        let prefix = match model {
            Some(m) => {
                check_name(m, "the model name must not be empty")?;
                format!("{}{m}/", workers_prefix(&self.namespace))
            }
            None => workers_prefix(&self.namespace),
        };
        watcher::start(self.client.clone(), prefix, model.map(str::to_string)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::WorkerId;

    fn info(id: u64, model: &str, role: WorkerRole) -> WorkerInfo {
        WorkerInfo {
            id: WorkerId(id),
            model: model.into(),
            model_path: None,
            role,
            page_size: 16,
            kv_capacity_blocks: 1024,
            max_num_seqs: 8,
            max_num_batched_tokens: 2048,
            address: Some("127.0.0.1:9000".into()),
            engine: Default::default(),
            disagg: Default::default(),
            bootstrap: None,
            kv_events: true,
        }
    }

    #[test]
    fn keys_follow_the_dynamo_layout() {
        let w = info(0xab, "Qwen/Qwen3-0.6B", WorkerRole::Decode);
        assert_eq!(worker_key("dynamo", &w), "/dynamo/workers/Qwen/Qwen3-0.6B/decode/ab");
        assert_eq!(workers_prefix("ns"), "/ns/workers/");
    }

    #[test]
    fn backoff_is_bounded_and_jittered() {
        let mut b = Backoff::new();
        let delays: Vec<Duration> = (0..20).map(|_| b.delay()).collect();
        assert!(delays.iter().all(|d| *d >= BACKOFF_MIN / 2 && *d <= BACKOFF_MAX));
        assert!(delays[19] >= BACKOFF_MAX / 2);
        b.reset();
        assert!(b.delay() <= BACKOFF_MIN);
    }
}
