//! Durations as Kubernetes (Go) duration strings: `"90s"`, `"5m"`, `"1h30m"`, `"1.5h"`, `"0"`.
//!
//! Kasm counts its time settings in seconds or minutes; Cubicle writes every one of them as a Go
//! duration string, the way Kubernetes APIs do (`metav1.Duration`), so a reader never has to guess
//! the unit. The value is kept as written (a newtype over `String`), so an object read back from
//! the API server compares equal to the one applied; [`Duration::to_std`] parses it.

use std::borrow::Cow;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// The schema pattern: one or more `<number><unit>` parts (units `ms`, `s`, `m`, `h`; decimals
/// allowed; no sign), or a bare `0`. This is Go's `time.ParseDuration` syntax without negative
/// values and without the sub-millisecond units.
pub const DURATION_PATTERN: &str = r"^(0|([0-9]+(\.[0-9]+)?(ms|s|m|h))+)$";

/// Longest accepted duration string.
pub const DURATION_MAX_LENGTH: u32 = 32;

/// A non-negative duration written as a Go duration string (`"90s"`, `"20m"`, `"1h30m"`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Duration(pub String);

/// Why a duration string could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// The string is empty.
    #[error("empty duration")]
    Empty,
    /// A number has no unit after it (only a bare `0` may omit the unit).
    #[error("missing unit in duration {0:?}: expected one of ms, s, m, h")]
    MissingUnit(String),
    /// A unit is not one of `ms`, `s`, `m`, `h`.
    #[error("invalid unit {unit:?} in duration {input:?}: expected one of ms, s, m, h")]
    InvalidUnit {
        /// The whole input.
        input: String,
        /// The unit that was found.
        unit: String,
    },
    /// A unit is not preceded by a number, or a number is malformed (negative values included).
    #[error("invalid number in duration {0:?}")]
    InvalidNumber(String),
    /// The value does not fit a `std::time::Duration`.
    #[error("duration {0:?} is too large")]
    Overflow(String),
}

