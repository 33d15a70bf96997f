//! A simulated network for deterministic single-threaded tests: [`SimNetwork`] hands out one
//! [`SimTransport`] per node, all on the current executor, and delivers their messages on a
//! **virtual clock** with seeded faults.
//!
//! Every link (ordered pair of nodes) has a [`LinkConfig`]: a drop probability, a delay range
//! and whether messages may overtake each other. Partitions split the nodes into islands; a
//! message whose ends are on different islands is dropped when sent and again when due (so a
//! partition made while a message is in flight cuts it too). Crashed nodes drop what reaches
//! them. A dropped request or response surfaces as the caller's [`TransportError::Timeout`], as on
//! a real network.
//!
//! Time only moves when a test pumps the network ([`SimNetwork::run_until_idle`],
//! [`SimNetwork::run_for`]): the pump lets every task that can run do so, then jumps the clock
//! to the next due event and delivers it. All randomness comes from one ChaCha RNG seeded from
//! [`SimConfig::seed`], drawn in the order messages are sent; with no real timers or I/O in the
//! handlers, the same seed therefore gives the same [`SimNetwork::trace`], event for event. On a
//! failure a test prints its seed and replays it.
//!
//! A task is "able to run" if it was woken by a delivery; the pump yields to the executor until
//! [`SETTLE_PASSES`] consecutive passes see no new network activity. Handlers must not wait on
//! real time (glommio timers, sockets); use [`SimNetwork::sleep`] for virtual delays.

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::rc::Rc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{Handler, Message, NodeId, Transport, TransportError};

/// Scheduler passes without network activity after which the pump considers every task idle.
pub const SETTLE_PASSES: u32 = 8;

/// Faults and delays on one direction of a link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkConfig {
    /// Probability (0 to 1) that a message is lost.
    pub drop_probability: f64,
    /// Shortest one-way delay.
    pub delay_min: Duration,
    /// Longest one-way delay (inclusive).
    pub delay_max: Duration,
    /// Whether a later message may arrive before an earlier one (false: FIFO per link).
    pub reorder: bool,
}

impl Default for LinkConfig {
    /// A clean data-center link: no loss, 50 to 500 µs, may reorder.
    fn default() -> Self {
        LinkConfig {
            drop_probability: 0.0,
            delay_min: Duration::from_micros(50),
            delay_max: Duration::from_micros(500),
            reorder: true,
        }
    }
}

impl LinkConfig {
    fn check(&self) {
        assert!(
            (0.0..=1.0).contains(&self.drop_probability),
            "drop probability {} outside 0..=1",
            self.drop_probability
        );
        assert!(
            self.delay_min <= self.delay_max,
            "delay range {:?}..={:?} is empty",
            self.delay_min,
            self.delay_max
        );
    }
}

/// How a simulated network behaves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimConfig {
    /// Seed of every random choice.
    pub seed: u64,
    /// How long a call waits for its response (virtual time).
    pub call_timeout: Duration,
    /// The configuration of links without one of their own.
    pub link: LinkConfig,
}

impl SimConfig {
    /// Default links and a 1 s call timeout, with `seed`.
    pub fn seeded(seed: u64) -> Self {
        SimConfig {
            seed,
            call_timeout: Duration::from_secs(1),
            link: LinkConfig::default(),
        }
    }
}

/// Why the network dropped a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropCause {
    /// The link's drop probability.
    Random,
    /// The ends are on different sides of a partition.
    Partition,
    /// The receiver is crashed.
    NodeDown,
}

/// What happened to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TraceKind {
    /// A request reached its handler.
    RequestDelivered,
    /// A response reached the caller (`late`: after the call had timed out).
    ResponseDelivered {
        /// The call had already timed out.
        late: bool,
    },
    /// A request was lost.
    RequestDropped(DropCause),
    /// A response was lost.
    ResponseDropped(DropCause),
    /// The call timed out.
    TimedOut,
}

/// One entry of the delivery trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceEvent {
    /// Virtual time.
    pub at: Duration,
    /// The call (numbered per network from 0).
    pub call: u64,
    /// Sender of the message.
    pub from: NodeId,
    /// Receiver of the message.
    pub to: NodeId,
    /// What happened.
    pub kind: TraceKind,
}

struct Waiter {
    result: RefCell<Option<Result<Message, TransportError>>>,
    done: event_listener::Event,
}

