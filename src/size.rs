//! Byte sizes on the command line: `4096`, `32KiB`, `4MiB`, `8GiB`, `1TiB` (also `K`, `M`, `G`,
//! `T`, `KB`..., all powers of 1024: block storage sizes are binary).

/// Parses a size; the error says what was expected.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "'{s}' is not a size (expected a number with an optional unit such as 4KiB, 8GiB)"
        ));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}': the number is too large"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => {
            return Err(format!(
                "'{s}': unknown unit '{other}' (use B, KiB, MiB, GiB or TiB)"
            ));
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{s}' is larger than 2^64 bytes"))
}

/// Formats a byte count with a binary unit, for reports.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("32KiB"), Ok(32 << 10));
        assert_eq!(parse_size("8GiB"), Ok(8 << 30));
        assert_eq!(parse_size("4m"), Ok(4 << 20));
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("4XB").unwrap_err().contains("unknown unit"));
        assert!(parse_size("99999999999TiB").is_err());
        assert_eq!(human(8 << 30), "8.0 GiB");
    }
}
