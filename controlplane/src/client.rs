//! Client side of the control plane: [`Endpoints`] (a list of node addresses with retry of
//! calls that are safe to retry) and [`MetadataClient`], the gRPC twin of the data plane's
//! `MetadataStore` trait (`get`/`scan`/`apply` with the same semantics and errors).
//!
//! Any node answers any call (it forwards to the leader), so the list of endpoints is only for
//! availability: a call goes to the endpoint that answered last; when it cannot be reached, or
//! answers UNAVAILABLE marked retryable (no leader elected yet), the next endpoint is tried,
//! until [`Endpoints::retry_for`] has passed. A call that may have been proposed (quorum lost
//! after proposing) is never retried blindly: its error is returned.
//!
//! Everything here is tokio-based. From a glommio executor, run the call on the control plane's
//! runtime (`ControlPlaneHandle::runtime().spawn(..)`) and await the returned `JoinHandle`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cairn_proto::v1 as pb;
use pb::metadata_service_client::MetadataServiceClient;
use tonic::transport::{Channel, Endpoint};

use crate::kv::{Expect, KvOp, Versioned};
use crate::status::{
    CONFLICT_EXPECTED_KEY, CONFLICT_FOUND_KEY, CONFLICT_KEY_KEY, is_retryable, parse_expect,
};

/// How long a call keeps trying other endpoints by default.
pub const DEFAULT_RETRY_FOR_MS: u64 = 10_000;
/// How long one attempt may take (covers a forwarded write's commit timeout).
pub const ATTEMPT_TIMEOUT_MS: u64 = 15_000;
/// Pause after every endpoint failed once, ms.
pub const RETRY_PAUSE_MS: u64 = 200;

/// A failed client call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// An endpoint is not `host:port`.
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        /// The endpoint.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// No endpoint given.
    #[error("no endpoints")]
    NoEndpoints,
    /// [`Endpoints::new`] was called outside a tokio runtime context.
    #[error("endpoints must be created inside a tokio runtime (Handle::enter)")]
    NoRuntime,
    /// A compare-and-swap condition did not hold; nothing of the batch was applied.
    #[error(
        "compare-and-swap failed on key {}: expected {expected:?}, found version {found:?}",
        crate::kv::printable_key(key)
    )]
    Conflict {
        /// The key.
        key: Vec<u8>,
        /// What the batch expected.
        expected: Expect,
        /// The version found (`None`: absent).
        found: Option<u64>,
    },
    /// The service cannot answer now (no leader, no quorum, unreachable); retry later.
    #[error("unavailable: {message}")]
    Unavailable {
        /// The last status message.
        message: String,
    },
    /// The request was refused as malformed (empty batch, batch spanning shards, bad size).
    #[error("invalid request: {message}")]
    Invalid {
        /// The status message.
        message: String,
    },
    /// Any other status.
    #[error("{code:?}: {message}")]
    Status {
        /// gRPC code.
        code: tonic::Code,
        /// The status message.
        message: String,
    },
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        let message = s.message().to_string();
        match s.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                ClientError::Unavailable { message }
            }
            tonic::Code::InvalidArgument => ClientError::Invalid { message },
            tonic::Code::Aborted => {
                let md = s.metadata();
                let key = md
                    .get_bin(CONFLICT_KEY_KEY)
                    .and_then(|v| v.to_bytes().ok())
                    .map(|b| b.to_vec());
                let expected = md
                    .get(CONFLICT_EXPECTED_KEY)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_expect);
                let found = md
                    .get(CONFLICT_FOUND_KEY)
                    .and_then(|v| v.to_str().ok())
                    .map(|f| f.parse().ok());
                match (key, expected, found) {
                    (Some(key), Some(expected), Some(found)) => ClientError::Conflict {
                        key,
                        expected,
                        found,
                    },
                    _ => ClientError::Status {
                        code: s.code(),
                        message,
                    },
                }
            }
            code => ClientError::Status { code, message },
        }
    }
}

/// Node addresses to call, with failover and retry of retryable failures.
#[derive(Debug, Clone)]
pub struct Endpoints {
    addrs: Arc<Vec<String>>,
    channels: Arc<Vec<Channel>>,
    preferred: Arc<AtomicUsize>,
    retry_for: Duration,
}

