//! Loopback tests of the TCP backend: round trips, pipelining, back-pressure, a peer restart, bad
//! frames in both directions, timeouts and connection failures. Fake peers speak raw frames.

use super::*;
use crate::transport::Echo;
use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use glommio::LocalExecutorBuilder;
use glommio::task::JoinHandle;

fn run<T>(fut: impl std::future::Future<Output = T>) -> T {
    LocalExecutorBuilder::default()
        .io_memory(1 << 20)
        .make()
        .expect("glommio executor")
        .run(fut)
}

fn quick() -> TcpConfig {
    TcpConfig {
        call_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_millis(500),
        backoff_min: Duration::from_millis(5),
        backoff_max: Duration::from_millis(40),
        ..TcpConfig::default()
    }
}

fn msg(sequence: u64, len: usize) -> Message {
    Message {
        op: 3,
        vdisk: 11,
        epoch: 2,
        sequence,
        payload: (0..len).map(|i| (i as u64 ^ sequence) as u8).collect(),
    }
}

struct Server {
    addr: SocketAddr,
    shutdown: Shutdown,
    task: JoinHandle<Result<ServeSummary, ServeError>>,
}

impl Server {
    fn start<H: Handler + 'static>(node: NodeId, handler: Rc<H>, config: TcpConfig) -> Server {
        Self::start_on("127.0.0.1:0".parse().unwrap(), node, handler, config)
    }

    fn start_on<H: Handler + 'static>(
        addr: SocketAddr,
        node: NodeId,
        handler: Rc<H>,
        config: TcpConfig,
    ) -> Server {
        Self::start_in(addr, node, ClusterTag::default(), handler, config)
    }

    fn start_in<H: Handler + 'static>(
        addr: SocketAddr,
        node: NodeId,
        cluster: ClusterTag,
        handler: Rc<H>,
        config: TcpConfig,
    ) -> Server {
        let listener = TcpListener::bind(addr).expect("bind");
        let addr = listener.local_addr().unwrap();
        let shutdown = Shutdown::new();
        let task = glommio::spawn_local(serve(
            listener,
            node,
            cluster,
            handler,
            config,
            shutdown.clone(),
        ))
        .detach();
        Server {
            addr,
            shutdown,
            task,
        }
    }

    async fn stop(self) -> ServeSummary {
        self.shutdown.trigger();
        self.task.await.expect("server task").expect("serve")
    }
}

fn client(node: NodeId, peer: NodeId, addr: SocketAddr, config: TcpConfig) -> Rc<TcpTransport> {
    let t = Rc::new(TcpTransport::new(node, ClusterTag::default(), config));
    t.set_peer(peer, addr);
    t
}

#[test]
fn round_trips() {
    run(async {
        let server = Server::start(2, Rc::new(Echo), quick());
        let c = client(1, 2, server.addr, quick());
        assert_eq!(c.local_node(), 1);
        for (i, len) in [0usize, 1, 100, 4096, 100_000].into_iter().enumerate() {
            let m = msg(i as u64, len);
            assert_eq!(c.call(2, m.clone()).await.unwrap(), m);
        }
        assert_eq!(c.connections_opened(), 1);
        assert_eq!(c.in_flight(2), 0);
        let summary = server.stop().await;
        assert_eq!(summary.requests, 5);
        assert_eq!(summary.refused, 0);
        assert!(matches!(
            c.call(7, msg(0, 0)).await,
            Err(TransportError::UnknownPeer { peer: 7 })
        ));
    });
}

/// Echoes after a delay that depends on the sequence, so responses come back out of order.
struct SlowEcho;

impl Handler for SlowEcho {
    async fn handle(&self, _from: NodeId, request: Message) -> Message {
        glommio::timer::sleep(Duration::from_micros((request.sequence % 7) * 300)).await;
        request
    }
}

