//! Sizes written and read the way qemu-img writes and reads them.
//!
//! Parsing follows QEMU's rules for size strings: decimal with an optional binary suffix
//! (`B`, `k`/`K`, `M`, `G`, `T`, `P`, `E`, case-insensitive, powers of 1024), decimal fractions
//! that need a suffix larger than bytes (`1.5k` = 1536, rounded half up), hexadecimal without
//! suffix or fraction (`0x10`), and no negatives, exponents or octal. Formatting follows QEMU's
//! human size: three significant digits and an IEC prefix, switching to the next prefix once the
//! integer part would reach 1000 (`1000` bytes prints as `0.977 KiB`).

/// Why a size string was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeError {
    /// Not a size at all.
    Invalid,
    /// A size, but negative or too large for 64 bits.
    Range,
}

fn suffix_mul(c: u8) -> Option<u64> {
    Some(match c.to_ascii_uppercase() {
        b'B' => 1,
        b'K' => 1 << 10,
        b'M' => 1 << 20,
        b'G' => 1 << 30,
        b'T' => 1 << 40,
        b'P' => 1 << 50,
        b'E' => 1 << 60,
        _ => return None,
    })
}

/// Parses a size with QEMU's rules; bare numbers are multiplied by `default_unit` (1 for bytes,
/// `1 << 20` for commands whose unit is MiB).
pub fn parse_size_with_unit(s: &str, default_unit: u64) -> Result<u64, SizeError> {
    let b = s.as_bytes();
    let t = s.trim_start();
    if let Some(rest) = t.strip_prefix('-') {
        // A negative number (qemu's parse_uint reports ERANGE for these).
        // A negative integer is out of range; anything else (a suffix, a fraction) is invalid.
        let digits = rest.trim_start();
        return if !digits.is_empty() && digits.bytes().all(|c| c.is_ascii_digit()) {
            Err(SizeError::Range)
        } else {
            Err(SizeError::Invalid)
        };
    }
    let lead = s.len() - t.len();
    let mut i = lead;
    let digits_start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    let int_digits = &s[digits_start..i];
    // Hexadecimal: "0x..." with no fraction and no suffix.
    if int_digits == "0" && i < b.len() && (b[i] == b'x' || b[i] == b'X') {
        let hex = &s[i + 1..];
        if hex.is_empty() || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(SizeError::Invalid);
        }
        return u64::from_str_radix(hex, 16).map_err(|_| SizeError::Range);
    }
    let mut val: u64 =
        if int_digits.is_empty() { 0 } else { int_digits.parse::<u64>().map_err(|_| SizeError::Range)? };
    // Fraction as a 64-bit fixed-point value (numerator over 2^64).
    let mut frac: u64 = 0;
    let mut had_fraction_point = false;
    if i < b.len() && b[i] == b'.' {
        had_fraction_point = true;
        i += 1;
        let fstart = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let fdigits = &s[fstart..i];
        if int_digits.is_empty() && fdigits.is_empty() {
            return Err(SizeError::Invalid);
        }
        if !fdigits.is_empty() {
            let f: f64 = format!("0.{fdigits}").parse().map_err(|_| SizeError::Invalid)?;
            if f >= 1.0 {
                val = val.checked_add(1).ok_or(SizeError::Range)?;
            } else {
                frac = (f * 18_446_744_073_709_551_616.0) as u64;
                if frac == 0 && f > 0.0 {
                    frac = 1;
                }
            }
        }
    } else if int_digits.is_empty() {
        return Err(SizeError::Invalid);
    }
    let mul = match b.get(i) {
        Some(&c) => match suffix_mul(c) {
            Some(m) => {
                i += 1;
                m
            }
            None => return Err(SizeError::Invalid),
        },
        None => default_unit,
    };
    if i != b.len() {
        return Err(SizeError::Invalid);
    }
    if mul == 1 {
        if frac != 0 {
            return Err(SizeError::Invalid);
        }
        let _ = had_fraction_point;
        return Ok(val);
    }
    let whole = (val as u128) * (mul as u128);
    let part = (frac as u128) * (mul as u128); // 64.64 fixed point
    let rounded = whole + (part >> 64) + ((part >> 63) & 1);
    u64::try_from(rounded).map_err(|_| SizeError::Range)
}

/// Parses a size in bytes by default (qemu's `qemu_strtosz`).
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    parse_size_with_unit(s, 1)
}

/// QEMU's human-readable size ("1 GiB", "4 KiB", "0.977 KiB", "1.5 MiB").
pub fn size_to_str(val: u64) -> String {
    const PREFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let scaled = val as f64 / (1000.0 / 1024.0);
    // frexp exponent: scaled = m * 2^e with 0.5 <= m < 1.
    let e = if scaled == 0.0 { 0 } else { scaled.log2().floor() as i32 + 1 };
    let i = ((e - 1).max(0) / 10).min(6) as usize;
    let x = val as f64 / (1u64 << (i * 10)) as f64;
    format!("{} {}B", format_g3(x), PREFIXES[i])
}

/// C's `%0.3g` for non-negative numbers.
fn format_g3(x: f64) -> String {
    if x == 0.0 {
        return "0".to_string();
    }
    // Round to three significant digits, then choose fixed or exponent notation on the rounded value.
    let exp = x.log10().floor() as i32;
    let mut s = format!("{:.*e}", 2, x); // d.dde±X
    let (mant, ex) =
        s.split_once('e').map(|(m, e)| (m.to_string(), e.parse::<i32>().unwrap_or(exp))).unwrap_or((s.clone(), exp));
    if !(-4..3).contains(&ex) {
        let m = trim_zeros(&mant);
        s = format!("{m}e{}{:02}", if ex < 0 { '-' } else { '+' }, ex.abs());
        return s;
    }
    let decimals = (2 - ex).max(0) as usize;
    trim_zeros(&format!("{:.*}", decimals, x))
}

fn trim_zeros(s: &str) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_size_syntax() {
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("1k"), Ok(1024));
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert_eq!(parse_size("1.k"), Ok(1024));
        assert_eq!(parse_size(".5k"), Ok(512));
        assert_eq!(parse_size("0x10"), Ok(16));
        assert_eq!(parse_size("1b"), Ok(1));
        assert_eq!(parse_size("12345"), Ok(12345));
        assert_eq!(parse_size("8E"), Ok(1 << 63));
        assert_eq!(parse_size("16E"), Err(SizeError::Range));
        assert_eq!(parse_size("7E"), Ok(7 << 60));
        assert_eq!(parse_size("1e3"), Err(SizeError::Invalid));
        assert_eq!(parse_size("1Q"), Err(SizeError::Invalid));
        assert_eq!(parse_size("-1"), Err(SizeError::Range));
        assert_eq!(parse_size("-1k"), Err(SizeError::Invalid));
        assert_eq!(parse_size("1.5"), Err(SizeError::Invalid));
        assert_eq!(parse_size("0x1M"), Err(SizeError::Invalid));
        assert_eq!(parse_size(""), Err(SizeError::Invalid));
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(parse_size("18446744073709551616"), Err(SizeError::Range));
        assert_eq!(parse_size_with_unit("2", 1 << 20), Ok(2 << 20));
    }

    #[test]
    fn formats_like_qemu() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(999), "999 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(4096), "4 KiB");
        assert_eq!(size_to_str(1536), "1.5 KiB");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(5000 << 30), "4.88 TiB");
        assert_eq!(size_to_str(197120), "192 KiB"); // 192.5 rounds to even, as printf does
        assert_eq!(format_g3(999.7), "1e+03");
        assert_eq!(size_to_str(u64::MAX), "16 EiB");
    }
}
