//! One clock for every timestamp the service writes. Metering and expiry are computed from
//! these timestamps, so tests drive a [`ManualClock`] instead of sleeping.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch, UTC. Stored as-is (BIGINT) in the database, so every
/// interval is exact integer arithmetic in Rust and in plain SQL alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    pub const MICROS_PER_SECOND: i64 = 1_000_000;

    pub const fn from_micros(micros: i64) -> Self {
        Self(micros)
    }

    pub const fn from_seconds(seconds: i64) -> Self {
        Self(seconds * Self::MICROS_PER_SECOND)
    }

    pub const fn as_micros(self) -> i64 {
        self.0
    }

    /// `self + micros`, saturating instead of overflowing on absurd inputs.
    pub fn saturating_add_micros(self, micros: i64) -> Self {
        Self(self.0.saturating_add(micros))
    }

    /// Whole seconds and the sub-second nanos, as `google.protobuf.Timestamp` wants them.
    pub fn to_seconds_nanos(self) -> (i64, i32) {
        let seconds = self.0.div_euclid(Self::MICROS_PER_SECOND);
        let micros = self.0.rem_euclid(Self::MICROS_PER_SECOND);
        // micros < 1_000_000, so nanos < 1e9 fits in i32.
        (seconds, (micros * 1_000) as i32)
    }
}

pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    fn now(&self) -> Timestamp;
}

/// The real wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp(i64::try_from(since_epoch.as_micros()).unwrap_or(i64::MAX))
    }
}

/// A clock that only moves when told to; clones share the same time.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    pub fn new(start: Timestamp) -> Self {
        Self(Arc::new(AtomicI64::new(start.as_micros())))
    }

    pub fn set(&self, to: Timestamp) {
        self.0.store(to.as_micros(), Ordering::SeqCst);
    }

    pub fn advance_seconds(&self, seconds: i64) {
        self.0
            .fetch_add(seconds * Timestamp::MICROS_PER_SECOND, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_nanos_split_handles_pre_epoch_times() {
        assert_eq!(
            Timestamp::from_micros(1_500_000).to_seconds_nanos(),
            (1, 500_000_000)
        );
        assert_eq!(
            Timestamp::from_micros(-1).to_seconds_nanos(),
            (-1, 999_999_000)
        );
    }

    #[test]
    fn manual_clock_clones_share_time() {
        let clock = ManualClock::new(Timestamp::from_seconds(100));
        let other = clock.clone();
        clock.advance_seconds(5);
        assert_eq!(other.now(), Timestamp::from_seconds(105));
    }
}