#[test]
fn many_concurrent_calls_pipeline_on_one_connection() {
    run(async {
        let server = Server::start(2, Rc::new(SlowEcho), quick());
        let c = client(1, 2, server.addr, quick());
        let calls: Vec<_> = (0..300u64)
            .map(|i| {
                let c = c.clone();
                let len = match i {
                    0 => 1 << 20,
                    _ => (i as usize * 37) % 20_000,
                };
                glommio::spawn_local(async move {
                    let m = msg(i, len);
                    (c.call(2, m.clone()).await, m)
                })
            })
            .collect();
        for call in calls {
            let (got, sent) = call.await;
            assert_eq!(got.unwrap(), sent);
        }
        assert_eq!(c.connections_opened(), 1, "calls share one connection");
        assert_eq!(server.stop().await.requests, 300);
    });
}

/// Holds every request until the gate opens, counting how many it holds at once.
struct Gate {
    held: Cell<usize>,
    max_held: Cell<usize>,
    open: Signal,
}

impl Handler for Gate {
    async fn handle(&self, _from: NodeId, request: Message) -> Message {
        self.held.set(self.held.get() + 1);
        self.max_held.set(self.max_held.get().max(self.held.get()));
        self.open.wait().await;
        self.held.set(self.held.get() - 1);
        request
    }
}

impl Gate {
    fn new() -> Rc<Gate> {
        Rc::new(Gate {
            held: Cell::new(0),
            max_held: Cell::new(0),
            open: Signal::new(),
        })
    }
}

#[test]
fn back_pressure_makes_callers_wait_not_fail() {
    run(async {
        let gate = Gate::new();
        let server = Server::start(2, gate.clone(), quick());
        let config = TcpConfig {
            max_in_flight: 4,
            ..quick()
        };
        let c = client(1, 2, server.addr, config);
        let calls: Vec<_> = (0..20u64)
            .map(|i| {
                let c = c.clone();
                glommio::spawn_local(async move { c.call(2, msg(i, 10)).await })
            })
            .collect();
        glommio::timer::sleep(Duration::from_millis(100)).await;
        assert_eq!(c.in_flight(2), 4, "only max_in_flight calls are out");
        assert_eq!(gate.held.get(), 4);
        gate.open.fire();
        for (i, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap(), msg(i as u64, 10));
        }
        assert_eq!(gate.max_held.get(), 4);
        server.stop().await;
    });
}

#[test]
fn server_limits_requests_per_connection() {
    run(async {
        let gate = Gate::new();
        let server_config = TcpConfig {
            max_in_flight: 3,
            ..quick()
        };
        let server = Server::start(2, gate.clone(), server_config);
        let c = client(1, 2, server.addr, quick());
        let calls: Vec<_> = (0..10u64)
            .map(|i| {
                let c = c.clone();
                glommio::spawn_local(async move { c.call(2, msg(i, 10)).await })
            })
            .collect();
        glommio::timer::sleep(Duration::from_millis(100)).await;
        assert_eq!(gate.held.get(), 3, "the server stops reading when full");
        gate.open.fire();
        for call in calls {
            call.await.unwrap();
        }
        server.stop().await;
    });
}

#[test]
fn reconnects_after_a_peer_restart() {
    run(async {
        let server = Server::start(2, Rc::new(Echo), quick());
        let addr = server.addr;
        let c = client(1, 2, addr, quick());
        c.call(2, msg(1, 10)).await.unwrap();
        server.stop().await;
        // The old connection is gone: the call fails fast, typed.
        let err = c.call(2, msg(2, 10)).await.unwrap_err();
        assert!(
            matches!(
                err,
                TransportError::PeerClosed { peer: 2 }
                    | TransportError::Unreachable { peer: 2, .. }
            ),
            "{err:?}"
        );
        // While the peer is down, calls fail as unreachable (and back off).
        let err = c.call(2, msg(3, 10)).await.unwrap_err();
        assert!(
            matches!(err, TransportError::Unreachable { peer: 2, .. }),
            "{err:?}"
        );
        let server = Server::start_on(addr, 2, Rc::new(Echo), quick());
        let mut answered = None;
        for _ in 0..200 {
            match c.call(2, msg(4, 10)).await {
                Ok(m) => {
                    answered = Some(m);
                    break;
                }
                Err(TransportError::Unreachable { .. } | TransportError::PeerClosed { .. }) => {
                    glommio::timer::sleep(Duration::from_millis(5)).await
                }
                Err(e) => panic!("{e:?}"),
            }
        }
        assert_eq!(answered, Some(msg(4, 10)));
        assert_eq!(c.connections_opened(), 2);
        server.stop().await;
    });
}

