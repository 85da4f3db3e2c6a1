//! nginx spellings of durations (`500ms`, `10s`, `1m30s`, `6m`) and sizes (`10k`, `1m`).

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// Parses an nginx time value. A bare number means seconds, as in nginx.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total_ms: u128 = 0;
    // As nginx: units from the largest down, each once (`1h30m`, not `30m1h`).
    let mut previous_unit = u128::MAX;
    let mut rest = s;
    while !rest.is_empty() {
        rest = rest.trim_start();
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "invalid duration {s:?}: expected a number at {rest:?}"
            ));
        }
        let n: u128 = rest[..digits]
            .parse()
            .map_err(|_| format!("invalid duration {s:?}: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c.is_whitespace())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let ms_per_unit: u128 = match unit {
            "ms" => 1,
            "" | "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "w" => 7 * 86_400_000,
            "M" => 30 * 86_400_000,
            "y" => 365 * 86_400_000,
            other => {
                return Err(format!(
                    "invalid duration {s:?}: unknown unit {other:?} (use ms, s, m, h, d, w, M, y)"
                ))
            }
        };
        if ms_per_unit >= previous_unit {
            return Err(format!(
                "invalid duration {s:?}: units go from the largest down, each once (e.g. \"1h30m\")"
            ));
        }
        previous_unit = ms_per_unit;
        total_ms = n
            .checked_mul(ms_per_unit)
            .and_then(|v| v.checked_add(total_ms))
            .ok_or_else(|| format!("invalid duration {s:?}: too large"))?;
    }
    let ms = u64::try_from(total_ms).map_err(|_| format!("invalid duration {s:?}: too large"))?;
    Ok(Duration::from_millis(ms))
}

/// A number of seconds as a duration, in the range every duration l4lb reads is kept
/// to: whole milliseconds that fit in 64 bits (584 million years), as [`parse_duration`]
/// allows. Far beyond that, a deadline `now + duration` overflows and panics, and a
/// value could not be written back (dump file, admin API) and read again.
pub fn seconds(s: u64) -> Result<Duration, String> {
    s.checked_mul(1000)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{s} seconds is too large a duration"))
}

/// Parses an nginx size: bytes, or `k`/`m`/`g` (either case) multiples of 1024.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&s[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&s[..i], 1 << 30),
        Some(_) => (s, 1),
        None => return Err("empty size".into()),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected a number with optional k, m or g"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

/// A duration written as an nginx string, or as an integer number of seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NgxDuration(pub Duration);

impl<'de> Deserialize<'de> for NgxDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = NgxDuration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as \"500ms\", \"10s\", \"1m\" or a number of seconds")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<NgxDuration, E> {
                parse_duration(v).map(NgxDuration).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<NgxDuration, E> {
                let s = u64::try_from(v).map_err(|_| E::custom("a duration cannot be negative"))?;
                seconds(s).map(NgxDuration).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A byte size written as an nginx string (`10k`) or an integer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NgxSize(pub u64);

impl<'de> Deserialize<'de> for NgxSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = NgxSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as 1048576, \"512k\" or \"1m\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<NgxSize, E> {
                parse_size(v).map(NgxSize).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<NgxSize, E> {
                u64::try_from(v)
                    .map(NgxSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_follow_nginx() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("6m"), Ok(Duration::from_secs(360)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1m30"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1s500ms"), Ok(Duration::from_millis(1500)));
        for out_of_order in ["30m1h", "1m1m", "30s1m", "1 2"] {
            let e = parse_duration(out_of_order).unwrap_err();
            assert!(e.contains("largest down"), "{out_of_order}: {e}");
        }
        assert!(parse_duration("99999999999999999999d").is_err());
        assert_eq!(seconds(90), Ok(Duration::from_secs(90)));
        assert_eq!(
            seconds(u64::MAX / 1000),
            Ok(Duration::from_millis(u64::MAX / 1000 * 1000))
        );
        assert!(seconds(u64::MAX / 1000 + 1).is_err());
    }

    #[test]
    fn sizes_follow_nginx() {
        assert_eq!(parse_size("10k"), Ok(10 * 1024));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("123"), Ok(123));
        assert!(parse_size("k").is_err());
        assert!(parse_size("1.5m").is_err());
        assert!(parse_size("").is_err());
    }
}
