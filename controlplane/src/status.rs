//! How control-plane errors become gRPC statuses, and the metadata both ends read off them.
//!
//! Three questions a client asks of a failed call decide the shape:
//!
//! * *May I retry?* `UNAVAILABLE` carries [`RETRYABLE_KEY`]: `1` when nothing was proposed
//!   (no leader elected yet, connection refused, group shutting down), `0` when a batch may
//!   have been proposed but its commit was not seen (quorum lost): a blind retry of a non-CAS
//!   write could then apply twice. A status without the key (a transport failure raised by
//!   tonic on the client side) is retryable.
//! * *Where is the leader?* Nodes forward to the leader themselves (one hop, marked with
//!   [`FORWARDED_KEY`] so a stale view cannot loop); the leader's address is still named in
//!   [`crate::group::LEADER_METADATA_KEY`].
//! * *Which CAS condition failed?* `ABORTED` from the metadata service carries the key,
//!   expected and found versions (see `proto/cairn/v1/metadata.proto`).

use tonic::metadata::{MetadataValue, errors::InvalidMetadataValue};

use crate::GroupId;
use crate::config_store::ConfigError;
use crate::group::GroupError;
use crate::kv::{Expect, KvError};

/// Metadata key saying whether an UNAVAILABLE call may be retried blindly (`1`) or not (`0`).
pub const RETRYABLE_KEY: &str = "cairn-retryable";
/// Metadata key marking a call one node forwarded to another (never forwarded again).
pub const FORWARDED_KEY: &str = "cairn-forwarded";
/// Binary metadata key: the key whose compare-and-swap condition failed.
pub const CONFLICT_KEY_KEY: &str = "cairn-conflict-key-bin";
/// Metadata key: the condition that failed (`any`, `absent` or a version).
pub const CONFLICT_EXPECTED_KEY: &str = "cairn-conflict-expected";
/// Metadata key: the version found (`absent` or a version).
pub const CONFLICT_FOUND_KEY: &str = "cairn-conflict-found";

/// A failed call on a control-plane service, before it becomes a [`tonic::Status`].
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Another node leads the group: forward the call there (unless it was forwarded already).
    #[error("node {node_id} does not lead raft group {group_id}; its leader is at {leader_addr}")]
    NotLeader {
        /// The group.
        group_id: GroupId,
        /// The answering node.
        node_id: u64,
        /// The leader's control-plane address.
        leader_addr: String,
    },
    /// Anything else, already a status.
    #[error("{}", .0.message())]
    Status(tonic::Status),
}

impl From<tonic::Status> for ServeError {
    fn from(s: tonic::Status) -> Self {
        ServeError::Status(s)
    }
}

impl From<ServeError> for tonic::Status {
    fn from(e: ServeError) -> Self {
        match e {
            ServeError::Status(s) => s,
            // Reached only when the call was forwarded already: a stale leader view.
            e @ ServeError::NotLeader { .. } => {
                retryable(tonic::Status::unavailable(e.to_string()))
            }
        }
    }
}

/// Marks an UNAVAILABLE status as safe to retry.
pub fn retryable(mut status: tonic::Status) -> tonic::Status {
    status
        .metadata_mut()
        .insert(RETRYABLE_KEY, MetadataValue::from_static("1"));
    status
}

fn not_retryable(mut status: tonic::Status) -> tonic::Status {
    status
        .metadata_mut()
        .insert(RETRYABLE_KEY, MetadataValue::from_static("0"));
    status
}

/// Whether a failed call may be retried on the same or another node without risk of applying
/// twice.
pub fn is_retryable(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable
        && status
            .metadata()
            .get(RETRYABLE_KEY)
            .is_none_or(|v| v.as_bytes() != b"0")
}

/// A raft group's error as the answering node `self_addr` should report it.
pub fn group_error(e: GroupError, self_addr: &str) -> ServeError {
    match e {
        GroupError::ForwardToLeader {
            group_id,
            node_id,
            leader_addr: Some(leader_addr),
            ..
        } if leader_addr != self_addr => ServeError::NotLeader {
            group_id,
            node_id,
            leader_addr,
        },
        GroupError::ForwardToLeader {
            group_id, node_id, ..
        } => ServeError::Status(retryable(tonic::Status::unavailable(format!(
            "raft group {group_id} has no leader that node {node_id} knows of (election under way or quorum lost)"
        )))),
        GroupError::Timeout {
            group_id,
            op,
            timeout,
        } => ServeError::Status(not_retryable(tonic::Status::unavailable(format!(
            "raft group {group_id}: {op} not committed within {timeout:?}: quorum lost or unreachable (it may still commit)"
        )))),
        e @ GroupError::ShutDown { .. } => {
            ServeError::Status(retryable(tonic::Status::unavailable(e.to_string())))
        }
        GroupError::Rejected {
            source:
                KvError::Conflict {
                    key,
                    expected,
                    found,
                },
            group_id,
        } => {
            let source = KvError::Conflict {
                key,
                expected,
                found,
            };
            let mut status = tonic::Status::aborted(format!("raft group {group_id}: {source}"));
            if let KvError::Conflict {
                key,
                expected,
                found,
            } = source
            {
                let md = status.metadata_mut();
                md.insert_bin(
                    CONFLICT_KEY_KEY,
                    tonic::metadata::MetadataValue::from_bytes(&key),
                );
                let _ = insert_ascii(md, CONFLICT_EXPECTED_KEY, &expect_text(expected));
                let found = found.map_or_else(|| "absent".to_string(), |v| v.to_string());
                let _ = insert_ascii(md, CONFLICT_FOUND_KEY, &found);
            }
            ServeError::Status(status)
        }
        e => ServeError::Status(e.into()),
    }
}

fn insert_ascii(
    md: &mut tonic::metadata::MetadataMap,
    key: &'static str,
    value: &str,
) -> Result<(), InvalidMetadataValue> {
    md.insert(key, value.parse()?);
    Ok(())
}

/// Text form of a condition in [`CONFLICT_EXPECTED_KEY`].
pub fn expect_text(e: Expect) -> String {
    match e {
        Expect::Any => "any".into(),
        Expect::Absent => "absent".into(),
        Expect::Version(v) => v.to_string(),
    }
}

/// Parses [`expect_text`].
pub fn parse_expect(s: &str) -> Option<Expect> {
    match s {
        "any" => Some(Expect::Any),
        "absent" => Some(Expect::Absent),
        v => v.parse().ok().map(Expect::Version),
    }
}

/// A config store error as the answering node `self_addr` should report it.
pub fn config_error(e: ConfigError, self_addr: &str) -> ServeError {
    match e {
        ConfigError::Group(g) => group_error(g, self_addr),
        e => ServeError::Status(e.into()),
    }
}