impl Waiter {
    fn new() -> Rc<Waiter> {
        Rc::new(Waiter {
            result: RefCell::new(None),
            done: event_listener::Event::new(),
        })
    }

    fn finish(&self, result: Result<Message, TransportError>) {
        *self.result.borrow_mut() = Some(result);
        self.done.notify(usize::MAX);
    }

    async fn wait(&self) -> Result<Message, TransportError> {
        loop {
            let listener = self.done.listen();
            if let Some(r) = self.result.borrow_mut().take() {
                return r;
            }
            listener.await;
        }
    }
}

enum Event {
    Request {
        call: u64,
        from: NodeId,
        to: NodeId,
        message: Message,
    },
    Response {
        call: u64,
        from: NodeId,
        to: NodeId,
        message: Message,
    },
    Timeout {
        call: u64,
    },
    Wake(Rc<Waiter>),
}

struct State<H> {
    config: SimConfig,
    now: Duration,
    rng: ChaCha8Rng,
    links: HashMap<(NodeId, NodeId), LinkConfig>,
    /// Island of each node; nodes not listed are on island 0.
    islands: HashMap<NodeId, u32>,
    /// Nodes and their handlers; `None` while crashed.
    nodes: HashMap<NodeId, Option<Rc<H>>>,
    /// Due time and insertion number (ties deliver in send order) of each queued event.
    queue: BinaryHeap<Reverse<(Duration, u64)>>,
    events: HashMap<u64, Event>,
    next_event: u64,
    /// FIFO links: the latest due time queued on each.
    last_due: HashMap<(NodeId, NodeId), Duration>,
    /// Calls waiting for a response: caller and waiter.
    calls: HashMap<u64, (NodeId, Rc<Waiter>)>,
    next_call: u64,
    trace: Vec<TraceEvent>,
}

impl<H> State<H> {
    fn push(&mut self, due: Duration, event: Event) {
        let id = self.next_event;
        self.next_event += 1;
        self.queue.push(Reverse((due, id)));
        self.events.insert(id, event);
    }

    fn cut(&self, a: NodeId, b: NodeId) -> bool {
        self.islands.get(&a).copied().unwrap_or(0) != self.islands.get(&b).copied().unwrap_or(0)
    }

    fn down(&self, node: NodeId) -> bool {
        !matches!(self.nodes.get(&node), Some(Some(_)))
    }

    fn record(&mut self, call: u64, from: NodeId, to: NodeId, kind: TraceKind) {
        self.trace.push(TraceEvent {
            at: self.now,
            call,
            from,
            to,
            kind,
        });
    }

    /// Why a message from `from` to `to` is lost now, if it is (drawing from the RNG only for
    /// messages that could be delivered).
    fn lost(&mut self, from: NodeId, to: NodeId) -> Option<DropCause> {
        if self.cut(from, to) {
            return Some(DropCause::Partition);
        }
        if self.down(to) {
            return Some(DropCause::NodeDown);
        }
        let link = self.link(from, to);
        if link.drop_probability > 0.0 && self.rng.random_bool(link.drop_probability) {
            return Some(DropCause::Random);
        }
        None
    }

    fn link(&self, from: NodeId, to: NodeId) -> LinkConfig {
        self.links
            .get(&(from, to))
            .copied()
            .unwrap_or(self.config.link)
    }

    /// Queues `event` on the link `from -> to` with the link's delay.
    fn transmit(&mut self, from: NodeId, to: NodeId, event: Event) {
        let link = self.link(from, to);
        let span = (link.delay_max - link.delay_min).as_nanos() as u64;
        let jitter = if span == 0 {
            0
        } else {
            self.rng.random_range(0..=span)
        };
        let mut due = self.now + link.delay_min + Duration::from_nanos(jitter);
        if !link.reorder {
            let last = self.last_due.entry((from, to)).or_default();
            due = due.max(*last);
            *last = due;
        }
        self.push(due, event);
    }
}

/// The simulated network; clone it freely (all clones are the same network).
pub struct SimNetwork<H> {
    state: Rc<RefCell<State<H>>>,
    /// Bumped by every send, delivery and handler completion: how the pump sees progress.
    activity: Rc<Cell<u64>>,
}

impl<H> Clone for SimNetwork<H> {
    fn clone(&self) -> Self {
        SimNetwork {
            state: self.state.clone(),
            activity: self.activity.clone(),
        }
    }
}

