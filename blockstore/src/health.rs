//! Disk health: a device wrapper that watches every operation for I/O errors and for
//! operations that take too long, and the policy that takes a disk offline and back.
//!
//! * [`Monitored`] wraps any [`BlockDevice`]. It counts `DeviceError::Io` results (range and
//!   alignment errors are the caller's bugs, not the disk's) and the operations in flight per
//!   *generation* (a counter per age class that [`DiskWatch`] advances with time: nothing per
//!   operation is allocated or timed), so an operation stuck in the device is seen while it
//!   hangs, even while others complete. Once its
//!   [`DeviceHealth`] is set offline, every operation fails at once with
//!   [`DeviceError::Offline`] and the disk is not touched again until it is set online.
//! * [`DiskWatch`] is the policy, after the seeds: a disk with an I/O error, or with
//!   an operation in flight for [`HealthPolicy::io_timeout`], goes offline; after
//!   [`HealthPolicy::readmit_after`] it is validated and, if sound, re-admitted; the
//!   [`HealthPolicy::offline_limit`]-th time within [`HealthPolicy::window`] (3 in an hour) it
//!   stays offline until an operator intervenes. It is pure logic over the times it is given.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::buf::DmaBuf;
use crate::device::{BlockDevice, DeviceError, DeviceInfo, IoOp};

/// Defaults of [`HealthPolicy`], from the seeds.
pub const DEFAULT_OFFLINE_LIMIT: u32 = 3;
/// The window in which [`DEFAULT_OFFLINE_LIMIT`] offline events retire a disk.
pub const DEFAULT_OFFLINE_WINDOW: Duration = Duration::from_secs(3600);
/// An operation in flight longer than this takes the disk offline.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an offline disk rests before it is validated for re-admission.
pub const DEFAULT_READMIT_AFTER: Duration = Duration::from_secs(60);

/// What a device's watchers share: error count, operations in flight by generation, the
/// offline switch.
#[derive(Clone, Default)]
pub struct DeviceHealth {
    inner: Rc<HealthInner>,
}

/// Age classes of operations in flight (see [`DeviceHealth::in_flight_by_generation`]).
const GENERATIONS: usize = 32;

#[derive(Default)]
struct HealthInner {
    errors: Cell<u64>,
    last_error: RefCell<Option<String>>,
    offline: Cell<bool>,
    /// The generation operations started now belong to; [`DiskWatch`] advances it with time.
    generation: Cell<u64>,
    /// Operations in flight per generation, at `generation % GENERATIONS`.
    by_generation: [Cell<u64>; GENERATIONS],
}

impl DeviceHealth {
    /// I/O errors seen since the device was opened.
    pub fn errors(&self) -> u64 {
        self.inner.errors.get()
    }

    /// The last I/O error, as text.
    pub fn last_error(&self) -> Option<String> {
        self.inner.last_error.borrow().clone()
    }

    /// Operations in flight now (every generation's, however old).
    pub fn in_flight(&self) -> u64 {
        self.inner.by_generation.iter().map(Cell::get).sum()
    }

    /// Whether operations are refused.
    pub fn is_offline(&self) -> bool {
        self.inner.offline.get()
    }

    /// Refuses (true) or admits (false) operations from now on.
    pub fn set_offline(&self, offline: bool) {
        self.inner.offline.set(offline);
    }

    /// The current generation.
    fn generation(&self) -> u64 {
        self.inner.generation.get()
    }

    /// Starts a new generation: operations started from now on belong to it.
    fn advance_generation(&self) -> u64 {
        let g = self.inner.generation.get() + 1;
        self.inner.generation.set(g);
        g
    }

    /// Operations still in flight that started in generation `g` (0 once `g` is more than
    /// [`GENERATIONS`] behind: its slot is then another generation's).
    fn in_flight_of(&self, g: u64) -> u64 {
        if self.generation() - g >= GENERATIONS as u64 {
            return 0;
        }
        self.inner.by_generation[(g % GENERATIONS as u64) as usize].get()
    }

    fn start(&self) -> Ticket<'_> {
        let generation = self.generation();
        let slot = &self.inner.by_generation[(generation % GENERATIONS as u64) as usize];
        slot.set(slot.get() + 1);
        Ticket {
            health: self,
            generation,
        }
    }
}

