//! Linearizability checking of recorded histories, and the model of one metadata key.
//!
//! A history is what concurrent clients saw: for each operation its input, its output, and when
//! it was invoked and when it completed (one monotonic clock). An operation whose outcome is
//! unknown (timed out, UNAVAILABLE after it may have been proposed) is *indeterminate*: it may
//! take effect at any moment after its invocation, or never, so it gets no completion time.
//!
//! [`check`] decides whether some total order of the operations (a) respects real time — an
//! operation that completed before another was invoked comes first — and (b) is a legal
//! sequential execution of a [`Model`]. It is the search of Wing & Gong with the memoization of
//! Lowe ("Testing for linearizability", 2017), the algorithm of the porcupine checker: walk the
//! invocation/completion events in time order, tentatively linearize an invoked operation when
//! the model accepts it, backtrack at a completion whose operation is not yet linearized, and
//! never revisit a (set of linearized operations, model state) pair. An indeterminate operation
//! that never took effect is linearized after everything else, where it cannot be observed.
//!
//! Models may be nondeterministic (the version an indeterminate write got is unknown until a
//! read shows it): [`Model::step`] returns every possible next state and the search carries the
//! set of them, which keeps it a plain deterministic search over sets.
//!
//! Linearizability is local (Herlihy & Wing): a history of independent objects is linearizable
//! iff the history of each object is, so callers split a history per key before checking,
//! which keeps every search small.
//!
//! [`VersionedRegister`] is the model of one key of the metadata service (`crate::kv`): a value
//! with the version of the batch that wrote it, conditional puts and deletes, and reads that
//! return value and version.

use std::collections::HashSet;
use std::hash::Hash;

use crate::kv::Expect;

/// A sequential specification of an object.
pub trait Model {
    /// The object's state (small: it is cloned and hashed at every step of the search).
    type State: Clone + Eq + Hash + Ord + std::fmt::Debug;
    /// What an operation asks.
    type Input: std::fmt::Debug;
    /// What an operation answered.
    type Output: std::fmt::Debug;

    /// The state before any operation.
    fn init(&self) -> Self::State;

    /// Every state the object may be in after `input` took effect in `state` and answered
    /// `output`; empty when that answer is impossible in `state`.
    fn step(
        &self,
        state: &Self::State,
        input: &Self::Input,
        output: &Self::Output,
    ) -> Vec<Self::State>;
}

/// One recorded operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation<I, O> {
    /// Which client ran it (for reports only).
    pub client: usize,
    /// What it asked.
    pub input: I,
    /// What it answered (for an indeterminate operation, whatever the model reads as unknown).
    pub output: O,
    /// When it was invoked, ns on the history's clock.
    pub call_ns: u64,
    /// When it completed, ns; `None`: indeterminate (may take effect any time after
    /// `call_ns`, or never).
    pub return_ns: Option<u64>,
}

/// Why a history was not found linearizable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// No order of the operations explains the history.
    #[error(
        "not linearizable: at most {} of {ops} operations can be ordered (operations {linearized:?}), operation {stuck} cannot",
        linearized.len()
    )]
    NotLinearizable {
        /// Operations in the history.
        ops: usize,
        /// Indices (into the history) of the longest sequence the search could linearize, in
        /// its order.
        linearized: Vec<usize>,
        /// An operation that completed without any legal place in that sequence.
        stuck: usize,
    },
    /// The search gave up after `steps` steps (raise the budget or split the history).
    #[error("undecided after {steps} search steps")]
    Undecided {
        /// Steps taken.
        steps: u64,
    },
    /// An operation completed before it was invoked.
    #[error("operation {op} completes at {return_ns} ns, before its invocation at {call_ns} ns")]
    ReturnBeforeCall {
        /// Index of the operation.
        op: usize,
        /// Its invocation.
        call_ns: u64,
        /// Its completion.
        return_ns: u64,
    },
}

/// One event of the history: an operation's invocation or completion.
#[derive(Debug, Clone, Copy)]
struct Event {
    op: usize,
    is_call: bool,
}

const NIL: usize = usize::MAX;

/// Events in time order as a doubly linked list from which an operation's two events are
/// lifted while it is tentatively linearized and put back (in reverse order) on backtracking.
struct EventList {
    events: Vec<Event>,
    /// Index of each operation's completion event.
    return_of: Vec<usize>,
    next: Vec<usize>,
    prev: Vec<usize>,
    head: usize,
}

