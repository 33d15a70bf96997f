//! The data plane's [`MetadataStore`] on the control plane's Raft-replicated metadata shards,
//! and the vdisk ownership record kept there.
//!
//! The data plane runs on glommio executors and never enters tokio; the control plane runs on
//! its own tokio runtime. A call crosses over on glommio's blocking-thread pool, which runs it
//! to completion on the control plane's runtime and wakes the calling core when done. The data
//! plane batches its metadata writes (one batch per drain cycle, one per newly mapped extent),
//! so the hop costs nothing per host I/O.
//!
//! Calls go to this node's own control-plane address; a node that does not lead the key's
//! shard forwards to the leader, and the client fails over and retries retryable failures
//! ([`controlplane::client::Endpoints`]). A single-node cluster is the same code with one voter
//! per group.

use controlplane::client::{ClientError, MetadataClient};
use controlplane::kv;
use dataplane::metadata::{Expect, MetaError, MetaOp, MetadataStore, Versioned};
use tokio::runtime::Handle;

/// [`MetadataStore`] over the control plane's metadata service.
#[derive(Debug, Clone)]
pub struct ControlPlaneMetadata {
    client: MetadataClient,
    runtime: Handle,
}

impl ControlPlaneMetadata {
    /// A store that calls `client` on `runtime` (the control plane's).
    pub fn new(client: MetadataClient, runtime: Handle) -> Self {
        Self { client, runtime }
    }

    /// Runs `f(client)` on the control plane's runtime from a glommio core.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, MetaError>
    where
        T: Send + 'static,
        F: FnOnce(MetadataClient) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, ClientError>> + Send,
    {
        let (client, runtime) = (self.client.clone(), self.runtime.clone());
        glommio::executor()
            .spawn_blocking(move || runtime.block_on(f(client)))
            .await
            .map_err(meta_error)
    }
}

fn expect_to_kv(e: Expect) -> kv::Expect {
    match e {
        Expect::Any => kv::Expect::Any,
        Expect::Absent => kv::Expect::Absent,
        Expect::Version(v) => kv::Expect::Version(v),
    }
}

fn expect_from_kv(e: kv::Expect) -> Expect {
    match e {
        kv::Expect::Any => Expect::Any,
        kv::Expect::Absent => Expect::Absent,
        kv::Expect::Version(v) => Expect::Version(v),
    }
}

fn op_to_kv(op: MetaOp) -> kv::KvOp {
    match op {
        MetaOp::Put { key, value, expect } => kv::KvOp::Put {
            key,
            value,
            expect: expect_to_kv(expect),
        },
        MetaOp::Delete { key, expect } => kv::KvOp::Delete {
            key,
            expect: expect_to_kv(expect),
        },
    }
}

fn versioned(v: kv::Versioned) -> Versioned {
    Versioned {
        value: v.value,
        version: v.version,
    }
}

fn meta_error(e: ClientError) -> MetaError {
    match e {
        ClientError::Conflict {
            key,
            expected,
            found,
        } => MetaError::Conflict {
            key: dataplane::metadata::printable_key(&key),
            expected: expect_from_kv(expected),
            found,
        },
        ClientError::Unavailable { message } => {
            eprintln!("cairn node: metadata store unavailable: {message}");
            MetaError::Unavailable {
                reason: "no metadata shard leader reachable (see the node log)",
            }
        }
        ClientError::Invalid { message } => {
            eprintln!("cairn node: metadata batch refused: {message}");
            MetaError::InvalidBatch {
                reason: "refused by the metadata service (see the node log)",
            }
        }
        other => MetaError::Storage {
            op: "metadata call",
            source: Box::new(other),
        },
    }
}

impl MetadataStore for ControlPlaneMetadata {
    async fn get(&self, key: &[u8]) -> Result<Option<Versioned>, MetaError> {
        let key = key.to_vec();
        let v = self.call(async move |c| c.get(&key).await).await?;
        Ok(v.map(versioned))
    }

    async fn scan(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Versioned)>, MetaError> {
        let prefix = prefix.to_vec();
        let entries = self.call(async move |c| c.scan(&prefix).await).await?;
        Ok(entries
            .into_iter()
            .map(|(k, v)| (k, versioned(v)))
            .collect())
    }

    async fn apply(&self, ops: Vec<MetaOp>) -> Result<u64, MetaError> {
        let ops: Vec<kv::KvOp> = ops.into_iter().map(op_to_kv).collect();
        self.call(async move |c| c.apply(ops).await).await
    }
}
