//! Durations as people write them in configuration: `500ms`, `30s`, `5m`,
//! `1h`, or bare seconds (`30`). The `serde` helpers read these (and a bare
//! number of seconds) and write the shortest exact form back, so a
//! configuration printed by the crate reads the same as one written by hand.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserializer, Serializer};

/// Parses `500ms`, `30s`, `5m`, `1h` or bare seconds; zero is allowed.
///
/// # Errors
/// A text saying what is expected, naming the input.
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?}: expected a whole number with ms, s, m or h"))?;
    Ok(match unit.trim() {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        other => return Err(format!("{s:?}: unknown unit {other:?} (ms, s, m or h)")),
    })
}

/// The shortest exact text [`parse`] reads back: `1h`, `5m`, `30s`, `500ms`
/// (below a millisecond, rounded up to one, so no setting turns into zero).
pub fn format(d: Duration) -> String {
    let ms = d.as_millis().max(u128::from(!d.is_zero()));
    match ms {
        0 => "0s".to_owned(),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1_000 == 0 => format!("{}s", ms / 1_000),
        ms => format!("{ms}ms"),
    }
}

/// `#[serde(with = "crate::config::duration")]` for a [`Duration`].
///
/// # Errors
/// The serializer's or deserializer's.
pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(*d))
}

/// See [`serialize`].
///
/// # Errors
/// Text that [`parse`] refuses, or a value that is neither text nor a number.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    d.deserialize_any(DurationVisitor)
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration such as \"500ms\", \"30s\", \"5m\", \"1h\", or seconds")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
        parse(v).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
        Ok(Duration::from_secs(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
        u64::try_from(v)
            .map(Duration::from_secs)
            .map_err(|_| E::custom(format!("{v}: a duration cannot be negative")))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
        Duration::try_from_secs_f64(v).map_err(|_| E::custom(format!("{v}: not a duration")))
    }
}

/// `#[serde(with = "crate::config::duration::option")]` for an
/// `Option<Duration>`: `null` (or an absent field, with `#[serde(default)]`)
/// is `None`.
pub mod option {
    use super::*;

    /// See [`super::serialize`].
    ///
    /// # Errors
    /// The serializer's.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&format(*d)),
            None => s.serialize_none(),
        }
    }

    /// See [`super::deserialize`].
    ///
    /// # Errors
    /// As [`super::deserialize`].
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        struct Opt;
        impl<'de> Visitor<'de> for Opt {
            type Value = Option<Duration>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("null or a duration")
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
                super::deserialize(d).map(Some)
            }
        }
        d.deserialize_option(Opt)
    }
}

/// `#[serde(with = "crate::config::duration::list")]` for a `Vec<Duration>`:
/// a list of durations, each as [`deserialize`] reads one.
pub mod list {
    use super::*;

    /// See [`super::serialize`].
    ///
    /// # Errors
    /// The serializer's.
    pub fn serialize<S: Serializer>(v: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|d| format(*d)))
    }

    /// See [`super::deserialize`].
    ///
    /// # Errors
    /// As [`super::deserialize`], for any item; or a value that is not a list.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        struct One(Duration);
        impl<'de> serde::Deserialize<'de> for One {
            fn deserialize<D2: Deserializer<'de>>(d: D2) -> Result<Self, D2::Error> {
                super::deserialize(d).map(One)
            }
        }
        let items: Vec<One> = serde::Deserialize::deserialize(d)?;
        Ok(items.into_iter().map(|One(d)| d).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_through_the_shortest_form() {
        for (text, d) in [
            ("500ms", Duration::from_millis(500)),
            ("30s", Duration::from_secs(30)),
            ("5m", Duration::from_secs(300)),
            ("1h", Duration::from_secs(3600)),
            ("0s", Duration::ZERO),
        ] {
            assert_eq!(parse(text), Ok(d));
            assert_eq!(format(d), text);
        }
        assert_eq!(parse("90"), Ok(Duration::from_secs(90)));
        assert_eq!(format(Duration::from_secs(90)), "90s");
        assert_eq!(format(Duration::from_micros(10)), "1ms");
        assert!(parse("5 days").unwrap_err().contains("unknown unit"));
        assert!(parse("-1s").unwrap_err().contains("whole number"));
    }

    #[test]
    fn serde_reads_text_and_seconds() {
        #[derive(serde::Deserialize, serde::Serialize, PartialEq, Debug)]
        struct T {
            #[serde(with = "super")]
            a: Duration,
            #[serde(with = "super::option", default)]
            b: Option<Duration>,
        }
        let t: T = serde_json::from_str(r#"{"a": "250ms", "b": null}"#).unwrap();
        assert_eq!(t.a, Duration::from_millis(250));
        assert_eq!(t.b, None);
        let t: T = serde_json::from_str(r#"{"a": 2, "b": "1m"}"#).unwrap();
        assert_eq!(
            (t.a, t.b),
            (Duration::from_secs(2), Some(Duration::from_secs(60)))
        );
        assert_eq!(serde_json::to_string(&t).unwrap(), r#"{"a":"2s","b":"1m"}"#);
        let e = serde_json::from_str::<T>(r#"{"a": "2 weeks"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown unit"), "{e}");
    }
}