impl EventList {
    fn new<I, O>(history: &[Operation<I, O>]) -> Result<Self, CheckError> {
        let mut timed: Vec<(u64, bool, usize)> = Vec::with_capacity(history.len() * 2);
        for (i, op) in history.iter().enumerate() {
            let return_ns = op.return_ns.unwrap_or(u64::MAX);
            if return_ns < op.call_ns {
                return Err(CheckError::ReturnBeforeCall {
                    op: i,
                    call_ns: op.call_ns,
                    return_ns,
                });
            }
            // At equal times invocations come first: overlap is the lenient reading.
            timed.push((op.call_ns, false, i));
            timed.push((return_ns, true, i));
        }
        timed.sort_unstable();
        let events: Vec<Event> = timed
            .iter()
            .map(|&(_, is_return, op)| Event {
                op,
                is_call: !is_return,
            })
            .collect();
        let n = events.len();
        let head = n;
        let mut next: Vec<usize> = (1..=n).collect();
        next.push(if n == 0 { NIL } else { 0 });
        if let Some(last) = n.checked_sub(1) {
            next[last] = NIL;
        }
        let mut prev: Vec<usize> = (0..n).map(|i| if i == 0 { head } else { i - 1 }).collect();
        prev.push(NIL);
        let mut return_of = vec![NIL; history.len()];
        for (i, e) in events.iter().enumerate() {
            if !e.is_call {
                return_of[e.op] = i;
            }
        }
        Ok(Self {
            events,
            return_of,
            next,
            prev,
            head,
        })
    }

    fn unlink(&mut self, i: usize) {
        let (p, n) = (self.prev[i], self.next[i]);
        self.next[p] = n;
        if n != NIL {
            self.prev[n] = p;
        }
    }

    fn relink(&mut self, i: usize) {
        let (p, n) = (self.prev[i], self.next[i]);
        self.next[p] = i;
        if n != NIL {
            self.prev[n] = i;
        }
    }

    /// Takes a call event and its completion out of the list.
    fn lift(&mut self, call: usize) {
        let ret = self.return_of[self.events[call].op];
        self.unlink(call);
        self.unlink(ret);
    }

    /// Undoes [`EventList::lift`] (the last lift not yet undone).
    fn unlift(&mut self, call: usize) {
        let ret = self.return_of[self.events[call].op];
        self.relink(ret);
        self.relink(call);
    }
}

/// Decides whether `history` is linearizable for `model`, giving up after `max_steps` search
/// steps.
pub fn check<M: Model>(
    model: &M,
    history: &[Operation<M::Input, M::Output>],
    max_steps: u64,
) -> Result<(), CheckError> {
    let mut list = EventList::new(history)?;
    let words = history.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut state: Vec<M::State> = vec![model.init()];
    let mut seen: HashSet<(Vec<u64>, Vec<M::State>)> = HashSet::new();
    // (call event, state before it) of every tentatively linearized operation.
    let mut stack: Vec<(usize, Vec<M::State>)> = Vec::new();
    let mut longest: Vec<usize> = Vec::new();
    let mut steps = 0u64;
    let mut event = list.next[list.head];
    while list.next[list.head] != NIL {
        steps += 1;
        if steps > max_steps {
            return Err(CheckError::Undecided { steps: max_steps });
        }
        let Event { op, is_call } = list.events[event];
        if is_call {
            let o = &history[op];
            let mut after: Vec<M::State> = state
                .iter()
                .flat_map(|s| model.step(s, &o.input, &o.output))
                .collect();
            after.sort_unstable();
            after.dedup();
            if !after.is_empty() {
                linearized[op / 64] |= 1 << (op % 64);
                if seen.insert((linearized.clone(), after.clone())) {
                    stack.push((event, std::mem::replace(&mut state, after)));
                    list.lift(event);
                    if stack.len() > longest.len() {
                        longest = stack.iter().map(|&(e, _)| list.events[e].op).collect();
                    }
                    event = list.next[list.head];
                    continue;
                }
                linearized[op / 64] &= !(1 << (op % 64));
            }
            event = list.next[event];
        } else {
            // A completion whose operation has no place yet: undo the last choice.
            let Some((call, before)) = stack.pop() else {
                return Err(CheckError::NotLinearizable {
                    ops: history.len(),
                    linearized: longest,
                    stuck: op,
                });
            };
            let undone = list.events[call].op;
            linearized[undone / 64] &= !(1 << (undone % 64));
            state = before;
            list.unlift(call);
            event = list.next[call];
        }
    }
    Ok(())
}

