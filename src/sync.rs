//! The one place that picks `std` or `loom` synchronization primitives.
//!
//! Code that loom must model-check (the pool core) imports its primitives from
//! here only, so production has one spelling and `--features loom` swaps every
//! one of them at once (the pattern of tokio's `src/loom/`).

// Not every primitive is used at every moment: these are the ones
// loom-checked code may take.
#[cfg(not(feature = "loom"))]
#[allow(unused_imports)]
pub use std::sync::{
    atomic::{AtomicBool, AtomicUsize, Ordering},
    Arc, Mutex, MutexGuard,
};

#[cfg(feature = "loom")]
#[allow(unused_imports)]
pub use loom::sync::{
    atomic::{AtomicBool, AtomicUsize, Ordering},
    Arc, Mutex, MutexGuard,
};

/// Locks a mutex, recovering the guard if a panicking thread poisoned it.
///
/// The pool never panics while holding its lock (handlers run outside it), so
/// a poisoned lock can only come from a bug elsewhere; the state is still
/// consistent and refusing to continue would lose accepted messages.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}
