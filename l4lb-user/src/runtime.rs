//! State shared by every listener of the data path.

use std::future::Future;
use std::net::TcpStream as StdTcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

use arc_swap::ArcSwap;
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::sync::{oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::logging::AccessSink;
use crate::splice::Splicer;
use crate::upgrade::wire;

pub struct DataPath {
    /// The kernel path, when it loaded.
    pub splicer: Option<Arc<Splicer>>,
    /// `max_connections` permits; a session holds one for its lifetime.
    pub conn_limit: Arc<Semaphore>,
    /// Every session task, so SIGTERM can wait for them to drain.
    pub sessions: TaskTracker,
    /// Raised when the drain grace period is over: sessions still open end then.
    pub shutdown: Alarm,
    /// Raised once every listener of the start is open: a binary upgrade's new process
    /// that fails to open one exits without having taken a client.
    pub accepting: Alarm,
    pub access_log: Arc<AccessSink>,
    pub handover: Handover,
}

impl DataPath {
    /// Wakes the sessions asleep in the kernel, so each sees a handover or shutdown
    /// that just began (a running session sees it on its own).
    pub fn wake_dormant(&self) {
        if let Some(splicer) = &self.splicer {
            splicer.wake_all();
        }
    }
}

/// A cancellation that every session waits for on every wake-up. Looking at a
/// `CancellationToken` takes its mutex, and polling its future takes another: four
/// locks per message each way for the two a copying session waits for (3% of the
/// daemon's keep-alive CPU). Waiting here looks at a flag instead, and at the token only
/// on the first poll and once the flag is up.
#[derive(Default)]
pub struct Alarm {
    raised: AtomicBool,
    token: CancellationToken,
}

impl Alarm {
    pub fn raise(&self) {
        // Before the token wakes the waiters, so each sees the flag when it runs.
        self.raised.store(true, Ordering::Release);
        self.token.cancel();
    }

    pub fn is_raised(&self) -> bool {
        self.raised.load(Ordering::Acquire)
    }

    /// For waiters that wake rarely (UDP sessions, the kernel path): they take child
    /// tokens of their own.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Resolves once the alarm is raised.
    pub async fn raised(&self) {
        let cancelled = self.token.cancelled();
        tokio::pin!(cancelled);
        let mut registered: Option<Waker> = None;
        std::future::poll_fn(|cx| {
            // The token holds this task's waker from an earlier poll and wakes it when
            // raised: until then a wake-up was for something else.
            if !self.is_raised() && registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                return Poll::Pending;
            }
            registered = Some(cx.waker().clone());
            cancelled.as_mut().poll(cx)
        })
        .await;
    }
}

/// A TCP session stopped at a clean point for a binary upgrade. `back` answers with
/// the sockets when the session stays in this process, or with nothing once the new
/// process took it.
pub struct Parked {
    pub session: wire::TcpSession,
    pub client: StdTcpStream,
    pub backend: StdTcpStream,
    pub back: oneshot::Sender<Option<(StdTcpStream, StdTcpStream)>>,
}

/// How a binary upgrade asks TCP sessions for their sockets: the control plane begins
/// a handover, sessions see the token and park themselves, and the upgrade answers each.
#[derive(Default)]
pub struct Handover {
    alarm: ArcSwap<Alarm>,
    parked: Mutex<Option<UnboundedSender<Parked>>>,
}

impl Handover {
    /// Raised while a handover runs; sessions select on the one current at each stage
    /// of their life.
    pub fn alarm(&self) -> Arc<Alarm> {
        self.alarm.load_full()
    }

    /// Sessions park into the returned receiver from now until [`Handover::end`].
    pub fn begin(&self) -> UnboundedReceiver<Parked> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.lock() = Some(tx);
        self.alarm.load().raise();
        rx
    }

    /// Sessions that park from now on get their sockets back at once.
    pub fn end(&self) {
        *self.lock() = None;
        self.alarm.store(Arc::new(Alarm::default()));
    }

    /// Hands a parked session to the upgrade; gives it back when none runs.
    pub fn park(&self, parked: Parked) -> Option<Parked> {
        match self.lock().as_ref() {
            Some(tx) => tx.send(parked).err().map(|e| e.0),
            None => Some(parked),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<UnboundedSender<Parked>>> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::pin;
    use std::sync::atomic::AtomicUsize;
    use std::task::{Context, Wake};

    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn count(w: &Wakes) -> usize {
        w.0.load(Ordering::SeqCst)
    }

    #[test]
    fn a_raised_alarm_wakes_its_waiter_after_polls_for_other_reasons() {
        let alarm = Alarm::default();
        let wakes = Arc::new(Wakes::default());
        let waker = Waker::from(Arc::clone(&wakes));
        let mut cx = Context::from_waker(&waker);
        let mut raised = pin!(alarm.raised());
        for _ in 0..3 {
            assert!(raised.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(count(&wakes), 0);
        alarm.raise();
        assert_eq!(count(&wakes), 1, "raising wakes the waiter");
        assert!(raised.as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn a_waiter_polled_with_a_new_waker_is_woken_through_that_one() {
        let alarm = Alarm::default();
        let (old, new) = (Arc::new(Wakes::default()), Arc::new(Wakes::default()));
        let old_waker = Waker::from(Arc::clone(&old));
        let new_waker = Waker::from(Arc::clone(&new));
        let mut raised = pin!(alarm.raised());
        assert!(raised
            .as_mut()
            .poll(&mut Context::from_waker(&old_waker))
            .is_pending());
        assert!(raised
            .as_mut()
            .poll(&mut Context::from_waker(&new_waker))
            .is_pending());
        alarm.raise();
        assert_eq!((count(&old), count(&new)), (0, 1));
        assert!(raised
            .as_mut()
            .poll(&mut Context::from_waker(&new_waker))
            .is_ready());
    }

    #[test]
    fn an_alarm_raised_before_the_wait_is_ready_at_once() {
        let alarm = Alarm::default();
        alarm.raise();
        assert!(alarm.is_raised());
        let waker = Waker::from(Arc::new(Wakes::default()));
        let mut raised = pin!(alarm.raised());
        assert!(raised
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_ready());
        assert!(alarm.token().is_cancelled());
    }
}