/// The state of one metadata key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Register {
    /// The key does not exist.
    Absent,
    /// The key holds `value`, written at `version` (`None`: by an indeterminate write whose
    /// version no answer has shown yet).
    Present {
        /// The value (histories write unique values, so a value names its write).
        value: u64,
        /// The version of the batch that wrote it.
        version: Option<u64>,
    },
}

/// An operation on one metadata key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterInput {
    /// Read value and version.
    Get,
    /// Write `value` if `expect` holds.
    Put {
        /// The value.
        value: u64,
        /// The condition.
        expect: Expect,
    },
    /// Remove the key if `expect` holds.
    Delete {
        /// The condition.
        expect: Expect,
    },
}

/// What an operation on one metadata key answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterOutput {
    /// A read's answer: value and version, or absent.
    Read(Option<(u64, u64)>),
    /// A write was applied at `version`.
    Written {
        /// The batch's version.
        version: u64,
    },
    /// A write's condition failed; the key was at `found` (`None`: absent).
    Conflict {
        /// The version found.
        found: Option<u64>,
    },
    /// Unknown (indeterminate write).
    Unknown,
}

/// One metadata key as the metadata service promises it: versions of successive writes of a key
/// increase (they are versions of its shard's batches), a conditional write applies only when
/// its condition holds, a failed condition names the version it found, reads see the latest
/// write.
#[derive(Debug, Clone, Copy, Default)]
pub struct VersionedRegister;

impl Register {
    fn version(&self) -> Option<u64> {
        match self {
            Register::Absent => None,
            Register::Present { version, .. } => *version,
        }
    }

    /// Whether `expect` holds here (`None`: depends on a version not known yet).
    fn holds(&self, expect: Expect) -> Option<bool> {
        match (expect, self) {
            (Expect::Any, _) => Some(true),
            (Expect::Absent, s) => Some(*s == Register::Absent),
            (Expect::Version(_), Register::Absent) => Some(false),
            (Expect::Version(e), Register::Present { version, .. }) => version.map(|v| v == e),
        }
    }

    /// This state if it agrees with a reported version (`None`: absent), with an unknown
    /// version learned from it.
    fn observed(&self, found: Option<u64>) -> Option<Register> {
        match (self, found) {
            (Register::Absent, None) => Some(Register::Absent),
            (Register::Present { value, version }, Some(f)) if version.is_none_or(|v| v == f) => {
                Some(Register::Present {
                    value: *value,
                    version: Some(f),
                })
            }
            _ => None,
        }
    }
}

fn written(input: &RegisterInput, version: Option<u64>) -> Register {
    match *input {
        RegisterInput::Put { value, .. } => Register::Present { value, version },
        _ => Register::Absent,
    }
}

impl Model for VersionedRegister {
    type State = Register;
    type Input = RegisterInput;
    type Output = RegisterOutput;

    fn init(&self) -> Register {
        Register::Absent
    }