impl Duration {
    /// Wraps a duration string without checking it (the API server checks the pattern).
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The string as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parses the string into a `std::time::Duration`.
    pub fn to_std(&self) -> Result<std::time::Duration, DurationError> {
        parse(&self.0)
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Formats a `std::time::Duration` compactly (`"1h30m"`, `"90s"` is written `"1m30s"`, `"250ms"`,
/// `"0s"`); sub-millisecond precision is dropped. The result always parses back to the same
/// number of milliseconds.
impl From<std::time::Duration> for Duration {
    fn from(d: std::time::Duration) -> Self {
        let total_ms = d.as_millis();
        if total_ms == 0 {
            return Self("0s".into());
        }
        let h = total_ms / 3_600_000;
        let m = (total_ms / 60_000) % 60;
        let s = (total_ms / 1000) % 60;
        let ms = total_ms % 1000;
        let mut out = String::new();
        if h > 0 {
            out.push_str(&format!("{h}h"));
        }
        if m > 0 {
            out.push_str(&format!("{m}m"));
        }
        if s > 0 {
            out.push_str(&format!("{s}s"));
        }
        if ms > 0 {
            out.push_str(&format!("{ms}ms"));
        }
        Self(out)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "maxLength": DURATION_MAX_LENGTH,
        })
    }
}

fn parse(input: &str) -> Result<std::time::Duration, DurationError> {
    if input.is_empty() {
        return Err(DurationError::Empty);
    }
    if input == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    let overflow = || DurationError::Overflow(input.to_string());
    let bytes = input.as_bytes();
    let mut i = 0;
    // Accumulate in nanoseconds as u128 to keep fractional parts exact enough and detect overflow.
    let mut total_nanos: u128 = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let int_part = &input[start..i];
        let mut frac_part = "";
        if i < bytes.len() && bytes[i] == b'.' {
            i += 1;
            let fs = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            frac_part = &input[fs..i];
            if frac_part.is_empty() {
                return Err(DurationError::InvalidNumber(input.to_string()));
            }
        }
        if int_part.is_empty() {
            return Err(DurationError::InvalidNumber(input.to_string()));
        }
        let us = i;
        while i < bytes.len() && !(bytes[i].is_ascii_digit() || bytes[i] == b'.') {
            i += 1;
        }
        let unit = &input[us..i];
        let unit_nanos: u128 = match unit {
            "" => return Err(DurationError::MissingUnit(input.to_string())),
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3600 * 1_000_000_000,
            other => {
                return Err(DurationError::InvalidUnit {
                    input: input.to_string(),
                    unit: other.to_string(),
                });
            }
        };
        let int: u128 = int_part.parse().map_err(|_| overflow())?;
        let mut part = int.checked_mul(unit_nanos).ok_or_else(overflow)?;
        if !frac_part.is_empty() {
            // Only the first 18 fractional digits matter at nanosecond resolution of an hour.
            let digits = &frac_part[..frac_part.len().min(18)];
            let frac: u128 = digits.parse().map_err(|_| overflow())?;
            let scale = 10u128.pow(digits.len() as u32);
            part = part
                .checked_add(frac * unit_nanos / scale)
                .ok_or_else(overflow)?;
        }
        total_nanos = total_nanos.checked_add(part).ok_or_else(overflow)?;
    }
    let secs = u64::try_from(total_nanos / 1_000_000_000).map_err(|_| overflow())?;
    Ok(std::time::Duration::new(
        secs,
        (total_nanos % 1_000_000_000) as u32,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration as Std;

    fn d(s: &str) -> Result<Std, DurationError> {
        Duration::new(s).to_std()
    }

    #[test]
    fn parses_go_durations() {
        assert_eq!(d("0").unwrap(), Std::ZERO);
        assert_eq!(d("0s").unwrap(), Std::ZERO);
        assert_eq!(d("90s").unwrap(), Std::from_secs(90));
        assert_eq!(d("5m").unwrap(), Std::from_secs(300));
        assert_eq!(d("1h").unwrap(), Std::from_secs(3600));
        assert_eq!(d("1h30m").unwrap(), Std::from_secs(5400));
        assert_eq!(
            d("2h45m30s").unwrap(),
            Std::from_secs(2 * 3600 + 45 * 60 + 30)
        );
        assert_eq!(d("250ms").unwrap(), Std::from_millis(250));
        assert_eq!(d("1.5h").unwrap(), Std::from_secs(5400));
        assert_eq!(d("0.5s").unwrap(), Std::from_millis(500));
        assert_eq!(d("1m0.25s").unwrap(), Std::from_millis(60_250));
        // Go accepts units in any order and repeated.
        assert_eq!(d("30m1h").unwrap(), Std::from_secs(5400));
        assert_eq!(d("1s1s").unwrap(), Std::from_secs(2));
    }

    #[test]
    fn rejects_bad_durations() {
        assert_eq!(d(""), Err(DurationError::Empty));
        assert!(matches!(d("-5m"), Err(DurationError::InvalidNumber(_))));
        assert!(matches!(d("5"), Err(DurationError::MissingUnit(_))));
        assert!(matches!(d("3600"), Err(DurationError::MissingUnit(_))));
        assert!(matches!(d("1d"), Err(DurationError::InvalidUnit { unit, .. }) if unit == "d"));
        assert!(matches!(d("5 m"), Err(DurationError::InvalidUnit { .. })));
        assert!(matches!(d("1us"), Err(DurationError::InvalidUnit { .. })));
        assert!(matches!(d("m"), Err(DurationError::InvalidNumber(_))));
        assert!(matches!(d("1.m"), Err(DurationError::InvalidNumber(_))));
        assert!(matches!(d(".5m"), Err(DurationError::InvalidNumber(_))));
        assert!(matches!(
            d("99999999999999999999999999999999999999999h"),
            Err(DurationError::Overflow(_))
        ));
    }

    #[test]
    fn formats_and_round_trips() {
        for (secs, text) in [
            (0, "0s"),
            (90, "1m30s"),
            (3600, "1h"),
            (5400, "1h30m"),
            (86_400, "24h"),
        ] {
            let dur = Duration::from(Std::from_secs(secs));
            assert_eq!(dur.as_str(), text);
            assert_eq!(dur.to_std().unwrap(), Std::from_secs(secs));
        }
        let dur = Duration::from(Std::from_millis(1250));
        assert_eq!(dur.as_str(), "1s250ms");
        assert_eq!(dur.to_std().unwrap(), Std::from_millis(1250));
    }

    /// The schema pattern and the parser agree (checked on a corpus, since the regex engine of
    /// the API server is not available here): everything the parser accepts matches the
    /// pattern's grammar and vice versa.
    #[test]
    fn schema_is_a_string_with_the_pattern() {
        let mut generator = SchemaGenerator::default();
        let schema = serde_json::to_value(Duration::json_schema(&mut generator)).unwrap();
        assert_eq!(schema["type"], "string");
        assert_eq!(schema["pattern"], DURATION_PATTERN);
        assert_eq!(schema["maxLength"], DURATION_MAX_LENGTH);
    }

    #[test]
    fn parser_agrees_with_the_pattern_grammar() {
        // A tiny matcher for DURATION_PATTERN's grammar, written independently of `parse`.
        fn matches_pattern(s: &str) -> bool {
            if s == "0" {
                return true;
            }
            let mut rest = s;
            if rest.is_empty() {
                return false;
            }
            while !rest.is_empty() {
                let digits = rest.chars().take_while(char::is_ascii_digit).count();
                if digits == 0 {
                    return false;
                }
                rest = &rest[digits..];
                if let Some(r) = rest.strip_prefix('.') {
                    let frac = r.chars().take_while(char::is_ascii_digit).count();
                    if frac == 0 {
                        return false;
                    }
                    rest = &r[frac..];
                }
                if let Some(r) = rest.strip_prefix("ms") {
                    rest = r;
                } else if let Some(r) = rest.strip_prefix(['s', 'm', 'h']) {
                    rest = r;
                } else {
                    return false;
                }
            }
            true
        }
        for s in [
            "0", "0s", "90s", "5m", "1h30m", "1.5h", "250ms", "30m1h", "", "-5m", "5", "1d", "5 m",
            "1us", "m", "1.m", ".5m", "1h-5m", "+5m", "1e3s",
        ] {
            assert_eq!(
                matches_pattern(s),
                d(s).is_ok(),
                "pattern and parser disagree on {s:?}"
            );
        }
    }
}
