//! Panics in per-connection code: caught, counted and logged once with the session's
//! addresses, so one bad session never takes others down or goes unnoticed.
//!
//! While a future runs under [`catch`], the process-wide hook only records the panic's
//! message and location for the catcher, which knows the session and logs one line with
//! everything. Elsewhere the previous hook runs as before.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::future::Future;
use std::panic::{self, AssertUnwindSafe, PanicHookInfo};
use std::pin::Pin;
use std::sync::Once;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;

thread_local! {
    /// How many [`Catch`] polls are on this thread's stack.
    static CATCHING: Cell<u32> = const { Cell::new(0) };
    /// What the hook saw of the last panic raised under a [`Catch`].
    static CAUGHT: RefCell<Option<Panicked>> = const { RefCell::new(None) };
}

/// A caught panic: its message and where it was raised.
#[derive(Clone, Debug)]
pub struct Panicked {
    pub message: String,
    pub location: String,
}

impl fmt::Display for Panicked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {}", self.message, self.location)
    }
}

fn describe(info: &PanicHookInfo<'_>) -> Panicked {
    let payload = info.payload();
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic payload)".to_string());
    let location = info
        .location()
        .map_or_else(|| "?".to_string(), ToString::to_string);
    Panicked { message, location }
}

/// Wraps the current hook: under [`catch`] the panic is kept for the caller, who logs
/// it with its context; elsewhere the previous hook runs. Installs once per process.
pub fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if CATCHING.with(Cell::get) > 0 {
                let panicked = describe(info);
                CAUGHT.with(|c| *c.borrow_mut() = Some(panicked));
            } else {
                previous(info);
            }
        }));
    });
}

pin_project! {
    /// See [`catch`].
    pub struct Catch<F> {
        #[pin]
        inner: F,
    }
}

/// Runs `inner`, turning a panic in any of its polls into `Err`. The future is not
/// polled again after a panic; what it owned has been dropped by the unwind.
pub fn catch<F: Future>(inner: F) -> Catch<F> {
    Catch { inner }
}

impl<F: Future> Future for Catch<F> {
    type Output = Result<F::Output, Panicked>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.project().inner;
        CATCHING.with(|c| c.set(c.get() + 1));
        // The session's state is dropped or abandoned after a panic, never observed half
        // updated; shared state it touches (atomics, poison-tolerant locks) stays valid.
        let polled = panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx)));
        CATCHING.with(|c| c.set(c.get() - 1));
        match polled {
            Ok(p) => p.map(Ok),
            Err(_) => {
                let caught = CAUGHT.with(|c| c.borrow_mut().take());
                Poll::Ready(Err(caught.unwrap_or_else(|| Panicked {
                    message: "(panic hook not installed)".to_string(),
                    location: "?".to_string(),
                })))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_in_a_future_comes_back_as_an_error_with_its_location() {
        install_hook();
        let v: Vec<u32> = Vec::new();
        let i = v.len();
        let got = catch(async move {
            tokio::task::yield_now().await;
            v[i]
        })
        .await;
        let p = got.expect_err("the index panics");
        assert!(p.message.contains("index out of bounds"), "{p}");
        assert!(p.location.contains("panic.rs"), "{p}");
        assert_eq!(CATCHING.with(Cell::get), 0);
        assert_eq!(catch(async { 7 }).await.ok(), Some(7));
    }
}