    fn step(&self, s: &Register, input: &RegisterInput, output: &RegisterOutput) -> Vec<Register> {
        let expect = match *input {
            RegisterInput::Get => {
                return match *output {
                    RegisterOutput::Read(None) => s.observed(None).into_iter().collect(),
                    RegisterOutput::Read(Some((value, version))) => match s {
                        Register::Present { value: v, .. } if *v == value => {
                            s.observed(Some(version)).into_iter().collect()
                        }
                        _ => Vec::new(),
                    },
                    _ => Vec::new(),
                };
            }
            RegisterInput::Put { expect, .. } | RegisterInput::Delete { expect } => expect,
        };
        match *output {
            RegisterOutput::Written { version } => {
                let newer = s.version().is_none_or(|v| version > v);
                if s.holds(expect) != Some(false) && newer {
                    vec![written(input, Some(version))]
                } else {
                    Vec::new()
                }
            }
            RegisterOutput::Conflict { found } => {
                let refused = match expect {
                    Expect::Any => false,
                    Expect::Absent => found.is_some(),
                    Expect::Version(e) => found != Some(e),
                };
                if refused {
                    s.observed(found).into_iter().collect()
                } else {
                    Vec::new()
                }
            }
            // Linearized here it takes effect if its condition holds; the outcome where it never
            // took effect is the one where it is linearized after everything else.
            RegisterOutput::Unknown => match s.holds(expect) {
                Some(true) => vec![written(input, None)],
                Some(false) => vec![s.clone()],
                None => vec![written(input, None), s.clone()],
            },
            RegisterOutput::Read(_) => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RegisterInput::{Delete, Get, Put};
    use RegisterOutput::{Conflict, Read, Unknown, Written};

    type Op = Operation<RegisterInput, RegisterOutput>;

    const BUDGET: u64 = 1_000_000;

    fn op(client: usize, call: u64, ret: u64, input: RegisterInput, output: RegisterOutput) -> Op {
        Operation {
            client,
            input,
            output,
            call_ns: call,
            return_ns: Some(ret),
        }
    }

    fn lost(client: usize, call: u64, input: RegisterInput) -> Op {
        Operation {
            client,
            input,
            output: Unknown,
            call_ns: call,
            return_ns: None,
        }
    }

    fn put(value: u64, expect: Expect) -> RegisterInput {
        Put { value, expect }
    }

    fn ok(h: &[Op]) {
        if let Err(e) = check(&VersionedRegister, h, BUDGET) {
            panic!("valid history refused: {e}\n{h:#?}");
        }
    }

    fn refused(h: &[Op]) {
        match check(&VersionedRegister, h, BUDGET) {
            Err(CheckError::NotLinearizable { .. }) => {}
            other => panic!("invalid history not refused: {other:?}\n{h:#?}"),
        }
    }

    #[test]
    fn sequential_cas_history_is_accepted() {
        ok(&[
            op(0, 0, 1, Get, Read(None)),
            op(0, 2, 3, put(1, Expect::Absent), Written { version: 5 }),
            op(1, 4, 5, put(2, Expect::Absent), Conflict { found: Some(5) }),
            op(1, 6, 7, Get, Read(Some((1, 5)))),
            op(1, 8, 9, put(2, Expect::Version(5)), Written { version: 9 }),
            op(
                0,
                10,
                11,
                put(3, Expect::Version(5)),
                Conflict { found: Some(9) },
            ),
            op(
                0,
                12,
                13,
                Delete {
                    expect: Expect::Version(9),
                },
                Written { version: 12 },
            ),
            op(1, 14, 15, Get, Read(None)),
            op(
                1,
                16,
                17,
                put(4, Expect::Version(9)),
                Conflict { found: None },
            ),
            op(1, 18, 19, put(4, Expect::Absent), Written { version: 20 }),
            op(0, 20, 21, Get, Read(Some((4, 20)))),
        ]);
    }

    #[test]
    fn concurrent_reads_may_see_either_side_of_an_overlapping_write() {
        let write = op(0, 10, 20, put(1, Expect::Absent), Written { version: 3 });
        ok(&[write.clone(), op(1, 12, 14, Get, Read(None))]);
        ok(&[write.clone(), op(1, 12, 14, Get, Read(Some((1, 3))))]);
        // New, then old, by two overlapping reads that do not overlap each other: impossible.
        refused(&[
            write.clone(),
            op(1, 11, 12, Get, Read(Some((1, 3)))),
            op(2, 13, 14, Get, Read(None)),
        ]);
        // The same two answers with the reads overlapping each other: fine.
        ok(&[
            write,
            op(1, 11, 14, Get, Read(Some((1, 3)))),
            op(2, 12, 13, Get, Read(None)),
        ]);
    }

    #[test]
    fn a_stale_read_after_a_completed_write_is_refused() {
        refused(&[
            op(0, 0, 1, put(1, Expect::Absent), Written { version: 1 }),
            op(0, 2, 3, put(2, Expect::Version(1)), Written { version: 2 }),
            op(1, 4, 5, Get, Read(Some((1, 1)))),
        ]);
        refused(&[
            op(0, 0, 1, put(1, Expect::Absent), Written { version: 1 }),
            op(1, 2, 3, Get, Read(None)),
        ]);
    }

    #[test]
    fn two_cas_successes_from_the_same_version_are_refused() {
        let first = op(0, 0, 1, put(1, Expect::Absent), Written { version: 1 });
        // One after the other.
        refused(&[
            first.clone(),
            op(1, 2, 3, put(2, Expect::Version(1)), Written { version: 2 }),
            op(2, 4, 5, put(3, Expect::Version(1)), Written { version: 3 }),
        ]);
        // Overlapping: still only one of them can have met version 1.
        refused(&[
            first.clone(),
            op(1, 2, 6, put(2, Expect::Version(1)), Written { version: 2 }),
            op(2, 3, 5, put(3, Expect::Version(1)), Written { version: 3 }),
        ]);
        // Two creations of an absent key.
        refused(&[
            first,
            op(1, 0, 1, put(2, Expect::Absent), Written { version: 2 }),
        ]);
    }

    #[test]
    fn answers_no_state_explains_are_refused() {
        // A value nobody wrote.
        refused(&[op(0, 0, 1, Get, Read(Some((7, 1))))]);
        // The right value at the wrong version.
        refused(&[
            op(0, 0, 1, put(1, Expect::Absent), Written { version: 4 }),
            op(0, 2, 3, Get, Read(Some((1, 5)))),
        ]);
        // A conflict whose condition actually held.
        refused(&[
            op(0, 0, 1, put(1, Expect::Absent), Written { version: 4 }),
            op(
                0,
                2,
                3,
                put(2, Expect::Version(4)),
                Conflict { found: Some(4) },
            ),
        ]);
        // A conflict naming a version the key is not at.
        refused(&[
            op(0, 0, 1, put(1, Expect::Absent), Written { version: 4 }),
            op(
                0,
                2,
                3,
                put(2, Expect::Version(3)),
                Conflict { found: Some(2) },
            ),
        ]);
        // Versions of successive writes of a key go down.
        refused(&[
            op(0, 0, 1, put(1, Expect::Absent), Written { version: 4 }),
            op(0, 2, 3, put(2, Expect::Version(4)), Written { version: 3 }),
        ]);
        // A read answers a delete's key with its old value.
        refused(&[
            op(0, 0, 1, put(1, Expect::Absent), Written { version: 4 }),
            op(
                0,
                2,
                3,
                Delete {
                    expect: Expect::Any,
                },
                Written { version: 6 },
            ),
            op(1, 4, 5, Get, Read(Some((1, 4)))),
        ]);
    }

    #[test]
    fn indeterminate_writes_take_effect_late_or_never_but_not_before_their_call() {
        let timed_out = lost(0, 10, put(1, Expect::Absent));
        // Never seen.
        ok(&[timed_out.clone(), op(1, 50, 51, Get, Read(None))]);
        // Seen long after it was given up on, its version learned from the read.
        ok(&[
            timed_out.clone(),
            op(1, 50, 51, Get, Read(None)),
            op(1, 90, 91, Get, Read(Some((1, 8)))),
            op(
                2,
                92,
                93,
                put(2, Expect::Version(8)),
                Written { version: 9 },
            ),
        ]);
        // But once seen it stays (no write can be undone).
        refused(&[
            timed_out.clone(),
            op(1, 50, 51, Get, Read(Some((1, 8)))),
            op(1, 52, 53, Get, Read(None)),
        ]);
        // Seen before it was invoked.
        refused(&[timed_out.clone(), op(1, 0, 5, Get, Read(Some((1, 8))))]);
        // Learned versions are versions: a read cannot see it at two.
        refused(&[
            timed_out.clone(),
            op(1, 50, 51, Get, Read(Some((1, 8)))),
            op(1, 52, 53, Get, Read(Some((1, 9)))),
        ]);
        // Its conditional successor succeeded at a version it could not have met: refused once
        // the read pins the version.
        refused(&[
            timed_out,
            op(1, 50, 51, Get, Read(Some((1, 8)))),
            op(
                2,
                52,
                53,
                put(2, Expect::Version(7)),
                Written { version: 9 },
            ),
        ]);
    }

    #[test]
    fn an_indeterminate_cas_of_an_unknown_version_may_or_may_not_apply() {
        let base = [
            lost(0, 0, put(1, Expect::Absent)),
            lost(1, 10, put(2, Expect::Version(3))),
        ];
        // Version 3 was the first write's: the second applied.
        let mut h = base.to_vec();
        h.push(op(2, 20, 21, Get, Read(Some((2, 6)))));
        ok(&h);
        // Or it did not.
        let mut h = base.to_vec();
        h.push(op(2, 20, 21, Get, Read(Some((1, 4)))));
        ok(&h);
    }

    #[test]
    fn a_bad_clock_and_a_small_budget_are_reported() {
        let h = [Operation {
            client: 0,
            input: Get,
            output: Read(None),
            call_ns: 5,
            return_ns: Some(4),
        }];
        assert!(matches!(
            check(&VersionedRegister, &h, BUDGET),
            Err(CheckError::ReturnBeforeCall { op: 0, .. })
        ));
        let h: Vec<Op> = (0..20)
            .map(|i| {
                op(
                    i,
                    0,
                    100,
                    put(i as u64, Expect::Any),
                    Written {
                        version: 1 + i as u64,
                    },
                )
            })
            .chain([op(99, 101, 102, Get, Read(Some((19, 20))))])
            .collect();
        assert!(matches!(
            check(&VersionedRegister, &h, 10),
            Err(CheckError::Undecided { steps: 10 })
        ));
        ok(&h);
        ok(&[]);
    }

    /// A tiny deterministic generator (the crate has no random number dependency).
    struct SplitMix(u64);

    impl SplitMix {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Runs a random sequence of operations against a reference key, each at a linearization
    /// point inside a random interval, some of them reported as indeterminate.
    fn random_history(seed: u64, ops: usize) -> Vec<Op> {
        let mut rng = SplitMix(seed);
        let mut current: Option<(u64, u64)> = None;
        let mut version = 0u64;
        let mut history = Vec::new();
        for i in 0..ops {
            let point = 100 * i as u64 + 50;
            let call = point - rng.below(250).min(point);
            let ret = point + rng.below(250);
            let expect = match rng.below(4) {
                0 => Expect::Absent,
                1 => Expect::Any,
                _ => Expect::Version(
                    current.map_or(version, |(_, v)| if rng.below(4) == 0 { v + 1 } else { v }),
                ),
            };
            let input = match rng.below(5) {
                0 | 1 => Get,
                2 => Delete { expect },
                _ => put(i as u64, expect),
            };
            let holds = match expect {
                Expect::Any => true,
                Expect::Absent => current.is_none(),
                Expect::Version(e) => current.is_some_and(|(_, v)| v == e),
            };
            let output = match input {
                Get => Read(current),
                _ if !holds => Conflict {
                    found: current.map(|(_, v)| v),
                },
                Put { value, .. } => {
                    version += 1 + rng.below(3);
                    current = Some((value, version));
                    Written { version }
                }
                Delete { .. } => {
                    version += 1;
                    current = None;
                    Written { version }
                }
            };
            let indeterminate = !matches!(input, Get) && rng.below(8) == 0;
            history.push(Operation {
                client: i % 7,
                input,
                output: if indeterminate { Unknown } else { output },
                call_ns: call,
                return_ns: (!indeterminate).then_some(ret),
            });
        }
        history
    }

    #[test]
    fn random_histories_of_a_real_register_are_accepted() {
        for seed in 0..200 {
            let h = random_history(seed, 60);
            if let Err(e) = check(&VersionedRegister, &h, BUDGET) {
                panic!("seed {seed}: {e}");
            }
        }
    }

    #[test]
    fn random_histories_with_a_read_of_a_future_write_are_refused() {
        // Make one completed read that saw a write answer what the key held before it, and
        // finish it before that write was invoked: this is never linearizable when the write
        // completed, and the checker must notice in every case.
        let mut refused_count = 0;
        let mut tried = 0;
        for seed in 0..200 {
            let mut h = random_history(seed, 60);
            let Some(r) = h.iter().position(|o| {
                matches!(o.output, Read(Some(_))) && o.call_ns > 2_000 && o.return_ns.is_some()
            }) else {
                continue;
            };
            let Read(Some((value, _))) = h[r].output else {
                unreachable!()
            };
            let Some(w) = h.iter().position(|o| {
                matches!(o.input, Put { value: v, .. } if v == value)
                    && matches!(o.output, Written { .. })
            }) else {
                continue;
            };
            let call = h[w].call_ns;
            if call < 2 {
                continue;
            }
            tried += 1;
            h[r].call_ns = call.saturating_sub(2);
            h[r].return_ns = Some(call.saturating_sub(1));
            if matches!(
                check(&VersionedRegister, &h, BUDGET),
                Err(CheckError::NotLinearizable { .. })
            ) {
                refused_count += 1;
            }
        }
        assert!(tried > 50, "only {tried} histories had a read to move");
        assert_eq!(
            refused_count, tried,
            "a read of a future write was accepted"
        );
    }
}
