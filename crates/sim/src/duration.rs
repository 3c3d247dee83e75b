//! Durations in scenario files: `"90s"`, `"20m"`, `"1h30m"`, `"2d"`, or a
//! plain number of seconds.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration as scenario files write it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    pub fn secs(s: u64) -> Self {
        Dur(Duration::from_secs(s))
    }
}

/// Parses `1h30m`, `90s`, `2d`, `45` (seconds), `1.5h`.
pub fn parse(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("an empty duration".into());
    }
    if let Ok(secs) = s.parse::<f64>() {
        return seconds(secs, text);
    }
    let mut total = 0.0;
    let mut number = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() || c == '.' {
            number.push(c);
            continue;
        }
        let unit = match c {
            'd' => 86_400.0,
            'h' => 3_600.0,
            'm' => 60.0,
            's' => 1.0,
            ' ' if number.is_empty() => continue,
            _ => return Err(format!("{text:?} is not a duration like 90s, 20m or 1h30m")),
        };
        let n: f64 = number
            .parse()
            .map_err(|_| format!("{text:?} is not a duration like 90s, 20m or 1h30m"))?;
        total += n * unit;
        number.clear();
    }
    if !number.is_empty() {
        return Err(format!(
            "{text:?} ends in a number without a unit (s, m, h or d)"
        ));
    }
    seconds(total, text)
}

fn seconds(secs: f64, text: &str) -> Result<Duration, String> {
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{text:?} is not a non-negative duration"));
    }
    Ok(Duration::from_millis((secs * 1000.0).round() as u64))
}

/// `1h05m`, `3m20s`, `42s`: short and stable, for reports.
pub fn format(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m, sec) = (s / 3600, (s % 3600) / 60, s % 60);
    match (h, m) {
        (0, 0) => format!("{sec}s"),
        (0, _) => format!("{m}m{sec:02}s"),
        _ => format!("{h}h{m:02}m"),
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format(self.0))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(f64),
            Text(String),
        }
        let parsed = match Raw::deserialize(d)? {
            Raw::Secs(s) => seconds(s, &s.to_string()),
            Raw::Text(t) => parse(&t),
        };
        parsed.map(Dur).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0.as_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_scenarios_write() {
        let cases = [
            ("90s", 90),
            ("20m", 1200),
            ("1h30m", 5400),
            ("2d", 172_800),
            ("45", 45),
            ("1.5h", 5400),
            ("1h 30m", 5400),
        ];
        for (text, secs) in cases {
            assert_eq!(parse(text), Ok(Duration::from_secs(secs)), "{text}");
        }
        for bad in ["", "ten minutes", "5x", "-3", "1h30"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formats_briefly() {
        assert_eq!(format(Duration::from_secs(42)), "42s");
        assert_eq!(format(Duration::from_secs(200)), "3m20s");
        assert_eq!(format(Duration::from_secs(3900)), "1h05m");
    }
}