#[test]
fn unreachable_peer_backs_off() {
    run(async {
        // A port nobody listens on.
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let config = TcpConfig {
            backoff_min: Duration::from_secs(30),
            backoff_max: Duration::from_secs(30),
            ..quick()
        };
        let c = client(1, 2, addr, config);
        let err = c.call(2, msg(1, 1)).await.unwrap_err();
        assert!(
            matches!(err, TransportError::Unreachable { peer: 2, .. }),
            "{err:?}"
        );
        // During the back-off the call fails at once, without a connection attempt.
        let started = Instant::now();
        let server = Server::start_on(addr, 2, Rc::new(Echo), quick());
        let err = c.call(2, msg(2, 1)).await.unwrap_err();
        assert!(
            matches!(err, TransportError::Unreachable { peer: 2, .. }),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
        // A new address clears the back-off.
        c.set_peer(2, server.addr);
        assert_eq!(c.call(2, msg(3, 1)).await.unwrap(), msg(3, 1));
        server.stop().await;
    });
}

#[test]
fn wrong_node_at_the_address_is_refused() {
    run(async {
        let server = Server::start(3, Rc::new(Echo), quick());
        let c = client(1, 2, server.addr, quick());
        let err = c.call(2, msg(1, 1)).await.unwrap_err();
        assert!(
            matches!(
                err,
                TransportError::WrongNode {
                    peer: 2,
                    answered: 3
                }
            ),
            "{err:?}"
        );
        server.stop().await;
    });
}

/// Node 2 of another cluster at the address: refused by both ends (the caller learns why), while
/// a side that does not know its cluster yet talks to anyone.
#[test]
fn a_node_of_another_cluster_is_refused() {
    run(async {
        let any = "127.0.0.1:0".parse().unwrap();
        let server = Server::start_in(any, 2, ClusterTag::new(0xB), Rc::new(Echo), quick());
        let ours = ClusterTag::new(0xA);
        let c = Rc::new(TcpTransport::new(1, ours.clone(), quick()));
        c.set_peer(2, server.addr);
        let err = c.call(2, msg(1, 1)).await.unwrap_err();
        assert!(
            matches!(
                err,
                TransportError::WrongCluster {
                    peer: 2,
                    ours: 0xA,
                    theirs: 0xB
                }
            ),
            "{err:?}"
        );
        // The server refused its end too (it does not rely on the caller giving up).
        let unknown = client(1, 2, server.addr, quick());
        assert_eq!(unknown.call(2, msg(2, 1)).await.unwrap(), msg(2, 1));
        // A caller that learns it is in cluster B is answered (after its back-off).
        ours.set(0xB);
        let mut tries = 0;
        let answered = loop {
            match c.call(2, msg(3, 1)).await {
                Err(TransportError::Unreachable { .. } | TransportError::WrongCluster { .. })
                    if tries < 100 =>
                {
                    tries += 1;
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                }
                other => break other,
            }
        };
        assert_eq!(answered.unwrap(), msg(3, 1));
        let summary = server.stop().await;
        assert_eq!(summary.refused, 1, "{summary:?}");
        assert_eq!(summary.requests, 2);
    });
}

#[test]
fn too_large_is_refused_before_sending() {
    run(async {
        let server = Server::start(2, Rc::new(Echo), quick());
        let config = TcpConfig {
            max_payload_bytes: 1000,
            ..quick()
        };
        let c = client(1, 2, server.addr, config);
        let err = c.call(2, msg(1, 1001)).await.unwrap_err();
        assert!(
            matches!(
                err,
                TransportError::TooLarge {
                    len: 1001,
                    max: 1000,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(c.call(2, msg(1, 1000)).await.unwrap(), msg(1, 1000));
        server.stop().await;
    });
}

/// Reads one whole frame from a raw socket.
async fn read_raw(s: &mut TcpStream) -> Option<Frame> {
    let mut head = [0u8; HEAD_LEN];
    s.read_exact(&mut head).await.ok()?;
    let len = u32::from_le_bytes(head[20..24].try_into().unwrap()) as usize;
    let mut bytes = head.to_vec();
    bytes.resize(HEAD_LEN + len, 0);
    s.read_exact(&mut bytes[HEAD_LEN..]).await.ok()?;
    Some(frame::decode(&bytes, frame::MAX_PAYLOAD_LEN).unwrap().0)
}

fn raw_frame(kind: FrameKind, id: u64, m: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    frame::encode(kind, id, m, &mut out).unwrap();
    out
}

/// A fake peer: answers the hello as node 2, then runs `script` on the socket.
fn fake_peer<F, Fut>(script: F) -> SocketAddr
where
    F: FnOnce(TcpStream) -> Fut + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    glommio::spawn_local(async move {
        let mut s = listener.accept().await.unwrap();
        let hello = read_raw(&mut s).await.unwrap();
        assert_eq!(hello.kind, FrameKind::Hello);
        assert_eq!(frame::hello_node(&hello.message), Some((1, 0)));
        s.write_all(&raw_frame(FrameKind::Hello, 0, &frame::hello(2, 0)))
            .await
            .unwrap();
        script(s).await;
    })
    .detach();
    addr
}

#[test]
fn corrupt_response_fails_the_call_and_closes_the_connection() {
    run(async {
        let addr = fake_peer(|mut s| async move {
            let request = read_raw(&mut s).await.unwrap();
            let mut bytes = raw_frame(FrameKind::Response, request.request_id, &request.message);
            let last = bytes.len() - 1;
            bytes[last] ^= 0x10; // flip a payload bit
            s.write_all(&bytes).await.unwrap();
            // The client closes the connection.
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        });
        let c = client(1, 2, addr, quick());
        let err = c.call(2, msg(5, 100)).await.unwrap_err();
        assert!(
            matches!(
                err,
                TransportError::FrameCorrupt {
                    peer: 2,
                    source: FrameError::CrcMismatch {
                        part: frame::CrcPart::Payload,
                        ..
                    }
                }
            ),
            "{err:?}"
        );
    });
}

#[test]
fn corrupt_or_unsupported_requests_are_rejected_and_the_connection_closed() {
    run(async {
        let server = Server::start(2, Rc::new(Echo), quick());
        let connect = || async {
            let mut s = TcpStream::connect(server.addr).await.unwrap();
            s.write_all(&raw_frame(FrameKind::Hello, 0, &frame::hello(9, 0)))
                .await
                .unwrap();
            let hello = read_raw(&mut s).await.unwrap();
            assert_eq!(frame::hello_node(&hello.message), Some((2, 0)));
            s
        };

        // A flipped payload bit: the header verified, so the reject names the request.
        let mut s = connect().await;
        let good = raw_frame(FrameKind::Request, 1, &msg(1, 50));
        s.write_all(&good).await.unwrap();
        assert_eq!(read_raw(&mut s).await.unwrap().message, msg(1, 50));
        let mut bad = raw_frame(FrameKind::Request, 2, &msg(2, 50));
        bad[HEAD_LEN + 3] ^= 1;
        s.write_all(&bad).await.unwrap();
        let reject = read_raw(&mut s).await.unwrap();
        assert_eq!((reject.kind, reject.request_id), (FrameKind::Reject, 2));
        assert_eq!(
            RejectReason::from_code(reject.message.op),
            Some(RejectReason::Corrupt)
        );
        let mut rest = Vec::new();
        assert_eq!(s.read_to_end(&mut rest).await.unwrap(), 0, "then closed");

        // A frame from a newer version (header crc valid): rejected as unsupported.
        let mut s = connect().await;
        let mut newer = raw_frame(FrameKind::Request, 7, &msg(3, 10));
        newer[4] = 2;
        let crc = crc32c::crc32c_append(crc32c::crc32c(&newer[0..28]), &newer[32..64]);
        newer[28..32].copy_from_slice(&crc.to_le_bytes());
        s.write_all(&newer).await.unwrap();
        let reject = read_raw(&mut s).await.unwrap();
        assert_eq!((reject.kind, reject.request_id), (FrameKind::Reject, 7));
        assert_eq!(
            RejectReason::from_code(reject.message.op),
            Some(RejectReason::VersionUnsupported)
        );

        // Garbage: closed without a reject (nothing in it can be trusted).
        let mut s = connect().await;
        s.write_all(&[0xAB; 100]).await.unwrap();
        let mut rest = Vec::new();
        assert_eq!(s.read_to_end(&mut rest).await.unwrap(), 0);

        let summary = server.stop().await;
        assert_eq!(summary.refused, 3);
        assert_eq!(summary.requests, 1);
    });
}

#[test]
fn reject_from_the_peer_is_a_typed_error() {
    run(async {
        let addr = fake_peer(|mut s| async move {
            let request = read_raw(&mut s).await.unwrap();
            let reject = frame::reject(RejectReason::VersionUnsupported);
            s.write_all(&raw_frame(FrameKind::Reject, request.request_id, &reject))
                .await
                .unwrap();
        });
        let c = client(1, 2, addr, quick());
        let err = c.call(2, msg(1, 1)).await.unwrap_err();
        assert!(
            matches!(err, TransportError::VersionUnsupported { peer: 2, .. }),
            "{err:?}"
        );
    });
}

#[test]
fn timeout_when_the_peer_stops_answering() {
    run(async {
        let addr = fake_peer(|mut s| async move {
            // Reads requests, never answers.
            while read_raw(&mut s).await.is_some() {}
        });
        let config = TcpConfig {
            call_timeout: Duration::from_millis(150),
            ..quick()
        };
        let c = client(1, 2, addr, config);
        let started = Instant::now();
        let err = c.call(2, msg(1, 1)).await.unwrap_err();
        assert!(
            matches!(
                err,
                TransportError::Timeout {
                    peer: 2,
                    request_id: 1,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert_eq!(c.in_flight(2), 0, "a timed-out call gives its slot back");
        // The connection stays; the next call times out too (no reconnect).
        assert!(matches!(
            c.call(2, msg(2, 1)).await,
            Err(TransportError::Timeout { request_id: 2, .. })
        ));
        assert_eq!(c.connections_opened(), 1);
    });
}

#[test]
fn shutdown_fails_calls_in_flight() {
    run(async {
        let gate = Gate::new();
        let server = Server::start(2, gate.clone(), quick());
        let c = client(1, 2, server.addr, quick());
        let c2 = c.clone();
        let call = glommio::spawn_local(async move { c2.call(2, msg(1, 1)).await });
        glommio::timer::sleep(Duration::from_millis(50)).await;
        c.shutdown();
        assert!(matches!(call.await, Err(TransportError::Shutdown)));
        assert!(matches!(
            c.call(2, msg(2, 1)).await,
            Err(TransportError::Shutdown)
        ));
        gate.open.fire();
        server.stop().await;
    });
}

#[test]
fn each_core_keeps_its_own_connection_to_a_peer() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;

    let (addr_tx, addr_rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let server_stop = stop.clone();
    let server = LocalExecutorBuilder::default()
        .io_memory(1 << 20)
        .name("transport-server")
        .spawn(move || async move {
            let server = Server::start(2, Rc::new(SlowEcho), quick());
            addr_tx.send(server.addr).unwrap();
            while !server_stop.load(Ordering::Acquire) {
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
            server.stop().await
        })
        .unwrap();
    let addr = addr_rx.recv().unwrap();
    let cores: Vec<_> = (0..2u64)
        .map(|core| {
            LocalExecutorBuilder::default()
                .io_memory(1 << 20)
                .name("transport-core")
                .spawn(move || async move {
                    let c = client(1, 2, addr, quick());
                    let calls: Vec<_> = (0..50u64)
                        .map(|i| {
                            let c = c.clone();
                            let m = msg(core * 1000 + i, 300);
                            glommio::spawn_local(async move { (c.call(2, m.clone()).await, m) })
                        })
                        .collect();
                    for call in calls {
                        let (got, sent) = call.await;
                        assert_eq!(got.unwrap(), sent);
                    }
                    c.connections_opened()
                })
                .unwrap()
        })
        .collect();
    for core in cores {
        assert_eq!(core.join().unwrap(), 1, "one connection per peer per core");
    }
    stop.store(true, Ordering::Release);
    let summary = server.join().unwrap();
    assert_eq!(summary.connections, 2, "one connection from each core");
    assert_eq!(summary.requests, 100);
}
