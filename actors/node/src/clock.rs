//! Time as the shell reads it and hands to the core: wall-clock milliseconds for version
//! timestamps, monotonic milliseconds since start for timers.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Monotonic milliseconds since the process first asked.
pub fn mono_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// The time as the core takes it.
pub fn now() -> ringkv::stage::Now {
    ringkv::stage::Now { mono_ms: mono_ms(), wall_ms: wall_ms() }
}