impl Endpoints {
    /// Endpoints `host:port` (connections are made lazily, on first use). Call inside a tokio
    /// runtime context (the channels' background tasks are spawned on it).
    pub fn new<S: AsRef<str>>(addrs: impl IntoIterator<Item = S>) -> Result<Self, ClientError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ClientError::NoRuntime);
        }
        let mut list = Vec::new();
        let mut channels = Vec::new();
        for a in addrs {
            let a = a.as_ref().trim().to_string();
            let uri = if a.contains("://") {
                a.clone()
            } else {
                format!("http://{a}")
            };
            let endpoint =
                Endpoint::from_shared(uri).map_err(|e| ClientError::InvalidEndpoint {
                    endpoint: a.clone(),
                    reason: e.to_string(),
                })?;
            channels.push(
                endpoint
                    .connect_timeout(Duration::from_millis(crate::grpc::CONNECT_TIMEOUT_MS))
                    .timeout(Duration::from_millis(ATTEMPT_TIMEOUT_MS))
                    .tcp_nodelay(true)
                    .connect_lazy(),
            );
            list.push(a);
        }
        if list.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        Ok(Self {
            addrs: Arc::new(list),
            channels: Arc::new(channels),
            preferred: Arc::new(AtomicUsize::new(0)),
            retry_for: Duration::from_millis(DEFAULT_RETRY_FOR_MS),
        })
    }

    /// Keeps retrying retryable failures for `d` (0: one attempt per endpoint, no pause).
    pub fn retry_for(mut self, d: Duration) -> Self {
        self.retry_for = d;
        self
    }

    /// The addresses.
    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// Calls `f` with a channel to one endpoint after another until it succeeds, fails with a
    /// non-retryable status, or the retry time is over (then the last status is returned).
    pub async fn call<R, F, Fut>(&self, mut f: F) -> Result<R, tonic::Status>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<R, tonic::Status>>,
    {
        let deadline = Instant::now() + self.retry_for;
        let n = self.channels.len();
        let mut i = self.preferred.load(Ordering::Relaxed) % n;
        let mut tried = 0usize;
        loop {
            match f(self.channels[i].clone()).await {
                Ok(r) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok(r);
                }
                Err(s) if is_retryable(&s) => {
                    tried += 1;
                    if tried >= n && Instant::now() >= deadline {
                        return Err(with_endpoint(s, &self.addrs[i]));
                    }
                    if tried.is_multiple_of(n) {
                        tokio::time::sleep(Duration::from_millis(RETRY_PAUSE_MS)).await;
                    }
                    i = (i + 1) % n;
                }
                Err(s) => return Err(s),
            }
        }
    }
}

fn with_endpoint(s: tonic::Status, addr: &str) -> tonic::Status {
    let mut out = tonic::Status::new(s.code(), format!("{} (endpoint {addr})", s.message()));
    *out.metadata_mut() = s.metadata().clone();
    out
}

/// The metadata store over gRPC: the same contract as `dataplane::metadata::MetadataStore`.
#[derive(Debug, Clone)]
pub struct MetadataClient {
    endpoints: Endpoints,
}

impl MetadataClient {
    /// A client of the cluster reachable at `endpoints`.
    pub fn new(endpoints: Endpoints) -> Self {
        Self { endpoints }
    }

    /// The value of `key`.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Versioned>, ClientError> {
        let req = pb::MetaGetRequest { key: key.to_vec() };
        let resp = self
            .endpoints
            .call(|ch| {
                let req = req.clone();
                async move { MetadataServiceClient::new(ch).get(req).await }
            })
            .await?;
        Ok(resp.into_inner().value.map(|v| Versioned {
            value: v.value,
            version: v.version,
        }))
    }

    /// Every key starting with `prefix`, in key order.
    pub async fn scan(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Versioned)>, ClientError> {
        let req = pb::MetaScanRequest {
            prefix: prefix.to_vec(),
            shard: 0,
        };
        let resp = self
            .endpoints
            .call(|ch| {
                let req = req.clone();
                async move { MetadataServiceClient::new(ch).scan(req).await }
            })
            .await?;
        Ok(resp
            .into_inner()
            .entries
            .into_iter()
            .map(|e| {
                let v = e.value.unwrap_or_default();
                (
                    e.key,
                    Versioned {
                        value: v.value,
                        version: v.version,
                    },
                )
            })
            .collect())
    }

    /// Applies every operation atomically and durably on a majority of the key's shard, or
    /// none if a condition fails. All keys must route to one shard (one vdisk prefix).
    /// Returns the version the batch was written at (versions are per shard).
    pub async fn apply(&self, ops: Vec<KvOp>) -> Result<u64, ClientError> {
        let req = pb::MetaApplyRequest {
            ops: ops.into_iter().map(op_to_pb).collect(),
        };
        let resp = self
            .endpoints
            .call(|ch| {
                let req = req.clone();
                async move { MetadataServiceClient::new(ch).apply(req).await }
            })
            .await?;
        Ok(resp.into_inner().version)
    }
}

fn expect_to_pb(e: Expect) -> Option<pb::Expect> {
    use pb::expect::Condition;
    Some(pb::Expect {
        condition: Some(match e {
            Expect::Any => Condition::Any(true),
            Expect::Absent => Condition::Absent(true),
            Expect::Version(v) => Condition::Version(v),
        }),
    })
}

/// A batch operation on the wire.
pub fn op_to_pb(op: KvOp) -> pb::MetaOp {
    use pb::meta_op::Op;
    pb::MetaOp {
        op: Some(match op {
            KvOp::Put { key, value, expect } => Op::Put(pb::MetaPut {
                key,
                value,
                expect: expect_to_pb(expect),
            }),
            KvOp::Delete { key, expect } => Op::Delete(pb::MetaDelete {
                key,
                expect: expect_to_pb(expect),
            }),
        }),
    }
}