impl<H: Handler + 'static> SimNetwork<H> {
    /// An empty network.
    pub fn new(config: SimConfig) -> Self {
        config.link.check();
        SimNetwork {
            state: Rc::new(RefCell::new(State {
                config,
                now: Duration::ZERO,
                rng: ChaCha8Rng::seed_from_u64(config.seed),
                links: HashMap::new(),
                islands: HashMap::new(),
                nodes: HashMap::new(),
                queue: BinaryHeap::new(),
                events: HashMap::new(),
                next_event: 0,
                last_due: HashMap::new(),
                calls: HashMap::new(),
                next_call: 0,
                trace: Vec::new(),
            })),
            activity: Rc::new(Cell::new(0)),
        }
    }

    /// Adds node `id`, answering with `handler`, and returns its transport.
    pub fn add_node(&self, id: NodeId, handler: Rc<H>) -> SimTransport<H> {
        let previous = self.state.borrow_mut().nodes.insert(id, Some(handler));
        assert!(previous.is_none(), "node {id} added twice");
        SimTransport {
            node: id,
            net: self.clone(),
        }
    }

    /// Stops node `id` answering: requests that reach it are dropped (its transport can still
    /// call out; stop using it to model a full crash).
    pub fn crash(&self, id: NodeId) {
        let mut state = self.state.borrow_mut();
        let slot = state.nodes.get_mut(&id).expect("crash of an unknown node");
        *slot = None;
    }

    /// Brings a crashed node back with `handler`.
    pub fn restart(&self, id: NodeId, handler: Rc<H>) {
        let mut state = self.state.borrow_mut();
        let slot = state
            .nodes
            .get_mut(&id)
            .expect("restart of an unknown node");
        *slot = Some(handler);
    }

    /// Sets the configuration of the link `from -> to` (one direction).
    pub fn set_link(&self, from: NodeId, to: NodeId, link: LinkConfig) {
        link.check();
        self.state.borrow_mut().links.insert((from, to), link);
    }

    /// Splits the network: each of `sides` becomes an island of its own; nodes on no side form
    /// one more island. Replaces any earlier partition.
    pub fn partition(&self, sides: &[&[NodeId]]) {
        let mut state = self.state.borrow_mut();
        state.islands.clear();
        for (i, side) in sides.iter().enumerate() {
            for &node in *side {
                state.islands.insert(node, i as u32 + 1);
            }
        }
    }

    /// Ends every partition.
    pub fn heal(&self) {
        self.state.borrow_mut().islands.clear();
    }

    /// The virtual time.
    pub fn now(&self) -> Duration {
        self.state.borrow().now
    }

    /// Every delivery, drop and timeout so far, in order.
    pub fn trace(&self) -> Vec<TraceEvent> {
        self.state.borrow().trace.clone()
    }

    /// Waits `duration` of virtual time (returns when a pump reaches it).
    pub async fn sleep(&self, duration: Duration) {
        let waiter = Waiter::new();
        {
            let mut state = self.state.borrow_mut();
            let due = state.now + duration;
            state.push(due, Event::Wake(waiter.clone()));
        }
        self.bump();
        let _ = waiter.wait().await;
    }

    /// Delivers events until none is left (every call answered or timed out). Tasks that keep
    /// sleeping forever make this run forever: use [`SimNetwork::run_for`] then.
    pub async fn run_until_idle(&self) {
        self.run_until(None).await
    }

    /// Delivers every event due within `duration` from now, then sets the clock to that time.
    pub async fn run_for(&self, duration: Duration) {
        let deadline = self.now() + duration;
        self.run_until(Some(deadline)).await
    }

    async fn run_until(&self, deadline: Option<Duration>) {
        loop {
            self.settle().await;
            let event = {
                let mut state = self.state.borrow_mut();
                let Some(&Reverse((due, id))) = state.queue.peek() else {
                    break;
                };
                if deadline.is_some_and(|d| due > d) {
                    break;
                }
                state.queue.pop();
                let event = state.events.remove(&id).expect("queued event");
                // A timeout of a call already answered is not an event: do not move the clock.
                if let Event::Timeout { call } = event
                    && !state.calls.contains_key(&call)
                {
                    continue;
                }
                state.now = state.now.max(due);
                event
            };
            self.deliver(event);
        }
        if let Some(deadline) = deadline {
            let mut state = self.state.borrow_mut();
            state.now = state.now.max(deadline);
        }
        self.settle().await;
    }

    fn bump(&self) {
        self.activity.set(self.activity.get() + 1);
    }

    async fn settle(&self) {
        let mut quiet = 0;
        while quiet < SETTLE_PASSES {
            let before = self.activity.get();
            futures_lite::future::yield_now().await;
            quiet = if self.activity.get() == before {
                quiet + 1
            } else {
                0
            };
        }
    }

    fn deliver(&self, event: Event) {
        self.bump();
        let mut state = self.state.borrow_mut();
        match event {
            Event::Request {
                call,
                from,
                to,
                message,
            } => {
                if let Some(cause) = Self::lost_on_arrival(&state, from, to) {
                    state.record(call, from, to, TraceKind::RequestDropped(cause));
                    return;
                }
                state.record(call, from, to, TraceKind::RequestDelivered);
                let handler = state.nodes[&to].clone().expect("checked: node is up");
                drop(state);
                let net = self.clone();
                glommio::spawn_local(async move {
                    let response = handler.handle(from, message).await;
                    net.respond(call, to, from, response);
                })
                .detach();
            }
            Event::Response {
                call,
                from,
                to,
                message,
            } => {
                if state.cut(from, to) {
                    state.record(
                        call,
                        from,
                        to,
                        TraceKind::ResponseDropped(DropCause::Partition),
                    );
                    return;
                }
                let waiter = state.calls.remove(&call);
                state.record(
                    call,
                    from,
                    to,
                    TraceKind::ResponseDelivered {
                        late: waiter.is_none(),
                    },
                );
                drop(state);
                if let Some((_, waiter)) = waiter {
                    waiter.finish(Ok(message));
                }
            }
            Event::Timeout { call } => {
                let Some((caller, waiter)) = state.calls.remove(&call) else {
                    return;
                };
                state.record(call, caller, caller, TraceKind::TimedOut);
                let after = state.config.call_timeout;
                drop(state);
                // The peer is not recorded per call; the caller knows whom it called.
                waiter.finish(Err(TransportError::Timeout {
                    peer: caller,
                    request_id: call,
                    after,
                }));
            }
            Event::Wake(waiter) => {
                drop(state);
                waiter.finish(Ok(Message::default()));
            }
        }
    }

    /// Partition and crash checks at delivery time (no new random draw).
    fn lost_on_arrival(state: &State<H>, from: NodeId, to: NodeId) -> Option<DropCause> {
        if state.cut(from, to) {
            Some(DropCause::Partition)
        } else if state.down(to) {
            Some(DropCause::NodeDown)
        } else {
            None
        }
    }

    fn respond(&self, call: u64, from: NodeId, to: NodeId, message: Message) {
        self.bump();
        let mut state = self.state.borrow_mut();
        if let Some(cause) = state.lost(from, to).filter(|c| *c != DropCause::NodeDown) {
            state.record(call, from, to, TraceKind::ResponseDropped(cause));
            return;
        }
        state.transmit(
            from,
            to,
            Event::Response {
                call,
                from,
                to,
                message,
            },
        );
    }

    async fn call_from(
        &self,
        from: NodeId,
        peer: NodeId,
        request: Message,
    ) -> Result<Message, TransportError> {
        let (call, waiter, timeout) = {
            let mut state = self.state.borrow_mut();
            if !state.nodes.contains_key(&peer) {
                return Err(TransportError::UnknownPeer { peer });
            }
            let call = state.next_call;
            state.next_call += 1;
            let waiter = Waiter::new();
            state.calls.insert(call, (from, waiter.clone()));
            let timeout = state.config.call_timeout;
            let due = state.now + timeout;
            state.push(due, Event::Timeout { call });
            if let Some(cause) = state.lost(from, peer) {
                state.record(call, from, peer, TraceKind::RequestDropped(cause));
            } else {
                state.transmit(
                    from,
                    peer,
                    Event::Request {
                        call,
                        from,
                        to: peer,
                        message: request,
                    },
                );
            }
            (call, waiter, timeout)
        };
        self.bump();
        match waiter.wait().await {
            Err(TransportError::Timeout { .. }) => Err(TransportError::Timeout {
                peer,
                request_id: call,
                after: timeout,
            }),
            other => other,
        }
    }
}

