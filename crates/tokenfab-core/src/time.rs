//! Time as the core sees it: an integer count of microseconds passed in by the caller.
//!
//! The live system passes Unix-epoch microseconds; the simulator passes microseconds of
//! virtual time since the start of the run. The core never reads a clock itself.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// A point in time, in microseconds since the caller's epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp(u64);

impl Timestamp {
    pub const ZERO: Timestamp = Timestamp(0);
    pub const MAX: Timestamp = Timestamp(u64::MAX);

    pub const fn from_micros(us: u64) -> Self {
        Timestamp(us)
    }
    pub const fn from_millis(ms: u64) -> Self {
        Timestamp(ms.saturating_mul(1000))
    }
    pub fn from_secs_f64(s: f64) -> Self {
        Timestamp((s.max(0.0) * 1e6).round() as u64)
    }
    pub const fn as_micros(self) -> u64 {
        self.0
    }
    pub const fn as_millis(self) -> u64 {
        self.0 / 1000
    }
    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / 1e6
    }
    /// `self + d`, saturating at [`Timestamp::MAX`].
    pub fn saturating_add(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_add(d.as_micros().min(u64::MAX as u128) as u64))
    }
    /// Time elapsed from `earlier` to `self`, or zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.6}s", self.as_secs_f64())
    }
}

/// `2026-11-26T10:59:30.123Z` for a Unix time in milliseconds (UTC).
pub fn rfc3339_ms(unix_ms: u64) -> String {
    let (date, rem) = civil(unix_ms / 1000);
    format!(
        "{date}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_ms % 1000
    )
}

/// `2026-11-26T10:59:30Z` for a Unix time in seconds (UTC), as Kubernetes writes times.
pub fn rfc3339(unix_s: u64) -> String {
    let (date, rem) = civil(unix_s);
    format!("{date}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The civil date (`YYYY-MM-DD`) of a Unix time in seconds, and the seconds into that day.
fn civil(unix_s: u64) -> (String, u64) {
    let (days, rem) = (unix_s / 86_400, unix_s % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (format!("{year:04}-{month:02}-{day:02}"), rem)
}

/// Converts seconds (f64) to a [`Duration`], clamping negatives and NaN to zero.
pub fn secs(s: f64) -> Duration {
    if s.is_finite() && s > 0.0 {
        Duration::from_secs_f64(s)
    } else {
        Duration::ZERO
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_796_169_600), "2026-12-02T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400 + 3_661), "2000-02-29T01:01:01Z");
        assert_eq!(super::rfc3339_ms(1_796_169_600_123), "2026-12-02T00:00:00.123Z");
    }

    use super::*;

    #[test]
    fn arithmetic_saturates() {
        let t = Timestamp::from_millis(5);
        assert_eq!(t.saturating_add(Duration::from_millis(3)), Timestamp::from_micros(8000));
        assert_eq!(Timestamp::MAX.saturating_add(Duration::from_secs(1)), Timestamp::MAX);
        assert_eq!(t.since(Timestamp::from_millis(9)), Duration::ZERO);
        assert_eq!(Timestamp::from_millis(9).since(t), Duration::from_millis(4));
        assert_eq!(secs(-1.0), Duration::ZERO);
        assert_eq!(secs(f64::NAN), Duration::ZERO);
    }
}

/// A duration for people, rounded up to the second: `2d 3h`, `1h 23m 4s`, `45s`.
pub fn human(d: Duration) -> String {
    let mut s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    if s == 0 {
        return "0s".into();
    }
    let mut parts = Vec::new();
    for (unit, name) in [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")] {
        if s >= unit {
            parts.push(format!("{}{name}", s / unit));
            s %= unit;
        }
    }
    parts.join(" ")
}

#[cfg(test)]
mod human_tests {
    use super::*;

    #[test]
    fn durations_read_naturally_and_round_up() {
        assert_eq!(human(Duration::ZERO), "0s");
        assert_eq!(human(Duration::from_millis(1)), "1s");
        assert_eq!(human(Duration::from_secs(45)), "45s");
        assert_eq!(human(Duration::from_secs(3600 + 23 * 60 + 4)), "1h 23m 4s");
        assert_eq!(human(Duration::from_secs(2 * 86_400 + 3 * 3600)), "2d 3h");
    }
}
