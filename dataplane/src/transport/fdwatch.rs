//! Waiting, from a glommio task, until a file descriptor becomes readable.
//!
//! glommio 0.9 has no public "wake me when this fd is readable" (its pollable sources are
//! internal), and reading the fd through a glommio stream would consume what the fd's owner must
//! read itself (an RDMA completion channel's events are read by `ibv_get_cq_event`). So a parked
//! helper thread waits in `poll(2)` on the fd, and only while a task is waiting: it is armed by
//! [`FdWatch::readable`], fires the task's `Waker` once (glommio accepts wakes from foreign
//! threads) and disarms itself until the next wait. A mutex guards the hand-over; it is touched
//! only on the transitions between busy and idle, never per I/O. An idle core costs nothing: the
//! executor sleeps in its reactor and the helper in `poll(2)`.

use std::ffi::c_void;
use std::future::poll_fn;
use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

#[derive(Default)]
struct WatchState {
    waker: Option<Waker>,
    ready: bool,
    stop: bool,
}

/// A helper thread that waits in `poll(2)` on one fd while a task is waiting for it.
pub(crate) struct FdWatch {
    state: Arc<Mutex<WatchState>>,
    kick: RawFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FdWatch {
    /// Starts the helper thread for `fd` (which must stay open while the watch lives).
    pub(crate) fn new(fd: RawFd) -> io::Result<FdWatch> {
        // SAFETY: plain syscall.
        let kick = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if kick < 0 {
            return Err(io::Error::last_os_error());
        }
        let state = Arc::new(Mutex::new(WatchState::default()));
        let thread_state = state.clone();
        let thread = std::thread::Builder::new()
            .name("cairn-rdma-watch".into())
            .spawn(move || watch_loop(fd, kick, &thread_state))?;
        Ok(FdWatch {
            state,
            kick,
            thread: Some(thread),
        })
    }

    fn kick(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes to our eventfd.
        unsafe { libc::write(self.kick, &one as *const u64 as *const c_void, 8) };
    }

    /// Returns once the fd has been readable since the call began.
    pub(crate) async fn readable(&self) {
        poll_fn(|cx| {
            let mut state = self.state.lock().expect("watch state");
            if state.ready {
                state.ready = false;
                return Poll::Ready(());
            }
            let arm = state.waker.is_none();
            state.waker = Some(cx.waker().clone());
            drop(state);
            if arm {
                self.kick();
            }
            Poll::Pending
        })
        .await
    }
}

fn watch_loop(fd: RawFd, kick: RawFd, state: &Mutex<WatchState>) {
    loop {
        let armed = {
            let s = state.lock().expect("watch state");
            if s.stop {
                return;
            }
            s.waker.is_some()
        };
        let mut fds = [
            libc::pollfd {
                fd: kick,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let count = if armed { 2 } else { 1 };
        // SAFETY: `fds` outlives the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), count, -1) };
        if n < 0 {
            continue; // EINTR
        }
        if fds[0].revents != 0 {
            let mut buf = 0u64;
            // SAFETY: drains our eventfd.
            unsafe { libc::read(kick, &mut buf as *mut u64 as *mut c_void, 8) };
        }
        if armed && fds[1].revents != 0 {
            let waker = {
                let mut s = state.lock().expect("watch state");
                s.ready = true;
                s.waker.take()
            };
            if let Some(w) = waker {
                w.wake();
            }
        }
    }
}

impl Drop for FdWatch {
    fn drop(&mut self) {
        self.state.lock().expect("watch state").stop = true;
        self.kick();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // SAFETY: our eventfd, closed once.
        unsafe { libc::close(self.kick) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;
    use std::time::Duration;

    #[test]
    fn wakes_a_waiting_task_once_per_readiness() {
        glommio::LocalExecutorBuilder::default()
            .io_memory(1 << 20)
            .make()
            .expect("executor")
            .run(async {
                let mut fds = [0; 2];
                // SAFETY: plain syscall into a local array.
                assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
                let (read_end, write_end) = (fds[0], fds[1]);
                let watch = Rc::new(FdWatch::new(read_end).expect("watch"));
                for round in 0..3u8 {
                    let w = watch.clone();
                    let woke = Rc::new(std::cell::Cell::new(false));
                    let flag = woke.clone();
                    let waiter = glommio::spawn_local(async move {
                        w.readable().await;
                        flag.set(true);
                    });
                    glommio::timer::sleep(Duration::from_millis(20)).await;
                    assert!(!woke.get(), "woke before the fd was readable");
                    // SAFETY: writes one byte to our pipe.
                    assert_eq!(
                        unsafe { libc::write(write_end, &round as *const u8 as *const c_void, 1) },
                        1
                    );
                    waiter.await;
                    assert!(woke.get());
                    // The owner consumes the readiness, as ibv_get_cq_event would.
                    let mut byte = 0u8;
                    // SAFETY: reads one byte from our pipe.
                    assert_eq!(
                        unsafe { libc::read(read_end, &mut byte as *mut u8 as *mut c_void, 1) },
                        1
                    );
                    assert_eq!(byte, round);
                }
                drop(watch); // joins the helper thread
                // SAFETY: our pipe, closed once.
                unsafe {
                    libc::close(read_end);
                    libc::close(write_end);
                }
            });
    }
}