/// One node's end of a [`SimNetwork`].
pub struct SimTransport<H> {
    node: NodeId,
    net: SimNetwork<H>,
}

impl<H: Handler + 'static> Transport for SimTransport<H> {
    fn local_node(&self) -> NodeId {
        self.node
    }

    async fn call(&self, peer: NodeId, request: Message) -> Result<Message, TransportError> {
        self.net.call_from(self.node, peer, request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Echo;
    use glommio::LocalExecutorBuilder;

    fn run<T>(fut: impl std::future::Future<Output = T>) -> T {
        LocalExecutorBuilder::default()
            .io_memory(1 << 20)
            .make()
            .expect("glommio executor")
            .run(fut)
    }

    fn msg(sequence: u64) -> Message {
        Message {
            op: 1,
            vdisk: 5,
            epoch: 1,
            sequence,
            payload: sequence.to_le_bytes().to_vec(),
        }
    }

    /// Answers with the sequence numbers it has seen so far from each caller, in order.
    #[derive(Default)]
    struct Recorder {
        seen: RefCell<Vec<(NodeId, u64)>>,
    }

    impl Handler for Recorder {
        async fn handle(&self, from: NodeId, request: Message) -> Message {
            self.seen.borrow_mut().push((from, request.sequence));
            request
        }
    }

    #[test]
    fn round_trip_takes_two_link_delays() {
        run(async {
            let mut config = SimConfig::seeded(1);
            config.link.delay_min = Duration::from_millis(2);
            config.link.delay_max = Duration::from_millis(2);
            let net = SimNetwork::new(config);
            let a = Rc::new(net.add_node(1, Rc::new(Echo)));
            net.add_node(2, Rc::new(Echo));
            let call = glommio::spawn_local(async move { a.call(2, msg(3)).await });
            net.run_until_idle().await;
            assert_eq!(call.await.unwrap(), msg(3));
            assert_eq!(net.now(), Duration::from_millis(4));
            let kinds: Vec<_> = net.trace().iter().map(|e| e.kind).collect();
            assert_eq!(
                kinds,
                [
                    TraceKind::RequestDelivered,
                    TraceKind::ResponseDelivered { late: false }
                ]
            );
        });
    }

    /// Many calls over lossy, reordering links; returns the trace and each call's outcome.
    fn lossy_workload(seed: u64) -> (Vec<TraceEvent>, Vec<Result<u64, String>>) {
        run(async move {
            let mut config = SimConfig::seeded(seed);
            config.call_timeout = Duration::from_millis(50);
            config.link = LinkConfig {
                drop_probability: 0.2,
                delay_min: Duration::from_micros(10),
                delay_max: Duration::from_millis(5),
                reorder: true,
            };
            let net = SimNetwork::new(config);
            let nodes: Vec<_> = (1..=3)
                .map(|id| Rc::new(net.add_node(id, Rc::new(Echo))))
                .collect();
            let mut calls = Vec::new();
            for i in 0..60u64 {
                let from = nodes[(i % 3) as usize].clone();
                let to = (i + 1) % 3 + 1;
                calls.push(glommio::spawn_local(
                    async move { from.call(to, msg(i)).await },
                ));
            }
            net.run_until_idle().await;
            let mut outcomes = Vec::new();
            for call in calls {
                outcomes.push(call.await.map(|m| m.sequence).map_err(|e| e.to_string()));
            }
            (net.trace(), outcomes)
        })
    }

    #[test]
    fn same_seed_same_trace() {
        let (trace_a, out_a) = lossy_workload(42);
        let (trace_b, out_b) = lossy_workload(42);
        assert_eq!(trace_a, trace_b, "seed 42 did not replay");
        assert_eq!(out_a, out_b);
        // The faults really happened: some calls timed out, most succeeded, and deliveries were
        // not in send order.
        let timeouts = out_a.iter().filter(|r| r.is_err()).count();
        assert!(timeouts > 0 && timeouts < 40, "{timeouts} timeouts");
        assert!(
            trace_a
                .iter()
                .any(|e| e.kind == TraceKind::RequestDropped(DropCause::Random))
        );
        let delivered: Vec<u64> = trace_a
            .iter()
            .filter(|e| e.kind == TraceKind::RequestDelivered)
            .map(|e| e.call)
            .collect();
        assert!(delivered.windows(2).any(|w| w[0] > w[1]), "no reordering");
        let (trace_c, _) = lossy_workload(43);
        assert_ne!(trace_a, trace_c, "another seed gave the same trace");
    }

    #[test]
    fn fifo_links_keep_order() {
        run(async {
            let mut config = SimConfig::seeded(9);
            config.link = LinkConfig {
                drop_probability: 0.0,
                delay_min: Duration::from_micros(1),
                delay_max: Duration::from_millis(10),
                reorder: false,
            };
            let net = SimNetwork::new(config);
            let a = Rc::new(net.add_node(1, Rc::new(Recorder::default())));
            let recorder = Rc::new(Recorder::default());
            net.add_node(2, recorder.clone());
            let calls: Vec<_> = (0..30)
                .map(|i| {
                    let a = a.clone();
                    glommio::spawn_local(async move { a.call(2, msg(i)).await })
                })
                .collect();
            net.run_until_idle().await;
            for c in calls {
                c.await.unwrap();
            }
            let seen: Vec<u64> = recorder.seen.borrow().iter().map(|s| s.1).collect();
            assert_eq!(seen, (0..30).collect::<Vec<_>>());
        });
    }

    #[test]
    fn partition_drops_everything_across_the_cut_and_heal_restores() {
        run(async {
            let net = SimNetwork::new(SimConfig::seeded(3));
            let n: Vec<_> = (1..=3)
                .map(|id| Rc::new(net.add_node(id, Rc::new(Echo))))
                .collect();
            net.partition(&[&[1]]);
            let call = |from: usize, to: NodeId, seq: u64| {
                let t = n[from].clone();
                glommio::spawn_local(async move { t.call(to, msg(seq)).await })
            };
            let cut = [call(0, 2, 1), call(0, 3, 2), call(1, 1, 3), call(2, 1, 4)];
            let fine = [call(1, 3, 5), call(2, 2, 6)];
            net.run_until_idle().await;
            for c in cut {
                assert!(matches!(c.await, Err(TransportError::Timeout { .. })));
            }
            for c in fine {
                c.await.unwrap();
            }
            let trace = net.trace();
            for e in &trace {
                if e.from == 1 || e.to == 1 {
                    assert!(
                        matches!(
                            e.kind,
                            TraceKind::RequestDropped(DropCause::Partition) | TraceKind::TimedOut
                        ),
                        "{e:?} crossed the cut"
                    );
                }
            }

            // A partition made while a response is in flight cuts it too.
            let slow = LinkConfig {
                delay_min: Duration::from_millis(10),
                delay_max: Duration::from_millis(10),
                ..LinkConfig::default()
            };
            net.heal();
            net.set_link(2, 1, slow);
            let pending = call(0, 2, 7);
            net.run_for(Duration::from_millis(5)).await; // request delivered, response queued
            net.partition(&[&[1, 3], &[2]]);
            net.run_until_idle().await;
            assert!(matches!(pending.await, Err(TransportError::Timeout { .. })));
            assert!(
                net.trace()
                    .iter()
                    .any(|e| e.call == 6
                        && e.kind == TraceKind::ResponseDropped(DropCause::Partition))
            );

            net.heal();
            let healed = [call(0, 2, 8), call(1, 1, 9), call(2, 1, 10)];
            net.run_until_idle().await;
            for c in healed {
                c.await.unwrap();
            }
        });
    }

    #[test]
    fn crashed_nodes_drop_requests_and_restart_answers() {
        run(async {
            let net = SimNetwork::new(SimConfig::seeded(5));
            let a = Rc::new(net.add_node(1, Rc::new(Echo)));
            net.add_node(2, Rc::new(Echo));
            net.crash(2);
            let a2 = a.clone();
            let down = glommio::spawn_local(async move { a2.call(2, msg(1)).await });
            net.run_until_idle().await;
            assert!(matches!(
                down.await,
                Err(TransportError::Timeout { peer: 2, .. })
            ));
            net.restart(2, Rc::new(Echo));
            let a2 = a.clone();
            let up = glommio::spawn_local(async move { a2.call(2, msg(2)).await });
            net.run_until_idle().await;
            assert_eq!(up.await.unwrap(), msg(2));
            assert!(matches!(
                a.call(9, msg(3)).await,
                Err(TransportError::UnknownPeer { peer: 9 })
            ));
        });
    }

    #[test]
    fn virtual_sleep_follows_the_clock() {
        run(async {
            let net: SimNetwork<Echo> = SimNetwork::new(SimConfig::seeded(0));
            let n2 = net.clone();
            let sleeper = glommio::spawn_local(async move {
                n2.sleep(Duration::from_secs(3600)).await;
                n2.now()
            });
            net.run_until_idle().await;
            assert_eq!(sleeper.await, Duration::from_secs(3600));
        });
    }
}