/// One operation in flight; it ends when finished or dropped (a caller that gave up on it).
struct Ticket<'a> {
    health: &'a DeviceHealth,
    generation: u64,
}

impl Ticket<'_> {
    fn finish<T>(self, result: Result<T, DeviceError>) -> Result<T, DeviceError> {
        if let Err(e @ DeviceError::Io { .. }) = &result {
            let inner = &self.health.inner;
            inner.errors.set(inner.errors.get() + 1);
            *inner.last_error.borrow_mut() = Some(e.to_string());
        }
        result
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let slot =
            &self.health.inner.by_generation[(self.generation % GENERATIONS as u64) as usize];
        slot.set(slot.get().saturating_sub(1));
    }
}

/// A device whose operations are watched by a [`DeviceHealth`].
pub struct Monitored<D> {
    inner: D,
    health: DeviceHealth,
}

impl<D: BlockDevice> Monitored<D> {
    /// Wraps `inner`.
    pub fn new(inner: D) -> Self {
        Monitored {
            inner,
            health: DeviceHealth::default(),
        }
    }

    /// The health handle (shared).
    pub fn health(&self) -> DeviceHealth {
        self.health.clone()
    }

    /// The device underneath, bypassing the offline switch (for validation).
    pub fn inner(&self) -> &D {
        &self.inner
    }

    fn refuse(&self, op: IoOp, offset: u64) -> Result<(), DeviceError> {
        if self.health.is_offline() {
            return Err(DeviceError::Offline {
                device: self.inner.info().name.clone(),
                op,
                offset,
            });
        }
        Ok(())
    }
}

impl<D: BlockDevice> BlockDevice for Monitored<D> {
    fn info(&self) -> &DeviceInfo {
        self.inner.info()
    }

    async fn read(&self, offset: u64, buf: &mut DmaBuf) -> Result<(), DeviceError> {
        self.refuse(IoOp::Read, offset)?;
        let ticket = self.health.start();
        let r = self.inner.read(offset, buf).await;
        ticket.finish(r)
    }

    async fn write(&self, offset: u64, buf: &DmaBuf) -> Result<(), DeviceError> {
        self.refuse(IoOp::Write, offset)?;
        let ticket = self.health.start();
        let r = self.inner.write(offset, buf).await;
        ticket.finish(r)
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.refuse(IoOp::Flush, 0)?;
        let ticket = self.health.start();
        let r = self.inner.flush().await;
        ticket.finish(r)
    }

    async fn write_fua(&self, offset: u64, buf: &DmaBuf) -> Result<(), DeviceError> {
        self.refuse(IoOp::Write, offset)?;
        let ticket = self.health.start();
        let r = self.inner.write_fua(offset, buf).await;
        ticket.finish(r)
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.refuse(IoOp::WriteZeroes, offset)?;
        let ticket = self.health.start();
        let r = self.inner.write_zeroes(offset, len).await;
        ticket.finish(r)
    }

    async fn unmap(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.refuse(IoOp::Unmap, offset)?;
        let ticket = self.health.start();
        let r = self.inner.unmap(offset, len).await;
        ticket.finish(r)
    }
}

/// When a disk goes offline and comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthPolicy {
    /// Operations in flight with none completed for this long take the disk offline.
    pub io_timeout: Duration,
    /// An offline disk is validated for re-admission after this long.
    pub readmit_after: Duration,
    /// Offline events within [`Self::window`] that keep the disk offline.
    pub offline_limit: u32,
    /// See [`Self::offline_limit`].
    pub window: Duration,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            io_timeout: DEFAULT_IO_TIMEOUT,
            readmit_after: DEFAULT_READMIT_AFTER,
            offline_limit: DEFAULT_OFFLINE_LIMIT,
            window: DEFAULT_OFFLINE_WINDOW,
        }
    }
}

/// A disk's state under [`DiskWatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskState {
    /// In service.
    Online,
    /// Out of service since `since`, to be validated after the policy's rest.
    Offline {
        /// When it went offline.
        since: Instant,
        /// Why.
        reason: String,
    },
    /// Out of service for good (offline the policy's limit of times within its window): an
    /// operator must replace it.
    Retired {
        /// Why.
        reason: String,
    },
}

