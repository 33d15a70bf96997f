//! The replicated state machine's semantics: a versioned key-value map with atomic
//! compare-and-swap batches.
//!
//! This is the same contract as the data plane's `MetadataStore` (`dataplane::metadata`): every
//! applied batch gets the next version of the map, each value remembers the version of the batch
//! that wrote it, and a batch whose conditions do not all hold is rejected whole, consuming no
//! version. The control plane does not depend on `dataplane` (dependencies point one way), so
//! the types are restated here and the root binary converts between the two; the tests of both
//! crates pin the same behaviour.
//!
//! Everything here is pure: the raft storage (`storage`) looks current versions up and calls
//! [`check_batch`], which is also run by [`crate::RaftGroup::apply`] before proposing, so that a
//! malformed batch is refused without costing a log entry. Conditions are checked again when the
//! entry is applied, against the state the batch really meets; that second check is the one
//! that counts.

use serde::{Deserialize, Serialize};

/// Longest key a batch may carry, bytes (keys are vdisk-prefixed paths with binary ids).
pub const MAX_KEY_BYTES: usize = 4 * 1024;
/// Largest value a batch may carry, bytes (metadata records, never data blocks).
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Most operations in one batch (one drain cycle's metadata stays well below this).
pub const MAX_BATCH_OPS: usize = 10_000;

/// A value with the version it was written at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versioned {
    /// Encoded value.
    pub value: Vec<u8>,
    /// Version of the batch that wrote it.
    pub version: u64,
}

/// A condition an operation requires of the key's current value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Expect {
    /// No condition.
    Any,
    /// The key must not exist.
    Absent,
    /// The key must exist at exactly this version.
    Version(u64),
}

/// One operation of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvOp {
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

impl KvOp {
    /// The key the operation touches.
    pub fn key(&self) -> &[u8] {
        match self {
            KvOp::Put { key, .. } | KvOp::Delete { key, .. } => key,
        }
    }

    /// The operation's condition.
    pub fn expect(&self) -> Expect {
        match self {
            KvOp::Put { expect, .. } | KvOp::Delete { expect, .. } => *expect,
        }
    }
}

/// The application data of one raft log entry: a batch to apply atomically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvBatch {
    /// The operations, applied in order after all conditions were checked against the state
    /// before the batch.
    pub ops: Vec<KvOp>,
}

/// What applying one log entry produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvResponse {
    /// The batch was applied at this version.
    Applied {
        /// Version of the batch.
        version: u64,
    },
    /// The batch was refused; nothing of it was applied.
    Rejected(KvError),
    /// A log entry without a batch (leader's blank entry, membership change).
    NoBatch,
}

/// Why a batch was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum KvError {
    /// A compare-and-swap condition did not hold.
    #[error(
        "compare-and-swap failed on key {}: expected {expected:?}, found version {found:?}",
        printable_key(key)
    )]
    Conflict {
        /// The key.
        key: Vec<u8>,
        /// What the batch expected.
        expected: Expect,
        /// The version found (`None`: absent).
        found: Option<u64>,
    },
    /// The batch is malformed.
    #[error("invalid batch: {0}")]
    InvalidBatch(BatchProblem),
}

/// What is wrong with a malformed batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum BatchProblem {
    /// No operations.
    #[error("empty batch")]
    Empty,
    /// More than [`MAX_BATCH_OPS`] operations.
    #[error("{ops} operations, more than {MAX_BATCH_OPS}")]
    TooManyOps {
        /// Operations in the batch.
        ops: usize,
    },
    /// A key longer than [`MAX_KEY_BYTES`].
    #[error("key of {len} bytes, more than {MAX_KEY_BYTES}")]
    KeyTooLong {
        /// Its length.
        len: usize,
    },
    /// A value larger than [`MAX_VALUE_BYTES`].
    #[error("value of {len} bytes, more than {MAX_VALUE_BYTES}")]
    ValueTooLarge {
        /// Its length.
        len: usize,
    },
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

