//! What the data plane needs from the metadata store, and an in-memory implementation.
//!
//! The data plane keeps each vdisk's block map in memory on the vdisk's owner core and writes
//! changes through [`MetadataStore::apply`] in batches (one per drain cycle), never per I/O. The
//! store is a versioned key-value map with compare-and-swap: the embedded single-node store
//! (redb, in `metadata_redb`) implements it today, and the Raft-replicated sharded ring of the
//! control plane implements the same trait later without the data plane changing.
//!
//! Keys are ordered bytes; a batch must only touch keys under one vdisk's prefix
//! ([`keys::vdisk_prefix`]), so that in the sharded store a batch stays inside one shard.

use std::cell::RefCell;
use std::collections::BTreeMap;

/// A value with the version it was written at (versions increase with every applied batch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// Encoded value.
    pub value: Vec<u8>,
    /// Version of the batch that wrote it.
    pub version: u64,
}

/// A condition a batch operation requires of the current value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// No condition.
    Any,
    /// The key must not exist.
    Absent,
    /// The key must exist at exactly this version.
    Version(u64),
}

/// One operation of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaOp {
    /// Set `key` to `value` if `expect` holds.
    Put {
        /// Key.
        key: Vec<u8>,
        /// Value.
        value: Vec<u8>,
        /// Condition.
        expect: Expect,
    },
    /// Remove `key` if `expect` holds.
    Delete {
        /// Key.
        key: Vec<u8>,
        /// Condition.
        expect: Expect,
    },
}

impl MetaOp {
    /// The key the operation touches.
    pub fn key(&self) -> &[u8] {
        match self {
            MetaOp::Put { key, .. } | MetaOp::Delete { key, .. } => key,
        }
    }

    fn expect(&self) -> Expect {
        match self {
            MetaOp::Put { expect, .. } | MetaOp::Delete { expect, .. } => *expect,
        }
    }
}

/// A failed metadata operation.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// A compare-and-swap condition did not hold; nothing in the batch was applied.
    #[error("compare-and-swap failed on key {key}: expected {expected:?}, found version {found:?}")]
    Conflict {
        /// The key, printable.
        key: String,
        /// What the batch expected.
        expected: Expect,
        /// The version found (`None`: absent).
        found: Option<u64>,
    },
    /// The store cannot answer now (no quorum, shutting down); retry later.
    #[error("metadata store unavailable: {reason}")]
    Unavailable {
        /// Why.
        reason: &'static str,
    },
    /// The store's own storage failed.
    #[error("metadata store storage error during {op}: {source}")]
    Storage {
        /// Operation.
        op: &'static str,
        /// Underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A batch touched keys under more than one vdisk prefix, or was empty.
    #[error("invalid batch: {reason}")]
    InvalidBatch {
        /// Why.
        reason: &'static str,
    },
}

/// A versioned key-value store with atomic compare-and-swap batches.
#[allow(async_fn_in_trait)] // used from the owner core only
pub trait MetadataStore {
    /// The value of `key`.
    async fn get(&self, key: &[u8]) -> Result<Option<Versioned>, MetaError>;
    /// Every key starting with `prefix`, in key order.
    async fn scan(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Versioned)>, MetaError>;
    /// Applies every operation atomically and durably, or none if a condition fails. Returns
    /// the version the batch was written at.
    async fn apply(&self, ops: Vec<MetaOp>) -> Result<u64, MetaError>;
}

/// Printable form of a key for errors (keys are mostly ASCII with binary ids).
pub fn printable_key(key: &[u8]) -> String {
    key.iter()
        .map(|&b| {
            if b.is_ascii_graphic() {
                (b as char).to_string()
            } else {
                format!("\\x{b:02x}")
            }
        })
        .collect()
}

/// Checks a batch's conditions against `current` (a lookup of the current version).
pub fn check_batch(
    ops: &[MetaOp],
    mut current: impl FnMut(&[u8]) -> Option<u64>,
) -> Result<(), MetaError> {
    if ops.is_empty() {
        return Err(MetaError::InvalidBatch {
            reason: "empty batch",
        });
    }
    for op in ops {
        let found = current(op.key());
        let ok = match op.expect() {
            Expect::Any => true,
            Expect::Absent => found.is_none(),
            Expect::Version(v) => found == Some(v),
        };
        if !ok {
            return Err(MetaError::Conflict {
                key: printable_key(op.key()),
                expected: op.expect(),
                found,
            });
        }
    }
    Ok(())
}

/// Metadata kept in memory (tests and simulations; not durable).
#[derive(Debug, Default)]
pub struct MemMetadataStore {
    inner: RefCell<(BTreeMap<Vec<u8>, Versioned>, u64)>,
}

impl MemMetadataStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl MetadataStore for MemMetadataStore {
    async fn get(&self, key: &[u8]) -> Result<Option<Versioned>, MetaError> {
        Ok(self.inner.borrow().0.get(key).cloned())
    }

    async fn scan(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Versioned)>, MetaError> {
        Ok(self
            .inner
            .borrow()
            .0
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    async fn apply(&self, ops: Vec<MetaOp>) -> Result<u64, MetaError> {
        let mut inner = self.inner.borrow_mut();
        let (map, version) = &mut *inner;
        check_batch(&ops, |k| map.get(k).map(|v| v.version))?;
        *version += 1;
        for op in ops {
            match op {
                MetaOp::Put { key, value, .. } => {
                    map.insert(
                        key,
                        Versioned {
                            value,
                            version: *version,
                        },
                    );
                }
                MetaOp::Delete { key, .. } => {
                    map.remove(&key);
                }
            }
        }
        Ok(*version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pollster::block_on;

    #[test]
    fn cas_batches_are_atomic() {
        block_on(async {
            let s = MemMetadataStore::new();
            let v1 = s
                .apply(vec![MetaOp::Put {
                    key: b"v/1/a".to_vec(),
                    value: b"x".to_vec(),
                    expect: Expect::Absent,
                }])
                .await
                .unwrap();
            let err = s
                .apply(vec![
                    MetaOp::Put {
                        key: b"v/1/b".to_vec(),
                        value: b"y".to_vec(),
                        expect: Expect::Any,
                    },
                    MetaOp::Put {
                        key: b"v/1/a".to_vec(),
                        value: b"z".to_vec(),
                        expect: Expect::Version(v1 + 5),
                    },
                ])
                .await
                .unwrap_err();
            assert!(
                matches!(err, MetaError::Conflict { found: Some(v), .. } if v == v1),
                "{err}"
            );
            assert!(s.get(b"v/1/b").await.unwrap().is_none(), "nothing applied");
            s.apply(vec![MetaOp::Delete {
                key: b"v/1/a".to_vec(),
                expect: Expect::Version(v1),
            }])
            .await
            .unwrap();
            assert!(s.scan(b"v/1/").await.unwrap().is_empty());
        });
    }
}
