//! One clock for every timestamp the service writes. Metering and expiry are computed from
//! these timestamps, so tests drive a [`ManualClock`] instead of sleeping.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use super::error::{Error, Result};

/// Microseconds since the Unix epoch, UTC. Stored as-is (BIGINT) in the database, so every
/// interval is exact integer arithmetic in Rust and in plain SQL alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    pub const MICROS_PER_SECOND: i64 = 1_000_000;

    /// Earliest instant a request may name: 0001-01-01T00:00:00Z, the first instant a
    /// `google.protobuf.Timestamp` may hold. Bounding requests to the protobuf range keeps
    /// every month and day computed from them far inside i64 microseconds.
    pub const EARLIEST: Self = Self(-62_135_596_800 * Self::MICROS_PER_SECOND);
    /// Latest instant a request may name: 9999-12-31T23:59:59.999999Z.
    pub const LATEST: Self = Self(253_402_300_800 * Self::MICROS_PER_SECOND - 1);

    pub const fn from_micros(micros: i64) -> Self {
        Self(micros)
    }

    /// For constants and trusted figures: saturates at the i64 limits instead of
    /// overflowing. Seconds from a request go through [`Timestamp::from_request`].
    pub const fn from_seconds(seconds: i64) -> Self {
        Self(seconds.saturating_mul(Self::MICROS_PER_SECOND))
    }

    /// A request's `google.protobuf.Timestamp` (seconds and nanos), checked: nanos within
    /// `0..1e9` and the instant within [`Timestamp::EARLIEST`]`..=`[`Timestamp::LATEST`],
    /// else INVALID_ARGUMENT naming `field`. Sub-microsecond nanos are truncated.
    pub fn from_request(field: &str, seconds: i64, nanos: i32) -> Result<Self> {
        if !(0..1_000_000_000).contains(&nanos) {
            return Err(Error::invalid(field, "nanos must be within 0..1e9"));
        }
        let micros = seconds
            .checked_mul(Self::MICROS_PER_SECOND)
            .and_then(|us| us.checked_add(i64::from(nanos / 1_000)))
            .filter(|&us| (Self::EARLIEST.0..=Self::LATEST.0).contains(&us));
        micros.map(Self).ok_or_else(|| {
            Error::invalid(
                field,
                format!(
                    "{seconds} seconds is outside the supported range \
                     0001-01-01T00:00:00Z..=9999-12-31T23:59:59Z"
                ),
            )
        })
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
        let micros = seconds.saturating_mul(Timestamp::MICROS_PER_SECOND);
        // A test clock: saturate rather than wrap if a test asks for the absurd.
        let _ = self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now| {
                Some(now.saturating_add(micros))
            });
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
    fn request_timestamps_are_checked_at_the_limits() {
        assert_eq!(
            Timestamp::from_request("start", 1, 500_000_999).unwrap(),
            Timestamp::from_micros(1_500_000)
        );
        let (seconds, nanos) = Timestamp::EARLIEST.to_seconds_nanos();
        assert_eq!(
            Timestamp::from_request("start", seconds, nanos).unwrap(),
            Timestamp::EARLIEST
        );
        let (seconds, nanos) = Timestamp::LATEST.to_seconds_nanos();
        assert_eq!((seconds, nanos), (253_402_300_799, 999_999_000));
        assert_eq!(
            Timestamp::from_request("end", seconds, 999_999_999).unwrap(),
            Timestamp::LATEST
        );
        for (seconds, nanos) in [
            (i64::MAX, 0),
            (i64::MAX, 999_999_999),
            (i64::MAX / 1_000_000, 0),
            (i64::MAX / 1_000_000 - 1, 999_999_999),
            (i64::MIN, 0),
            (i64::MIN / 1_000_000, 0),
            (i64::MIN / 1_000_000 + 1, 0),
            (253_402_300_800, 0),
            (-62_135_596_801, 999_999_999),
            (0, -1),
            (0, 1_000_000_000),
        ] {
            let err = Timestamp::from_request("end", seconds, nanos).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidArgument { field, .. } if field == "end"),
                "{seconds}.{nanos}: {err}"
            );
        }
    }

    #[test]
    fn from_seconds_saturates_instead_of_overflowing() {
        assert_eq!(Timestamp::from_seconds(i64::MAX).as_micros(), i64::MAX);
        assert_eq!(Timestamp::from_seconds(i64::MIN).as_micros(), i64::MIN);
        assert_eq!(Timestamp::from_seconds(-3).as_micros(), -3_000_000);
        let clock = ManualClock::new(Timestamp::from_micros(i64::MAX - 5));
        clock.advance_seconds(1);
        assert_eq!(clock.now().as_micros(), i64::MAX);
    }

    #[test]
    fn manual_clock_clones_share_time() {
        let clock = ManualClock::new(Timestamp::from_seconds(100));
        let other = clock.clone();
        clock.advance_seconds(5);
        assert_eq!(other.now(), Timestamp::from_seconds(105));
    }
}
