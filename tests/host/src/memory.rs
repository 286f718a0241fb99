//! Linear-memory accounting: a `ResourceLimiter` per store records the largest size any memory
//! asked for, and refuses growth past a limit so a runaway component traps instead of eating
//! the machine.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Growth beyond this fails (memory.grow returns -1; Rust's allocator then aborts = a trap).
pub const MEMORY_LIMIT: usize = 1 << 30;

pub struct Limiter {
    /// This request's peak, shared with the server so it can be reported after the store is gone.
    pub request_peak: Arc<AtomicUsize>,
    /// The host-wide peak since start / last reset.
    pub host_peak: Arc<AtomicUsize>,
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > MEMORY_LIMIT || maximum.is_some_and(|m| desired > m) {
            return Ok(false);
        }
        // Called for the initial allocation too, so small instances are counted as well.
        self.request_peak.fetch_max(desired, Ordering::Relaxed);
        self.host_peak.fetch_max(desired, Ordering::Relaxed);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}
