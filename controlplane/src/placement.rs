//! Where a raft group's voters go: rendezvous (highest-random-weight) hashing with failure-domain
//! awareness.
//!
//! Every group ranks every node by `hash(group, node)`; its ideal voters are the best-ranked
//! nodes taken so that no two share a rack while other racks are left, then no two share a
//! block while other blocks are left (the Zookeeper/Cassandra block awareness of the seeds).
//! Adding a node changes a group's ideal set only if the new node ranks among its best, so
//! growing from N to N+1 nodes moves about `voters/(N+1)` of the voter slots — the minimum —
//! and removing a node moves only the slots it held.
//!
//! [`plan_voters`] turns the ideal set into the next voter set of a live group: only nodes that
//! are up and caught up are promoted, a voter that is down is replaced by the best-ranked
//! caught-up node. A leader that is not among the ideal voters votes itself out like any other
//! node once its replacement has caught up: openraft keeps it leading until the new membership
//! commits, then it steps down to a learner and the new voters elect a leader among themselves.

use std::collections::BTreeSet;

use crate::ring::ring_hash;
use crate::{GroupId, NodeId};

/// A node as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePlace {
    /// The node.
    pub node_id: NodeId,
    /// Block (chassis); empty: unknown (a domain of its own).
    pub block: String,
    /// Rack; empty: unknown (a domain of its own).
    pub rack: String,
    /// Reachable recently.
    pub up: bool,
}

/// The rank of `node` for `group` (higher is better).
pub fn rank(group: GroupId, node: NodeId) -> u64 {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&group.to_le_bytes());
    key[8..].copy_from_slice(&node.to_le_bytes());
    ring_hash(&key)
}

/// The failure domain of a node at one level; an unknown domain is the node's own.
fn domain(n: &NodePlace, rack_level: bool) -> String {
    let d = if rack_level { &n.rack } else { &n.block };
    if d.is_empty() {
        format!("\u{0}node{}", n.node_id)
    } else {
        d.clone()
    }
}

/// The ideal `target` voters of `group` among `nodes` (all of them, up or not), best first.
pub fn ideal_voters(group: GroupId, nodes: &[NodePlace], target: usize) -> Vec<NodeId> {
    let mut ranked: Vec<&NodePlace> = nodes.iter().collect();
    ranked.sort_by_key(|n| std::cmp::Reverse((rank(group, n.node_id), n.node_id)));
    let mut chosen: Vec<&NodePlace> = Vec::new();
    // Pass 0: new rack and new block; pass 1: new block; pass 2: anything.
    for pass in 0..3 {
        for n in &ranked {
            if chosen.len() == target {
                return chosen.iter().map(|n| n.node_id).collect();
            }
            if chosen.iter().any(|c| c.node_id == n.node_id) {
                continue;
            }
            let new_rack = chosen.iter().all(|c| domain(c, true) != domain(n, true));
            let new_block = chosen.iter().all(|c| domain(c, false) != domain(n, false));
            let fits = match pass {
                0 => new_rack && new_block,
                1 => new_block,
                _ => true,
            };
            if fits {
                chosen.push(n);
            }
        }
    }
    chosen.iter().map(|n| n.node_id).collect()
}