impl DiskState {
    /// `online`, `offline` or `retired`.
    pub fn name(&self) -> &'static str {
        match self {
            DiskState::Online => "online",
            DiskState::Offline { .. } => "offline",
            DiskState::Retired { .. } => "retired",
        }
    }
}

/// What the watcher asks its caller to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskAction {
    /// Take the disk out of service: stop everything on it (it is offline now).
    TakeOffline {
        /// Why.
        reason: String,
        /// Offline events within the window, this one included.
        events: u32,
        /// Whether it stays offline for good.
        retired: bool,
    },
    /// Validate the disk now and report with [`DiskWatch::validated`].
    Validate,
}

/// One disk's health policy state.
#[derive(Debug, Clone)]
pub struct DiskWatch {
    policy: HealthPolicy,
    state: DiskState,
    errors_seen: u64,
    /// The generations of operations this watch has started, oldest first, with when each
    /// began (the next one's start is its end); at most [`GENERATIONS`].
    generations: VecDeque<(u64, Instant)>,
    events: VecDeque<Instant>,
}

impl DiskWatch {
    /// A disk in service, with `errors_seen` errors already accounted for.
    pub fn new(policy: HealthPolicy, errors_seen: u64) -> Self {
        DiskWatch {
            policy,
            state: DiskState::Online,
            errors_seen,
            generations: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// The current state.
    pub fn state(&self) -> &DiskState {
        &self.state
    }

    /// Offline events within the window before `now`.
    pub fn recent_events(&self, now: Instant) -> u32 {
        self.events
            .iter()
            .filter(|&&t| now.saturating_duration_since(t) < self.policy.window)
            .count() as u32
    }

    /// Looks at the device's health at `now`.
    pub fn check(&mut self, now: Instant, health: &DeviceHealth) -> Option<DiskAction> {
        match &self.state {
            DiskState::Online => {
                let errors = health.errors();
                let reason = if errors > self.errors_seen {
                    let last = health.last_error().unwrap_or_default();
                    Some(format!(
                        "{} I/O error(s), the last: {last}",
                        errors - self.errors_seen
                    ))
                } else {
                    self.stalled(now, health)
                };
                self.errors_seen = errors;
                reason.map(|reason| self.take_offline(now, health, reason))
            }
            DiskState::Offline { since, .. }
                if now.saturating_duration_since(*since) >= self.policy.readmit_after =>
            {
                Some(DiskAction::Validate)
            }
            DiskState::Offline { .. } | DiskState::Retired { .. } => None,
        }
    }

    /// Why the device looks hung: operations in flight for longer than the timeout.
    ///
    /// Operations are counted per generation, not timed one by one (no clock read per I/O): each
    /// check starts a new generation once 1/16 of the timeout has passed since the last one
    /// began, and a generation that ended at least the timeout ago with operations still in
    /// flight means each of them has been in flight that long, even while others complete.
    fn stalled(&mut self, now: Instant, health: &DeviceHealth) -> Option<String> {
        let step = self.policy.io_timeout / (GENERATIONS as u32 / 2);
        match self.generations.back() {
            None => self.generations.push_back((health.generation(), now)),
            Some(&(_, began)) if now.saturating_duration_since(began) >= step => {
                self.generations
                    .push_back((health.advance_generation(), now));
                if self.generations.len() > GENERATIONS {
                    self.generations.pop_front();
                }
            }
            Some(_) => {}
        }
        let mut stuck = 0;
        let mut oldest = None;
        for pair in self.generations.iter().zip(self.generations.iter().skip(1)) {
            let (&(g, began), &(_, ended)) = pair;
            if now.saturating_duration_since(ended) < self.policy.io_timeout {
                break;
            }
            let n = health.in_flight_of(g);
            if n > 0 {
                stuck += n;
                oldest.get_or_insert(began);
            }
        }
        oldest.map(|began| {
            format!(
                "{stuck} operation(s) in flight for longer than the timeout ({:?}), the oldest \
                 for up to {:.1} s; {} in flight in all",
                self.policy.io_timeout,
                now.saturating_duration_since(began).as_secs_f64(),
                health.in_flight()
            )
        })
    }

    fn take_offline(&mut self, now: Instant, health: &DeviceHealth, reason: String) -> DiskAction {
        health.set_offline(true);
        self.events.push_back(now);
        while self
            .events
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= self.policy.window)
        {
            self.events.pop_front();
        }
        let events = self.events.len() as u32;
        let retired = events >= self.policy.offline_limit;
        self.state = if retired {
            DiskState::Retired {
                reason: format!(
                    "offline {events} times within {:?}; the last: {reason}",
                    self.policy.window
                ),
            }
        } else {
            DiskState::Offline {
                since: now,
                reason: reason.clone(),
            }
        };
        DiskAction::TakeOffline {
            reason,
            events,
            retired,
        }
    }

    /// The result of the validation asked for by [`DiskAction::Validate`]: `Ok` re-admits the
    /// disk (it is online again); `Err(why)` counts as another offline event.
    pub fn validated(
        &mut self,
        now: Instant,
        health: &DeviceHealth,
        result: Result<(), String>,
    ) -> Option<DiskAction> {
        match result {
            Ok(()) => {
                self.errors_seen = health.errors();
                // Operations from before going offline are not timed again.
                self.generations.clear();
                self.state = DiskState::Online;
                health.set_offline(false);
                None
            }
            Err(why) => Some(self.take_offline(now, health, format!("validation failed: {why}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> HealthPolicy {
        HealthPolicy {
            io_timeout: Duration::from_secs(5),
            readmit_after: Duration::from_secs(10),
            offline_limit: 3,
            window: Duration::from_secs(3600),
        }
    }

    /// A device's health, its watch under [`policy`], and the start of time.
    fn watched() -> (DeviceHealth, DiskWatch, Instant) {
        (
            DeviceHealth::default(),
            DiskWatch::new(policy(), 0),
            Instant::now(),
        )
    }

    fn fail(h: &DeviceHealth) {
        let t = h.start();
        let e = DeviceError::Io {
            device: "d".into(),
            op: IoOp::Write,
            offset: 4096,
            len: 4096,
            source: std::io::Error::other("ENOSPC"),
        };
        let _ = t.finish::<()>(Err(e));
    }

    #[test]
    fn an_error_takes_the_disk_offline_and_validation_brings_it_back() {
        let (h, mut w, t0) = watched();
        assert_eq!(w.check(t0, &h), None);
        fail(&h);
        let Some(DiskAction::TakeOffline {
            reason,
            events: 1,
            retired: false,
        }) = w.check(t0, &h)
        else {
            panic!("not offline: {:?}", w.state());
        };
        assert!(reason.contains("ENOSPC"), "{reason}");
        assert!(h.is_offline());
        // Rests, then asks for validation.
        assert_eq!(w.check(t0 + Duration::from_secs(9), &h), None);
        let later = t0 + Duration::from_secs(10);
        assert_eq!(w.check(later, &h), Some(DiskAction::Validate));
        assert_eq!(w.validated(later, &h, Ok(())), None);
        assert_eq!(w.state(), &DiskState::Online);
        assert!(!h.is_offline());
        // Errors seen before re-admission are not counted again.
        assert_eq!(w.check(later, &h), None);
    }

    #[test]
    fn a_device_that_stops_completing_counts_as_a_timeout() {
        let (h, mut w, t0) = watched();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // Busy but progressing: never a timeout.
        let mut op = h.start();
        assert_eq!(w.check(at(0), &h), None);
        for s in 1..20 {
            let _ = op.finish::<()>(Ok(()));
            op = h.start();
            assert_eq!(w.check(at(s * 4), &h), None);
        }
        // Idle (nothing in flight) for long: not a timeout either.
        let _ = op.finish::<()>(Ok(()));
        assert_eq!(w.check(at(200), &h), None);
        // One operation that never completes (started after the check at 200 s): offline
        // once it has been in flight for the timeout (5 s), give or take a generation.
        let stuck = h.start();
        assert_eq!(w.check(at(201), &h), None);
        assert_eq!(w.check(at(204), &h), None);
        match w.check(at(206), &h) {
            Some(DiskAction::TakeOffline { reason, .. }) => {
                assert!(reason.contains("1 operation(s) in flight"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        drop(stuck);
    }

    #[test]
    fn one_stuck_operation_is_seen_while_others_complete() {
        let (h, mut w, t0) = watched();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(w.check(at(0), &h), None);
        let stuck = h.start();
        // Others start and complete all the time; checks every 500 ms.
        for tick in 1..=9 {
            for _ in 0..100 {
                let _ = h.start().finish::<()>(Ok(()));
            }
            assert_eq!(w.check(at(tick * 500), &h), None, "at {} ms", tick * 500);
        }
        for _ in 0..100 {
            let _ = h.start().finish::<()>(Ok(()));
        }
        let busy = h.start();
        match w.check(at(5500), &h) {
            Some(DiskAction::TakeOffline { reason, .. }) => {
                assert!(
                    reason.contains("1 operation(s) in flight for longer than the timeout")
                        && reason.contains("2 in flight in all"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
        drop((stuck, busy));
        assert_eq!(h.in_flight(), 0);
    }

    #[test]
    fn an_operation_given_up_on_is_not_in_flight() {
        let (h, mut w, t0) = watched();
        assert_eq!(w.check(t0, &h), None);
        // A caller drops its request future: the ticket goes with it.
        drop(h.start());
        assert_eq!(h.in_flight(), 0);
        for s in 1..30 {
            assert_eq!(w.check(t0 + Duration::from_secs(s), &h), None);
        }
    }

    #[test]
    fn three_times_in_an_hour_keeps_it_offline_but_old_events_expire() {
        let (h, mut w, t0) = watched();
        let mut now = t0;
        // Two events, an hour apart each from the next: never retired.
        for _ in 0..4 {
            fail(&h);
            assert!(matches!(
                w.check(now, &h),
                Some(DiskAction::TakeOffline { retired: false, .. })
            ));
            now += Duration::from_secs(3600);
            assert_eq!(w.check(now, &h), Some(DiskAction::Validate));
            assert_eq!(w.validated(now, &h, Ok(())), None);
        }
        // Three within the hour: retired, and stays so.
        for i in 1..=3u32 {
            fail(&h);
            let action = w.check(now, &h);
            assert!(
                matches!(action, Some(DiskAction::TakeOffline { events, retired, .. }) if events == i && retired == (i == 3)),
                "event {i}: {action:?}"
            );
            now += Duration::from_secs(60);
            if i < 3 {
                assert_eq!(w.check(now, &h), Some(DiskAction::Validate));
                w.validated(now, &h, Ok(()));
            }
        }
        assert_eq!(w.state().name(), "retired");
        assert_eq!(w.check(now + Duration::from_secs(7200), &h), None);
        assert!(h.is_offline());
    }

    #[test]
    fn a_failed_validation_is_another_event() {
        let (h, mut w, t0) = watched();
        fail(&h);
        w.check(t0, &h);
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(w.check(t1, &h), Some(DiskAction::Validate));
        let action = w.validated(t1, &h, Err("superblock unreadable".into()));
        assert!(matches!(
            action,
            Some(DiskAction::TakeOffline {
                events: 2,
                retired: false,
                ..
            })
        ));
        assert_eq!(w.state().name(), "offline");
    }

    #[test]
    fn a_monitored_device_counts_errors_and_refuses_io_when_offline() {
        use crate::faulty::{FaultConfig, FaultyDevice};
        use crate::mem::MemDevice;
        pollster::block_on(async {
            let inner = FaultyDevice::new(
                MemDevice::new("m", 1 << 20, 512),
                FaultConfig {
                    write_error_rate: 1.0,
                    ..FaultConfig::default()
                },
            );
            let dev = Monitored::new(inner);
            let h = dev.health();
            let buf = DmaBuf::new(4096);
            assert!(dev.write(0, &buf).await.is_err());
            assert_eq!(h.errors(), 1);
            let mut out = DmaBuf::new(4096);
            dev.read(0, &mut out).await.unwrap();
            // Range errors are the caller's, not the disk's.
            assert!(dev.read(1 << 20, &mut out).await.is_err());
            assert_eq!(h.errors(), 1);
            h.set_offline(true);
            assert!(matches!(
                dev.read(0, &mut out).await,
                Err(DeviceError::Offline { .. })
            ));
            assert_eq!(h.in_flight(), 0);
            // Validation reaches the disk underneath.
            dev.inner().read(0, &mut out).await.unwrap();
        });
    }
}
