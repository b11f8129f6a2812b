//! When a cached base is made again: pure functions of the time it was
//! built, the time now and `base.max-age` (or `--refresh-base`), and
//! [`unix_now`], the one reading of the clock. The cache itself, its
//! records and its lock are [`crate::inputs::base`]'s.

use crate::config::types::MaxAge;

/// When a cached Debian base is made again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    /// When it is older than this (`base.max-age`).
    WhenOlderThan(MaxAge),
    /// Whatever its age (`kiln build --refresh-base`), unless it was built
    /// at or after this unix time: by another kiln this one waited for.
    UnlessBuiltSince(u64),
}

/// A cached base's age against its max-age.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Young enough: reused for `left_secs` more seconds.
    Fresh { age_secs: u64, left_secs: u64 },
    /// Too old, or (`None`) of unknown age: made again by the next build.
    Stale { age_secs: Option<u64> },
}

/// How far ahead of the clock a build time may be and still count as
/// age 0: the clocks of machines sharing a cache differ by seconds. A
/// build time further ahead was stamped by a wrong clock, so the base's
/// age is unknown and it is made again (which stamps it anew).
pub const CLOCK_SKEW_SECS: u64 = 24 * 3600;

/// Is a base built at `built_at` still fresh at `now` (unix seconds)?
/// Older than `max_age` is stale; exactly `max_age` old is still fresh.
pub fn freshness(built_at: u64, now: u64, max_age: MaxAge) -> Freshness {
    if built_at > now.saturating_add(CLOCK_SKEW_SECS) {
        return Freshness::Stale { age_secs: None };
    }
    let age = now.saturating_sub(built_at);
    let max = max_age.as_secs();
    if age > max {
        Freshness::Stale {
            age_secs: Some(age),
        }
    } else {
        Freshness::Fresh {
            age_secs: age,
            left_secs: max - age,
        }
    }
}

/// Why a cached base built at `built_at` must be made again at `now`
/// under `refresh`; `None`: reuse it.
pub fn rebuild_reason(refresh: Refresh, built_at: u64, now: u64) -> Option<String> {
    match refresh {
        Refresh::UnlessBuiltSince(since) => {
            (built_at < since).then(|| "--refresh-base asks for a new one".to_string())
        }
        Refresh::WhenOlderThan(max) => match freshness(built_at, now, max) {
            Freshness::Fresh { .. } => None,
            Freshness::Stale {
                age_secs: Some(age),
            } => Some(format!(
                "it is {} old, older than base.max-age = \"{max}\"",
                human_age(age)
            )),
            Freshness::Stale { age_secs: None } => Some(format!(
                "its build time ({built_at}) is {} ahead of this machine's clock, so its age is unknown",
                human_age(built_at - now)
            )),
        },
    }
}

/// An age for people: "42d 3h", "5h", "17 min".
pub fn human_age(secs: u64) -> String {
    let (days, hours, mins) = (secs / 86400, secs % 86400 / 3600, secs % 3600 / 60);
    match (days, hours) {
        (0, 0) => format!("{mins} min"),
        (0, h) => format!("{h}h"),
        (d, 0) => format!("{d}d"),
        (d, h) => format!("{d}d {h}h"),
    }
}

/// Seconds since the Unix epoch, by this machine's clock.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86400;
    /// 2026-12-01T00:00:00Z.
    const NOW: u64 = 1_796_083_200;

    #[test]
    fn a_base_is_fresh_up_to_its_max_age_and_stale_after() {
        let max = MaxAge::days(30);
        assert_eq!(
            freshness(NOW - 10 * DAY, NOW, max),
            Freshness::Fresh {
                age_secs: 10 * DAY,
                left_secs: 20 * DAY
            }
        );
        assert_eq!(
            freshness(NOW - 30 * DAY, NOW, max),
            Freshness::Fresh {
                age_secs: 30 * DAY,
                left_secs: 0
            },
            "exactly max-age old is not yet older than it"
        );
        assert_eq!(
            freshness(NOW - 30 * DAY - 1, NOW, max),
            Freshness::Stale {
                age_secs: Some(30 * DAY + 1)
            }
        );
        assert_eq!(
            freshness(NOW - 2 * 3600, NOW, MaxAge::parse("1h").unwrap()),
            Freshness::Stale {
                age_secs: Some(2 * 3600)
            }
        );
        // A clock a little behind the one that stamped the base: age 0.
        assert_eq!(
            freshness(NOW + 3600, NOW, max),
            Freshness::Fresh {
                age_secs: 0,
                left_secs: 30 * DAY
            }
        );
        // Stamped by a clock days ahead: its age is unknown.
        assert_eq!(
            freshness(NOW + 2 * DAY, NOW, max),
            Freshness::Stale { age_secs: None }
        );
        assert_eq!(
            freshness(0, NOW, max),
            Freshness::Stale {
                age_secs: Some(NOW)
            }
        );
    }

    #[test]
    fn a_base_is_rebuilt_when_too_old_or_when_asked() {
        let by_age = Refresh::WhenOlderThan(MaxAge::days(30));
        assert_eq!(rebuild_reason(by_age, NOW - DAY, NOW), None);
        assert_eq!(
            rebuild_reason(by_age, NOW - 42 * DAY - 3 * 3600, NOW).as_deref(),
            Some("it is 42d 3h old, older than base.max-age = \"30d\"")
        );
        let why = rebuild_reason(by_age, NOW + 3 * DAY, NOW).unwrap();
        assert!(why.contains("3d ahead of this machine's clock"), "{why}");
        // --refresh-base: whatever its age, unless another kiln built it
        // after this one asked.
        let asked = Refresh::UnlessBuiltSince(NOW);
        assert!(rebuild_reason(asked, NOW - 60, NOW).is_some());
        assert_eq!(rebuild_reason(asked, NOW, NOW + 90), None);
        assert_eq!(rebuild_reason(asked, NOW + 80, NOW + 90), None);
    }

    #[test]
    fn ages_read_as_days_hours_or_minutes() {
        assert_eq!(human_age(0), "0 min");
        assert_eq!(human_age(17 * 60 + 5), "17 min");
        assert_eq!(human_age(5 * 3600 + 59), "5h");
        assert_eq!(human_age(3 * DAY), "3d");
        assert_eq!(human_age(42 * DAY + 3 * 3600 + 120), "42d 3h");
    }
}
