//! The metadata ring: which shard (raft group) owns a key, by consistent hashing with virtual
//! nodes.
//!
//! Every shard places [`VNODES_PER_SHARD`] tokens on a 64-bit ring; a key belongs to the shard
//! of the first token at or after the key's hash (wrapping). Adding a shard to `n` moves only
//! the keys its new tokens take over, about `1/(n+1)` of them, all to the new shard; removing
//! one moves only its own keys. Virtual nodes keep shards within a few percent of an equal share.
//! A hash ring rather than jump hashing because shards leave the ring in any order (a node down
//! for 30 minutes takes its shards out), while jump hashing can only drop the last bucket.
//!
//! Batches must stay inside one shard, so callers route by the key's *routing prefix* (the
//! vdisk prefix of a metadata key), never by the full key.
//!
//! The hash is part of the cluster's persistent contract (every node must compute the same
//! owner, across versions): FNV-1a 64 followed by the splitmix64 finalizer, both fixed here,
//! never `std`'s `DefaultHasher` (whose output may change between Rust releases). A change of
//! hash is a new [`RING_HASH_VERSION`].

use std::collections::BTreeMap;

use crate::GroupId;

/// Version of the token and key hash below; stored with the ring in the config store.
pub const RING_HASH_VERSION: u32 = 1;
/// Tokens per shard: enough that shard loads stay within a few percent of each other.
pub const VNODES_PER_SHARD: u32 = 256;

/// FNV-1a 64 of `bytes`, then splitmix64's finalizer (FNV alone spreads short keys poorly).
pub fn ring_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

fn token(shard: GroupId, vnode: u32) -> u64 {
    let mut bytes = [0u8; 12];
    bytes[..8].copy_from_slice(&shard.to_le_bytes());
    bytes[8..].copy_from_slice(&vnode.to_le_bytes());
    ring_hash(&bytes)
}

/// A consistent-hash ring of metadata shards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetadataRing {
    /// token → shard. On the rare token collision the lower shard id keeps the token, so every
    /// node builds the same ring from the same members whatever the order of insertion.
    tokens: BTreeMap<u64, GroupId>,
}

impl MetadataRing {
    /// An empty ring (owns nothing).
    pub fn new() -> Self {
        Self::default()
    }

    /// A ring of `shards`.
    pub fn with_shards(shards: impl IntoIterator<Item = GroupId>) -> Self {
        let mut ring = Self::new();
        for s in shards {
            ring.add_shard(s);
        }
        ring
    }

    /// Places `shard`'s tokens on the ring (no effect if it is already there).
    pub fn add_shard(&mut self, shard: GroupId) {
        for v in 0..VNODES_PER_SHARD {
            let t = token(shard, v);
            let owner = self.tokens.entry(t).or_insert(shard);
            *owner = (*owner).min(shard);
        }
    }

    /// Takes `shard`'s tokens off the ring.
    pub fn remove_shard(&mut self, shard: GroupId) {
        self.tokens.retain(|_, s| *s != shard);
        // Re-add the others whose colliding tokens the removed shard held.
        let others: std::collections::BTreeSet<GroupId> = self.tokens.values().copied().collect();
        for s in others {
            self.add_shard(s);
        }
    }

    /// The shards on the ring, in id order.
    pub fn shards(&self) -> Vec<GroupId> {
        let set: std::collections::BTreeSet<GroupId> = self.tokens.values().copied().collect();
        set.into_iter().collect()
    }

    /// The shard owning `routing_key` (`None`: the ring is empty).
    pub fn shard_for(&self, routing_key: &[u8]) -> Option<GroupId> {
        let h = ring_hash(routing_key);
        self.tokens
            .range(h..)
            .next()
            .or_else(|| self.tokens.iter().next())
            .map(|(_, s)| *s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: u32) -> impl Iterator<Item = Vec<u8>> {
        (0..n).map(|i| format!("vdisk/{i}/").into_bytes())
    }

    #[test]
    fn growing_four_shards_to_five_moves_about_a_fifth_of_the_keys_all_to_the_new_one() {
        let four = MetadataRing::with_shards(1..=4);
        let five = MetadataRing::with_shards(1..=5);
        let n = 100_000;
        let mut moved = 0;
        let mut load = BTreeMap::<GroupId, u32>::new();
        for key in keys(n) {
            let (before, after) = (four.shard_for(&key).unwrap(), five.shard_for(&key).unwrap());
            if before != after {
                moved += 1;
                assert_eq!(after, 5, "a key moved between old shards");
            }
            *load.entry(after).or_default() += 1;
        }
        let fraction = f64::from(moved) / f64::from(n);
        eprintln!("4 -> 5 shards: {fraction:.4} of {n} keys moved; load {load:?}");
        assert!((0.17..=0.23).contains(&fraction), "moved {fraction}");
        for (shard, keys) in load {
            let share = f64::from(keys) / f64::from(n);
            assert!(
                (0.15..=0.25).contains(&share),
                "shard {shard} holds {share}"
            );
        }
    }

    #[test]
    fn removing_a_shard_moves_only_its_keys_and_order_does_not_matter() {
        let mut ring = MetadataRing::with_shards([3, 1, 2, 4, 5]);
        assert_eq!(
            ring,
            MetadataRing::with_shards(1..=5),
            "same members, same ring"
        );
        let before: Vec<_> = keys(20_000).map(|k| ring.shard_for(&k).unwrap()).collect();
        ring.remove_shard(2);
        assert_eq!(ring, MetadataRing::with_shards([1, 3, 4, 5]));
        assert_eq!(ring.shards(), vec![1, 3, 4, 5]);
        for (key, old) in keys(20_000).zip(before) {
            let new = ring.shard_for(&key).unwrap();
            assert!(old == new || old == 2, "key owned by {old} moved to {new}");
            assert_ne!(new, 2);
        }
    }

    #[test]
    fn an_empty_ring_owns_nothing_and_the_hash_is_pinned() {
        assert_eq!(MetadataRing::new().shard_for(b"x"), None);
        // Pinned values: a change here changes every cluster's placement (bump RING_HASH_VERSION).
        assert_eq!(ring_hash(b""), 0xf52a15e9a9b5e89b);
        assert_eq!(ring_hash(b"vdisk/1/"), 0xd1a5d7addd8a6d03);
    }
}
