//! A worker's registration: one lease, one key, one keep-alive task.
//!
//! Invariant: the key exists exactly while the task keeps its lease alive. The task refreshes
//! every TTL/3; when the stream breaks it retries the same lease (waiting at most TTL/3, so the
//! lease outlives an etcd restart); when etcd no longer knows the lease it grants a new one and
//! puts the key again. Stopping it (revoke, Drop) revokes the lease; aborting it (abandon, or its
//! runtime ending) leaves the key to expire with the lease, as a killed worker's would.
//!
//! Concurrency: the task owns the [`Lease`] (the only writer of its key); the
//! [`EtcdRegistration`] guard only holds a oneshot to stop it and its join handle.

use std::time::Duration;

use etcd_client::{Client, PutOptions};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::{call, Backoff, EtcdError};

/// Grants the lease, puts the key and starts the keep-alive task.
pub(super) async fn register(
    client: Client,
    key: String,
    value: Vec<u8>,
    ttl_s: i64,
) -> Result<EtcdRegistration, EtcdError> {
    let mut lease = Lease { client, key, value, ttl_s, id: 0 };
    lease.grant_and_put().await?;
    tracing::info!(key = %lease.key, lease = lease.id, ttl_s, "registered in etcd");
    let key = lease.key.clone();
    let (stop_tx, stop_rx) = oneshot::channel();
    let task = tokio::spawn(lease.keep_alive(stop_rx));
    Ok(EtcdRegistration { key, stop: Some(stop_tx), task: Some(task) })
}

/// A registered worker. Dropping it revokes the lease in the background; [`Self::revoke`]
/// waits for the revoke.
pub struct EtcdRegistration {
    key: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), EtcdError>>>,
}

impl EtcdRegistration {
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Graceful deregistration: revokes the lease, so the key is gone when this returns.
    pub async fn revoke(mut self) -> Result<(), EtcdError> {
        let _ = self.stop.take().map(|s| s.send(()));
        let task = self.task.take().expect("task present until revoke or drop");
        task.await.map_err(|source| EtcdError::KeepAliveTask { key: self.key.clone(), source })?
    }

    /// Stops keeping the lease alive without revoking it, as a killed worker would: the key
    /// disappears when the lease expires. For fault tests.
    pub fn abandon(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        // Dropped without a send: the keep-alive task, if it runs once more before the abort
        // lands (on another thread), ends without revoking (a send means revoke).
        self.stop = None;
    }
}

impl Drop for EtcdRegistration {
    fn drop(&mut self) {
        // The keep-alive task revokes when signalled; if its runtime is gone the lease expires.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// One worker's lease and key: owned by its keep-alive task.
struct Lease {
    client: Client,
    key: String,
    value: Vec<u8>,
    ttl_s: i64,
    id: i64,
}

enum SessionEnd {
    /// etcd no longer knows the lease: grant a new one and put the key again.
    LeaseGone,
    /// The stream or connection failed: retry the same lease.
    Broken(EtcdError),
}

impl Lease {
    /// Time between refreshes: a third of the TTL, so two may fail before the lease expires.
    fn period(&self) -> Duration {
        Duration::from_millis(self.ttl_s as u64 * 1000 / 3)
    }

    async fn grant_and_put(&mut self) -> Result<(), EtcdError> {
        let grant = call("lease grant", self.client.lease_grant(self.ttl_s, None)).await?;
        self.id = grant.id();
        let opts = PutOptions::new().with_lease(self.id);
        call("put", self.client.put(self.key.clone(), self.value.clone(), Some(opts))).await?;
        Ok(())
    }

    /// Keeps the lease alive until `stop` fires (then revokes), its sender is dropped unsent
    /// (abandoned: the lease expires) or the task is aborted.
    async fn keep_alive(mut self, mut stop: oneshot::Receiver<()>) -> Result<(), EtcdError> {
        let mut backoff = Backoff::new();
        let mut failing = false;
        loop {
            let end = tokio::select! {
                revoke = &mut stop => match revoke {
                    Ok(()) => None,
                    Err(_) => return Ok(()), // abandoned: let the lease expire
                },
                end = self.session(&mut backoff, &mut failing) => Some(end),
            };
            failing = true;
            let lease_gone = match end {
                None => return self.revoke().await,
                Some(SessionEnd::LeaseGone) => {
                    tracing::warn!(key = %self.key, lease = self.id, "etcd lost the lease; registering again");
                    true
                }
                Some(SessionEnd::Broken(e)) => {
                    tracing::warn!(key = %self.key, lease = self.id, error = %e, "etcd keep-alive failed; retrying");
                    false
                }
            };
            // A broken session waits once; a lost lease is granted again until that succeeds.
            loop {
                let stopped = tokio::select! {
                    revoke = &mut stop => match revoke {
                        Ok(()) => true,
                        Err(_) => return Ok(()), // abandoned: let the lease expire
                    },
                    // Never wait past a refresh period, so the lease outlives an etcd restart.
                    _ = tokio::time::sleep(backoff.delay().min(self.period())) => false,
                };
                if stopped {
                    return self.revoke().await;
                }
                if !lease_gone {
                    break;
                }
                match self.grant_and_put().await {
                    Ok(()) => {
                        tracing::info!(key = %self.key, lease = self.id, "registered in etcd again");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(key = %self.key, error = %e, "etcd re-registration failed")
                    }
                }
            }
        }
    }

    /// One keep-alive stream: a refresh every TTL/3 until the stream breaks or the lease is gone.
    async fn session(&mut self, backoff: &mut Backoff, failing: &mut bool) -> SessionEnd {
        let period = self.period();
        let (mut keeper, mut stream) = match call("lease keep-alive", self.client.lease_keep_alive(self.id)).await {
            Ok(pair) => pair,
            Err(EtcdError::Request { source: etcd_client::Error::LeaseKeepAliveError(_), .. }) => {
                return SessionEnd::LeaseGone
            }
            Err(e) => return SessionEnd::Broken(e),
        };
        if std::mem::take(failing) {
            tracing::info!(key = %self.key, lease = self.id, "etcd keep-alive resumed");
        }
        loop {
            backoff.reset();
            tokio::time::sleep(period).await;
            if let Err(source) = keeper.keep_alive().await {
                return SessionEnd::Broken(EtcdError::Request { op: "lease keep-alive", source });
            }
            match call("lease keep-alive", stream.message()).await {
                Ok(Some(resp)) if resp.ttl() > 0 => {}
                Ok(Some(_)) => return SessionEnd::LeaseGone,
                Ok(None) => {
                    let source = etcd_client::Error::LeaseKeepAliveError("stream closed".into());
                    return SessionEnd::Broken(EtcdError::Request { op: "lease keep-alive", source });
                }
                Err(e) => return SessionEnd::Broken(e),
            }
        }
    }

    async fn revoke(mut self) -> Result<(), EtcdError> {
        match call("lease revoke", self.client.lease_revoke(self.id)).await {
            Ok(_) => {
                tracing::info!(key = %self.key, lease = self.id, "lease revoked");
                Ok(())
            }
            // Already expired: the key is gone, which is what revoking wanted.
            Err(EtcdError::Request { source: etcd_client::Error::GRpcStatus(s), .. })
                if i32::from(s.code()) == GRPC_NOT_FOUND =>
            {
                Ok(())
            }
            Err(e) => {
                tracing::warn!(key = %self.key, lease = self.id, error = %e,
                    "lease not revoked; the key goes when the lease expires");
                Err(e)
            }
        }
    }
}

/// gRPC status code NOT_FOUND (etcd's "requested lease not found").
const GRPC_NOT_FOUND: i32 = 5;
