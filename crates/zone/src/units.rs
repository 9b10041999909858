//! Units accepted in zone files.
//!
//! Bandwidth follows `tc`'s spelling: a number followed by `bit`, `kbit`, `mbit`, `gbit` or
//! `tbit` (any case), optionally `/s`. Decimal prefixes (1 Gbit = 10^9 bit). Anything else,
//! including the common typo `gbps`, is refused with a hint, because `gbps` is ambiguous
//! between bits and bytes.

/// Parses a bandwidth string such as `"25Gbit"` or `"100 Mbit/s"` into bits per second.
pub fn parse_bandwidth(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let unit = unit.trim();
    let value: f64 = number
        .parse()
        .map_err(|_| format!("'{text}' does not start with a number; write e.g. \"25Gbit\""))?;
    let lower = unit.to_ascii_lowercase();
    let unit_core = lower.strip_suffix("/s").unwrap_or(&lower);
    let scale = match unit_core {
        "bit" => 1.0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        "tbit" => 1e12,
        "" => return Err(format!("'{text}' has no unit; write e.g. \"{number}Gbit\"")),
        other => {
            let hint = match other.chars().next() {
                Some('k') => "Kbit",
                Some('m') => "Mbit",
                Some('t') => "Tbit",
                _ => "Gbit",
            };
            return Err(format!(
                "unknown unit '{unit}' in '{text}'; units are bit, Kbit, Mbit, Gbit, Tbit \
                 (did you mean \"{number}{hint}\"?)"
            ));
        }
    };
    let bps = value * scale;
    if bps.is_nan() || bps < 1.0 || bps.is_infinite() {
        return Err(format!("'{text}' must be a positive bandwidth"));
    }
    Ok(bps.round() as u64)
}

/// Formats bits per second the way `parse_bandwidth` reads them.
pub fn format_bandwidth(bps: u64) -> String {
    let b = bps as f64;
    if b >= 1e9 {
        format!("{}Gbit", trim(b / 1e9))
    } else if b >= 1e6 {
        format!("{}Mbit", trim(b / 1e6))
    } else if b >= 1e3 {
        format!("{}Kbit", trim(b / 1e3))
    } else {
        format!("{bps}bit")
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_tc_spellings() {
        assert_eq!(parse_bandwidth("25Gbit"), Ok(25_000_000_000));
        assert_eq!(parse_bandwidth("100 mbit/s"), Ok(100_000_000));
        assert_eq!(parse_bandwidth("1.5Gbit"), Ok(1_500_000_000));
        assert_eq!(parse_bandwidth("64kbit"), Ok(64_000));
    }

    #[test]
    fn refuses_typos_with_a_hint() {
        let err = parse_bandwidth("10 gbps").unwrap_err();
        assert!(err.contains("unknown unit 'gbps'"), "{err}");
        assert!(err.contains("10Gbit"), "{err}");
        assert!(parse_bandwidth("10").unwrap_err().contains("no unit"));
        assert!(parse_bandwidth("fast").unwrap_err().contains("number"));
        assert!(parse_bandwidth("0Gbit").unwrap_err().contains("positive"));
    }

    #[test]
    fn formats_round_trip() {
        for bps in [390_625_000, 25_000_000_000, 100_000_000, 64_000] {
            assert_eq!(parse_bandwidth(&format_bandwidth(bps)), Ok(bps));
        }
    }
}
