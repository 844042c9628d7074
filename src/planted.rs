//! Known bugs, planted on purpose so the simulator can prove it finds them
//! (`sim/tests/planted.rs`). Compiled only with the `planted-bugs` feature,
//! which only the sim crate's tests enable; every switch is off by default.
//!
//! Switches are per thread: a turmoil simulation runs all its hosts, and so
//! every pool worker and consumer task, on the thread that steps it, so
//! simulations on other threads (parallel tests) are not affected.

use std::cell::Cell;

/// The bugs that can be planted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    /// The consumer commits one past the highest completed offset instead of
    /// the frontier (the lowest incomplete one).
    CommitMaxHandled,
    /// The pool ignores the aggregate key: events of one aggregate run concurrently.
    IgnoreKey,
    /// The consumer counts an event as completed (committable) when it is
    /// dispatched, before its handler ran.
    CommitBeforeComplete,
    /// On close the pool drops its queued events and reports them done.
    DropQueuedOnClose,
}

impl Bug {
    /// Every planted bug.
    pub const ALL: [Bug; 4] = [Bug::CommitMaxHandled, Bug::IgnoreKey, Bug::CommitBeforeComplete, Bug::DropQueuedOnClose];

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

thread_local! {
    static ACTIVE: Cell<u8> = const { Cell::new(0) };
}

/// Whether `bug` is planted on this thread.
pub fn active(bug: Bug) -> bool {
    ACTIVE.with(|a| a.get() & bug.bit() != 0)
}

/// Plants `bug` on this thread until the guard is dropped.
#[must_use = "the bug is removed when the guard is dropped"]
pub fn plant(bug: Bug) -> Planted {
    ACTIVE.with(|a| a.set(a.get() | bug.bit()));
    Planted(bug)
}

/// Removes its bug when dropped.
#[derive(Debug)]
pub struct Planted(Bug);

impl Drop for Planted {
    fn drop(&mut self) {
        let bit = self.0.bit();
        ACTIVE.with(|a| a.set(a.get() & !bit));
    }
}