/// Checks a batch's shape (size limits) without looking at any state.
pub fn validate_batch(ops: &[KvOp]) -> Result<(), KvError> {
    if ops.is_empty() {
        return Err(KvError::InvalidBatch(BatchProblem::Empty));
    }
    if ops.len() > MAX_BATCH_OPS {
        return Err(KvError::InvalidBatch(BatchProblem::TooManyOps {
            ops: ops.len(),
        }));
    }
    for op in ops {
        if op.key().len() > MAX_KEY_BYTES {
            return Err(KvError::InvalidBatch(BatchProblem::KeyTooLong {
                len: op.key().len(),
            }));
        }
        if let KvOp::Put { value, .. } = op
            && value.len() > MAX_VALUE_BYTES
        {
            return Err(KvError::InvalidBatch(BatchProblem::ValueTooLarge {
                len: value.len(),
            }));
        }
    }
    Ok(())
}

/// Checks a batch's shape and conditions against `current` (the version of a key in the state
/// before the batch, `None` if absent). Same rules as the data plane's `check_batch`.
pub fn check_batch(
    ops: &[KvOp],
    mut current: impl FnMut(&[u8]) -> Option<u64>,
) -> Result<(), KvError> {
    validate_batch(ops)?;
    for op in ops {
        let found = current(op.key());
        let ok = match op.expect() {
            Expect::Any => true,
            Expect::Absent => found.is_none(),
            Expect::Version(v) => found == Some(v),
        };
        if !ok {
            return Err(KvError::Conflict {
                key: op.key().to_vec(),
                expected: op.expect(),
                found,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn put(key: &[u8], expect: Expect) -> KvOp {
        KvOp::Put {
            key: key.to_vec(),
            value: b"v".to_vec(),
            expect,
        }
    }

    #[test]
    fn conditions_are_checked_against_the_state_before_the_batch() {
        let state: BTreeMap<&[u8], u64> = [(&b"a"[..], 3)].into();
        let lookup = |k: &[u8]| state.get(k).copied();
        check_batch(
            &[put(b"a", Expect::Version(3)), put(b"b", Expect::Absent)],
            lookup,
        )
        .unwrap();
        // The same key twice: both conditions see the state before the batch.
        check_batch(
            &[put(b"b", Expect::Absent), put(b"b", Expect::Absent)],
            lookup,
        )
        .unwrap();
        let err = check_batch(&[put(b"a", Expect::Absent)], lookup).unwrap_err();
        assert_eq!(
            err,
            KvError::Conflict {
                key: b"a".to_vec(),
                expected: Expect::Absent,
                found: Some(3)
            }
        );
        let err = check_batch(&[put(b"z", Expect::Version(1))], lookup).unwrap_err();
        assert!(
            matches!(err, KvError::Conflict { found: None, .. }),
            "{err}"
        );
    }

    #[test]
    fn malformed_batches_are_refused_with_the_reason() {
        let none = |_: &[u8]| None;
        assert_eq!(
            check_batch(&[], none),
            Err(KvError::InvalidBatch(BatchProblem::Empty))
        );
        let long = vec![0u8; MAX_KEY_BYTES + 1];
        assert_eq!(
            check_batch(&[put(&long, Expect::Any)], none),
            Err(KvError::InvalidBatch(BatchProblem::KeyTooLong {
                len: MAX_KEY_BYTES + 1
            }))
        );
        let big = KvOp::Put {
            key: b"k".to_vec(),
            value: vec![0; MAX_VALUE_BYTES + 1],
            expect: Expect::Any,
        };
        assert!(matches!(
            check_batch(&[big], none),
            Err(KvError::InvalidBatch(BatchProblem::ValueTooLarge { .. }))
        ));
    }

    #[test]
    fn errors_print_binary_keys_readably() {
        let err = KvError::Conflict {
            key: b"v/\x01a".to_vec(),
            expected: Expect::Absent,
            found: Some(2),
        };
        assert!(err.to_string().contains("v/\\x01a"), "{err}");
    }
}