/// The voter set a group led by `leader` should move to next.
///
/// * `nodes`: every recorded node; `voters`: the current voters;
/// * `caught_up(id)`: the member's log is close enough to the leader's to vote.
///
/// Ideal voters that are up and either voters already or caught up are kept or promoted; seats
/// left over go to current voters that are up, then to caught-up nodes, best rank first; a voter
/// that is down keeps its seat only while no caught-up node can take it. The leader keeps its
/// seat unless the set is complete without it. Returns the current set when nothing better is
/// possible.
pub fn plan_voters(
    group: GroupId,
    nodes: &[NodePlace],
    voters: &BTreeSet<NodeId>,
    leader: NodeId,
    target: usize,
    caught_up: impl Fn(NodeId) -> bool,
) -> BTreeSet<NodeId> {
    let up: Vec<NodePlace> = nodes.iter().filter(|n| n.up).cloned().collect();
    let recorded = |id: NodeId| nodes.iter().any(|n| n.node_id == id);
    let is_up = |id: NodeId| up.iter().any(|n| n.node_id == id);
    let eligible = |id: NodeId| is_up(id) && (voters.contains(&id) || caught_up(id));
    let target = target.max(1);
    let mut desired: BTreeSet<NodeId> = BTreeSet::new();
    let by_rank = |ids: &mut Vec<NodeId>| {
        ids.sort_by_key(|&id| std::cmp::Reverse((rank(group, id), id)));
    };
    for id in ideal_voters(group, &up, target) {
        if desired.len() < target && eligible(id) {
            desired.insert(id);
        }
    }
    let mut rest: Vec<NodeId> = voters
        .iter()
        .copied()
        .filter(|&id| recorded(id) && is_up(id))
        .collect();
    by_rank(&mut rest);
    let mut others: Vec<NodeId> = up
        .iter()
        .map(|n| n.node_id)
        .filter(|&id| caught_up(id))
        .collect();
    by_rank(&mut others);
    // Voters that are down, kept only if nobody can replace them (a seat is never left empty
    // just because its holder is away: that would shrink the quorum's margin further).
    let mut down: Vec<NodeId> = voters
        .iter()
        .copied()
        .filter(|&id| recorded(id) && !is_up(id))
        .collect();
    by_rank(&mut down);
    for id in rest.into_iter().chain(others).chain(down) {
        if desired.len() >= target {
            break;
        }
        desired.insert(id);
    }
    if desired.len() < target {
        desired.insert(leader);
    }
    desired
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: NodeId, block: &str, rack: &str) -> NodePlace {
        NodePlace {
            node_id: id,
            block: block.into(),
            rack: rack.into(),
            up: true,
        }
    }

    fn plain(n: u64) -> Vec<NodePlace> {
        (1..=n).map(|i| node(i, "", "")).collect()
    }

    #[test]
    fn voters_spread_over_blocks_and_racks() {
        // Two nodes in each of three blocks, blocks a and b in one rack.
        let nodes = vec![
            node(1, "a", "r1"),
            node(2, "a", "r1"),
            node(3, "b", "r1"),
            node(4, "b", "r1"),
            node(5, "c", "r2"),
            node(6, "c", "r2"),
        ];
        for g in 0..64 {
            let v = ideal_voters(g, &nodes, 3);
            let blocks: BTreeSet<&str> = v
                .iter()
                .map(|id| nodes[*id as usize - 1].block.as_str())
                .collect();
            let racks: BTreeSet<&str> = v
                .iter()
                .map(|id| nodes[*id as usize - 1].rack.as_str())
                .collect();
            assert_eq!(blocks.len(), 3, "group {g}: {v:?}");
            assert_eq!(racks.len(), 2, "group {g}: {v:?}");
        }
    }

    #[test]
    fn growing_four_to_five_moves_about_a_fifth_of_the_seats() {
        let groups = 2000u64;
        let (four, five) = (plain(4), plain(5));
        let mut moved = 0;
        for g in 0..groups {
            let a: BTreeSet<_> = ideal_voters(g, &four, 3).into_iter().collect();
            let b: BTreeSet<_> = ideal_voters(g, &five, 3).into_iter().collect();
            moved += a.difference(&b).count();
            // Only the new node ever takes a seat.
            assert!(b.difference(&a).all(|&id| id == 5));
        }
        let fraction = moved as f64 / (groups * 3) as f64;
        eprintln!(
            "4 -> 5 nodes: {fraction:.4} of {} voter seats moved",
            groups * 3
        );
        assert!((0.17..0.23).contains(&fraction), "{fraction}");
    }

    #[test]
    fn a_down_voter_is_replaced_and_comes_back() {
        let mut nodes = plain(4);
        let g = 7;
        let ideal: BTreeSet<NodeId> = ideal_voters(g, &nodes, 3).into_iter().collect();
        let leader = *ideal.iter().next().unwrap();
        let all_caught_up = |_| true;
        assert_eq!(
            plan_voters(g, &nodes, &ideal, leader, 3, all_caught_up),
            ideal
        );
        let lost = *ideal.iter().find(|&&id| id != leader).unwrap();
        nodes[lost as usize - 1].up = false;
        let replaced = plan_voters(g, &nodes, &ideal, leader, 3, all_caught_up);
        assert_eq!(replaced.len(), 3);
        assert!(!replaced.contains(&lost) && replaced.contains(&leader));
        // Nobody caught up to take the seat: the down voter keeps it.
        let none = |id| ideal.contains(&id);
        assert_eq!(plan_voters(g, &nodes, &ideal, leader, 3, none), ideal);
        // It returns (and has caught up): placement goes back to the ideal set.
        nodes[lost as usize - 1].up = true;
        assert_eq!(
            plan_voters(g, &nodes, &replaced, leader, 3, all_caught_up),
            ideal
        );
    }

    #[test]
    fn a_leader_outside_the_ideal_set_steps_aside_once_others_caught_up() {
        let nodes = plain(5);
        let g = 3;
        let ideal: BTreeSet<NodeId> = ideal_voters(g, &nodes, 3).into_iter().collect();
        let outsider = (1..=5).find(|id| !ideal.contains(id)).unwrap();
        let voters = BTreeSet::from([outsider]);
        // Growing 1 -> 3 with nobody caught up yet: nothing changes.
        assert_eq!(
            plan_voters(g, &nodes, &voters, outsider, 3, |_| false),
            voters
        );
        // Only one ideal node caught up: the leader keeps its seat in the (partial) plan.
        let one = *ideal.iter().next().unwrap();
        let partial = plan_voters(g, &nodes, &voters, outsider, 3, |id| id == one);
        assert_eq!(partial, BTreeSet::from([one, outsider]));
        // Everyone caught up: the ideal set, without the leader.
        assert_eq!(
            plan_voters(g, &nodes, &voters, outsider, 3, |_| true),
            ideal
        );
    }
}
