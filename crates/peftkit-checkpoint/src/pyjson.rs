//! Python `json.dumps(obj, indent=2, sort_keys=True)` (default `ensure_ascii=True`), byte for byte.
//!
//! transformers writes `config.json` / `generation_config.json` with
//! `json.dumps(d, indent=2, sort_keys=True) + "\n"`, and peft writes `adapter_config.json` with the
//! same call and no trailing newline. serde_json's pretty printer differs in several ways that
//! matter for byte-identical files: it does not escape non-ASCII, it prints floats the ryu way
//! (`1e-5` where Python prints `1e-05`, `1e16` where Python prints `1e+16`) and it does not sort
//! keys. This module reproduces Python's output from a [`serde_json::Value`].
//!
//! # Rules reproduced
//!
//! * Layout: 2-space indent, items separated by `","` + newline, keys by `": "`, no trailing
//!   whitespace, empty containers as `{}` / `[]`, non-empty lists one element per line.
//! * Keys sorted like Python's `sorted` on `str`, i.e. by Unicode code point. Rust's `str`
//!   ordering compares UTF-8 bytes, which is the same order (not UTF-16 order: `"\u{ffff}"` sorts
//!   before `"😀"`, as in Python).
//! * Objects listed in [`PyJsonStyle::numeric_key_objects`] have `int` keys in Python's memory
//!   (transformers' `id2label`), so Python sorts them numerically before stringifying them:
//!   `"0", "1", "2", "10"` rather than `"0", "1", "10", "2"`.
//! * `ensure_ascii=True` string escaping, see [`write_py_str`].
//! * Numbers: integers as written; `f64` through [`float_repr`] (Python's `repr(float)`).
//!
//! # Known limits
//!
//! The input is a `serde_json::Value`, so a few Python values cannot reach this writer intact:
//!
//! * Integers outside `i64`/`u64` are parsed by serde_json into `f64` and are written as floats
//!   (`1.8446744073709552e+19`) where Python would write the exact integer. Out of scope.
//! * serde_json parses the JSON text `-0` into the float `-0.0`; Python's `json.loads("-0")` is
//!   the integer `0`. This writer prints `-0.0`, which is right for a value that came from Python
//!   as `-0.0`, the only way Python itself writes a negative zero.
//! * A `Value` cannot hold NaN or infinities. transformers v5 encodes them as
//!   `{"__float__": "NaN"}` etc.; build that with [`nonfinite_marker`].
//! * Without serde_json's `float_roundtrip` feature, `serde_json::from_str` can parse a
//!   16–17 significant-digit float one ULP away from the value Python wrote
//!   (`22.627416997969522` becomes `22.62741699796952`), and re-writing it then changes the
//!   file. That is the parser, not this writer: enable `float_roundtrip` wherever configs are
//!   read back (`tests/pyjson_fixtures.rs` checks it).

use serde_json::{Map, Value};
use std::cmp::Ordering;

/// How to write a JSON document the way a Python library writes it.
///
/// ```
/// use peftkit_checkpoint::{py_json_string, PyJsonStyle};
/// let v = serde_json::json!({"id2label": {"10": "b", "2": "a"}});
/// let style = PyJsonStyle::transformers_config();
/// assert_eq!(
///     py_json_string(&v, &style),
///     "{\n  \"id2label\": {\n    \"2\": \"a\",\n    \"10\": \"b\"\n  }\n}\n"
/// );
/// ```
#[derive(Debug, Clone, Default)]
pub struct PyJsonStyle {
    /// Append `"\n"` after the closing brace (transformers does, peft does not).
    pub trailing_newline: bool,
    /// Names of objects (at any depth) whose keys are Python ints in memory and therefore
    /// sort numerically before being written (transformers' `id2label`).
    ///
    /// The rule applies to an object that is the value of a key with one of these names, in
    /// any parent object. It does not apply to objects nested deeper (e.g. inside a list under
    /// that key). Keys are compared as integers when they have the form Python's `str(int)`
    /// produces (`-?(0|[1-9][0-9]*)`, any length, no `-0`); all other keys sort after the
    /// integer keys, in code-point order. (Python itself would raise `TypeError` when sorting a
    /// dict that mixes `int` and `str` keys, so that fallback order has no Python reference.)
    pub numeric_key_objects: Vec<String>,
}

impl PyJsonStyle {
    /// The style of transformers' `config.json`: trailing newline, `id2label` sorted numerically.
    ///
    /// ```
    /// let s = peftkit_checkpoint::PyJsonStyle::transformers_config();
    /// assert!(s.trailing_newline);
    /// assert_eq!(s.numeric_key_objects, vec!["id2label".to_string()]);
    /// ```
    pub fn transformers_config() -> Self {
        Self {
            trailing_newline: true,
            numeric_key_objects: vec!["id2label".to_string()],
        }
    }

    /// The style of transformers' `generation_config.json`: trailing newline, and no numeric
    /// key sorting (GenerationConfig converts dict keys to `str` before sorting).
    ///
    /// ```
    /// let s = peftkit_checkpoint::PyJsonStyle::transformers_generation_config();
    /// assert!(s.trailing_newline && s.numeric_key_objects.is_empty());
    /// ```
    pub fn transformers_generation_config() -> Self {
        Self {
            trailing_newline: true,
            numeric_key_objects: Vec::new(),
        }
    }

    /// The style of peft's `adapter_config.json`: no trailing newline, plain key sorting.
    ///
    /// ```
    /// let s = peftkit_checkpoint::PyJsonStyle::peft_adapter_config();
    /// assert!(!s.trailing_newline && s.numeric_key_objects.is_empty());
    /// ```
    pub fn peft_adapter_config() -> Self {
        Self::default()
    }
}

/// Formats `value` exactly as Python's `json.dumps(value, indent=2, sort_keys=True)`.
///
/// ```
/// use peftkit_checkpoint::{py_json_string, PyJsonStyle};
/// let v: serde_json::Value =
///     serde_json::from_str(r#"{"b": [1e-5, 10000.0, 3], "a": "é", "c": {}}"#).unwrap();
/// let out = py_json_string(&v, &PyJsonStyle::default());
/// assert_eq!(
///     out,
///     "{\n  \"a\": \"\\u00e9\",\n  \"b\": [\n    1e-05,\n    10000.0,\n    3\n  ],\n  \"c\": {}\n}"
/// );
/// ```
pub fn py_json_string(value: &Value, style: &PyJsonStyle) -> String {
    let mut out = String::new();
    write_value(&mut out, value, style, 0, false);
    if style.trailing_newline {
        out.push('\n');
    }
    out
}

/// Writes `value` to `writer` exactly as [`py_json_string`] formats it.
///
/// ```
/// use peftkit_checkpoint::{write_py_json, PyJsonStyle};
/// let mut buf = Vec::new();
/// write_py_json(&mut buf, &serde_json::json!([]), &PyJsonStyle::default()).unwrap();
/// assert_eq!(buf, b"[]");
/// ```
pub fn write_py_json<W: std::io::Write>(
    mut writer: W,
    value: &Value,
    style: &PyJsonStyle,
) -> std::io::Result<()> {
    // Config files are a few KB; formatting into memory first keeps the formatter infallible
    // and lets one `write_all` carry the I/O error.
    writer.write_all(py_json_string(value, style).as_bytes())
}

/// transformers v5's encoding of a non-finite float: `{"__float__": "NaN" | "Infinity" |
/// "-Infinity"}`. Returns `None` for a finite value, which should be written as a number.
///
/// ```
/// use peftkit_checkpoint::nonfinite_marker;
/// assert_eq!(
///     nonfinite_marker(f64::NEG_INFINITY),
///     Some(serde_json::json!({"__float__": "-Infinity"}))
/// );
/// assert_eq!(nonfinite_marker(1.5), None);
/// ```
pub fn nonfinite_marker(f: f64) -> Option<Value> {
    let name = if f.is_nan() {
        "NaN"
    } else if f == f64::INFINITY {
        "Infinity"
    } else if f == f64::NEG_INFINITY {
        "-Infinity"
    } else {
        return None;
    };
    let mut map = Map::new();
    map.insert("__float__".to_string(), Value::String(name.to_string()));
    Some(Value::Object(map))
}

/// Python's `repr(float)`: shortest round-trip digits, `1e-05`, `10000.0`, `1e+16`.
///
/// Fixed notation when the decimal exponent `e` of the first significant digit satisfies
/// `-4 <= e < 16`, always with a fractional part; otherwise scientific notation with a signed
/// exponent of at least two digits and no `.0` on a one-digit mantissa. Non-finite values give
/// Python's `repr` spellings `nan`, `inf`, `-inf` (not valid JSON; `json.dumps` would write
/// `NaN` / `Infinity`, and a `serde_json::Value` cannot hold them anyway).
///
/// ```
/// use peftkit_checkpoint::float_repr;
/// assert_eq!(float_repr(1e-5), "1e-05");
/// assert_eq!(float_repr(10000.0), "10000.0");
/// assert_eq!(float_repr(1e16), "1e+16");
/// assert_eq!(float_repr(-0.0), "-0.0");
/// assert_eq!(float_repr(0.1 + 0.2), "0.30000000000000004");
/// ```
pub fn float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".to_string();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.to_string();
    }
    // Rust's `{:e}` prints the shortest digit string that round-trips, closest to the exact
    // value, as `[-]d[.ddd]e<exp>`; Python's `repr` (David Gay's dtoa, mode 0) picks the same
    // digits except on an exact tie between two shortest candidates, which `half_even_tie`
    // settles Python's way. Only the layout around the digits differs otherwise, so decompose
    // and re-lay it out.
    let negative = f.is_sign_negative();
    let magnitude = f.abs();
    let (shortest, shortest_exp) = decompose_sci(&format!("{magnitude:e}"));
    let (digits, exp) =
        half_even_tie(magnitude, &shortest, shortest_exp).unwrap_or((shortest, shortest_exp));

    let mut out = String::with_capacity(digits.len() + 8);
    if negative {
        out.push('-');
    }
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            // `exp` is in 0..16, so the cast cannot truncate.
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                out.push_str(&digits);
                out.extend(std::iter::repeat_n('0', int_len - digits.len()));
                out.push_str(".0");
            } else {
                out.push_str(&digits[..int_len]);
                out.push('.');
                out.push_str(&digits[int_len..]);
            }
        } else {
            out.push_str("0.");
            // `exp` is in -4..0, so `-exp - 1` is in 0..4.
            out.extend(std::iter::repeat_n('0', (-exp - 1) as usize));
            out.push_str(&digits);
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        out.push('e');
        out.push(if exp < 0 { '-' } else { '+' });
        let abs = exp.unsigned_abs();
        if abs < 10 {
            out.push('0');
        }
        out.push_str(&abs.to_string());
    }
    out
}

/// Python's choice when the exact value of `magnitude` lies exactly halfway between two
/// shortest round-trip digit strings (e.g. `1113178120592002.25`, ulp 0.25): dtoa rounds the
/// last digit half to even (`...002.2`), while Rust's formatter rounds half up (`...002.3`).
/// Returns the even candidate when there is such a tie and that candidate also round-trips;
/// `None` means Rust's digits stand.
fn half_even_tie(magnitude: f64, digits: &str, exp: i32) -> Option<(String, i32)> {
    let n = digits.len();
    // Cheap filter: at a tie, the exact value has exactly n + 1 significant digits ending in 5,
    // so the correctly rounded (n + 1)-digit rendering must already end in 5.
    let (probe, probe_exp) = decompose_sci(&format!("{magnitude:.n$e}"));
    if probe_exp != exp || probe.len() != n + 1 || !probe.ends_with('5') {
        return None;
    }
    // Confirm the tie is exact: every digit beyond the 5 is zero. 800 fractional digits cover
    // the full expansion of any f64 (at most 767 significant digits), so this is exact.
    let (full, _) = decompose_sci(&format!("{magnitude:.800e}"));
    let exact_tie = full.get(..n + 1) == Some(probe.as_str())
        && full
            .get(n + 1..)
            .is_some_and(|tail| tail.bytes().all(|b| b == b'0'));
    if !exact_tie {
        return None;
    }
    let lower = probe.get(..n)?;
    let last = lower.bytes().last()?;
    let candidate = if (last - b'0').is_multiple_of(2) {
        lower.to_string()
    } else {
        // The last digit is odd, so adding one never carries.
        let mut up = lower[..n - 1].to_string();
        up.push(char::from(last + 1));
        up
    };
    if candidate == digits {
        return None;
    }
    // Scientific notation with the point after the first digit, as `{:e}` wrote it.
    let text = match candidate.split_at_checked(1) {
        Some((head, tail)) if !tail.is_empty() => format!("{head}.{tail}e{exp}"),
        _ => format!("{candidate}e{exp}"),
    };
    match text.parse::<f64>() {
        Ok(back) if back.to_bits() == magnitude.to_bits() => Some((candidate, exp)),
        _ => None,
    }
}

/// Splits Rust's `{:e}` output for a non-negative value (`1.25e-7`, `0e0`) into significant
/// digits (never empty, no decimal point) and the decimal exponent of the first digit.
///
/// Written as a byte scan that cannot fail, rather than with `parse`, so the library has no
/// panicking path even though the input format is fixed by the standard library.
fn decompose_sci(sci: &str) -> (String, i32) {
    let mut digits = String::with_capacity(20);
    let mut exp: i32 = 0;
    let mut exp_negative = false;
    let mut in_exp = false;
    for b in sci.bytes() {
        match b {
            b'e' | b'E' => in_exp = true,
            b'-' if in_exp => exp_negative = true,
            b'0'..=b'9' if in_exp => {
                exp = exp.saturating_mul(10).saturating_add(i32::from(b - b'0'));
            }
            b'0'..=b'9' => digits.push(char::from(b)),
            // The decimal point carries no information: `{:e}` always puts it after the first
            // digit. Callers pass magnitudes, so there is no mantissa sign.
            _ => {}
        }
    }
    if digits.is_empty() {
        digits.push('0');
    }
    (digits, if exp_negative { -exp } else { exp })
}

/// Writes one value at nesting `level`. `numeric_keys` is set when `value` is an object that
/// sits under a key listed in [`PyJsonStyle::numeric_key_objects`].
fn write_value(
    out: &mut String,
    value: &Value,
    style: &PyJsonStyle,
    level: usize,
    numeric_keys: bool,
) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => {
            // Integers first: serde_json keeps `10000` as an integer and `10000.0` as a float,
            // which is exactly Python's int / float split.
            if let Some(u) = n.as_u64() {
                out.push_str(&u.to_string());
            } else if let Some(i) = n.as_i64() {
                out.push_str(&i.to_string());
            } else if let Some(f) = n.as_f64() {
                out.push_str(&float_repr(f));
            } else {
                // Only reachable with serde_json's `arbitrary_precision`, which this workspace
                // does not enable; its Display is the literal text, the best available answer.
                out.push_str(&n.to_string());
            }
        }
        Value::String(s) => write_py_str(out, s),
        Value::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline_indent(out, level + 1);
                write_value(out, item, style, level + 1, false);
            }
            newline_indent(out, level);
            out.push(']');
        }
        Value::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            if numeric_keys {
                entries.sort_by(|a, b| cmp_numeric_keys(a.0, b.0));
            } else {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (key, child)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline_indent(out, level + 1);
                write_py_str(out, key);
                out.push_str(": ");
                let child_numeric = matches!(child, Value::Object(_))
                    && style.numeric_key_objects.iter().any(|name| name == key);
                write_value(out, child, style, level + 1, child_numeric);
            }
            newline_indent(out, level);
            out.push('}');
        }
    }
}

fn newline_indent(out: &mut String, level: usize) {
    out.push('\n');
    out.extend(std::iter::repeat_n(' ', 2 * level));
}

/// A key of a numerically sorted object: an integer in Python's `str(int)` form, or anything
/// else.
enum NumKey<'a> {
    /// Sign and decimal digits (no leading zeros, never `-0`).
    Int {
        negative: bool,
        digits: &'a str,
    },
    Other(&'a str),
}

fn classify_key(key: &str) -> NumKey<'_> {
    let (negative, digits) = match key.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, key),
    };
    let canonical = match digits.as_bytes() {
        [] => false,
        [b'0'] => !negative,
        [first, rest @ ..] => (b'1'..=b'9').contains(first) && rest.iter().all(u8::is_ascii_digit),
    };
    if canonical {
        NumKey::Int { negative, digits }
    } else {
        NumKey::Other(key)
    }
}

/// Integer keys in numeric order (any length: compared as digit strings, so no overflow), then
/// the other keys in code-point order.
fn cmp_numeric_keys(a: &str, b: &str) -> Ordering {
    match (classify_key(a), classify_key(b)) {
        (
            NumKey::Int {
                negative: na,
                digits: da,
            },
            NumKey::Int {
                negative: nb,
                digits: db,
            },
        ) => {
            // Canonical digit strings of equal sign compare by length, then lexicographically.
            let magnitude = da.len().cmp(&db.len()).then_with(|| da.cmp(db));
            match (na, nb) {
                (true, false) => Ordering::Less,
                (false, true) => Ordering::Greater,
                (false, false) => magnitude,
                (true, true) => magnitude.reverse(),
            }
        }
        (NumKey::Int { .. }, NumKey::Other(_)) => Ordering::Less,
        (NumKey::Other(_), NumKey::Int { .. }) => Ordering::Greater,
        (NumKey::Other(x), NumKey::Other(y)) => x.cmp(y),
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends `s` as a JSON string the way CPython's `py_encode_basestring_ascii` does
/// (`ensure_ascii=True`): printable ASCII `0x20..=0x7E` as is, except `"` and `\`; the short
/// escapes `\" \\ \n \r \t \b \f`; everything else as `\uXXXX` with lowercase hex, characters
/// above U+FFFF as a UTF-16 surrogate pair. `/` is not escaped.
///
/// ```
/// let mut out = String::new();
/// peftkit_checkpoint::write_py_str(&mut out, "é😀\u{7f}\"/");
/// assert_eq!(out, r#""\u00e9\ud83d\ude00\u007f\"/""#);
/// ```
pub fn write_py_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str("\\u");
                    for shift in [12u16, 8, 4, 0] {
                        out.push(char::from(HEX[usize::from((*unit >> shift) & 0xf)]));
                    }
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn dumps(v: &Value) -> String {
        py_json_string(v, &PyJsonStyle::default())
    }

    /// Every expected string here was printed by CPython 3.11.7 (`repr(f)` / `json.dumps(f)`,
    /// which agree for finite floats), not written by hand.
    #[test]
    fn float_repr_matches_python() {
        let cases: &[(f64, &str)] = &[
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (-1.0, "-1.0"),
            (0.1, "0.1"),
            (0.02, "0.02"),
            (0.05, "0.05"),
            (1e-05, "1e-05"),
            (1e-06, "1e-06"),
            (1e-4, "0.0001"),
            (0.001, "0.001"),
            (1e-7, "1e-07"),
            (10000.0, "10000.0"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.5e20, "1.5e+20"),
            (9999999999999998.0, "9999999999999998.0"),
            (999999999999999.9, "999999999999999.9"),
            (1234567890123456.7, "1234567890123456.8"),
            (12345678901234567.0, "1.2345678901234568e+16"),
            (5e-324, "5e-324"),
            (2.2250738585072014e-308, "2.2250738585072014e-308"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (22.627416997969522, "22.627416997969522"),
            (0.1 + 0.2, "0.30000000000000004"),
            (1.0 / 3.0, "0.3333333333333333"),
            (2.0 / 3.0, "0.6666666666666666"),
            (100.0, "100.0"),
            (123456.789, "123456.789"),
            (1e22, "1e+22"),
            (1e23, "1e+23"),
            (1e100, "1e+100"),
            (1e-100, "1e-100"),
            (-1.5e-10, "-1.5e-10"),
            (0.00015, "0.00015"),
            (0.00001234, "1.234e-05"),
            (4.35, "4.35"),
            (2.5, "2.5"),
            (1e21, "1e+21"),
            (1.2345e16, "1.2345e+16"),
            (1e-4 * 1.5, "0.00015000000000000001"),
            (65504.0, "65504.0"),
            (3.4028234663852886e38, "3.4028234663852886e+38"),
            (1.401298464324817e-45, "1.401298464324817e-45"),
            (9007199254740992.0, "9007199254740992.0"),
            (9223372036854775808.0, "9.223372036854776e+18"),
            (18446744073709551616.0, "1.8446744073709552e+19"),
            (500000.0, "500000.0"),
            (1000000.0, "1000000.0"),
            (5e-5, "5e-05"),
            (9.999999999999999e-5, "9.999999999999999e-05"),
        ];
        for &(f, want) in cases {
            assert_eq!(float_repr(f), want, "bits {:#x}", f.to_bits());
        }
    }

    /// Bit patterns and reprs printed by CPython 3.11.7 (`struct.pack("<d", f)` and `repr(f)`),
    /// so these do not depend on Rust's float literal parsing.
    #[test]
    fn float_repr_from_python_bits() {
        let cases: &[(u64, &str)] = &[
            (0x3fb999999999999a, "0.1"),
            (0x4036a09e667f3bcd, "22.627416997969522"),
            (0x1, "5e-324"),
            (0x7fefffffffffffff, "1.7976931348623157e+308"),
            (0x43118b54f22aeb03, "1234567890123456.8"),
            (0x3f1a36e2eb1c432c, "9.999999999999999e-05"),
            (0xbde49da7e361ce4c, "-1.5e-10"),
            (0x44b52d02c7e14af6, "1e+23"),
            (0x10000000000000, "2.2250738585072014e-308"),
        ];
        for &(bits, want) in cases {
            assert_eq!(float_repr(f64::from_bits(bits)), want, "bits {bits:#x}");
        }
    }

    /// Exact ties between two shortest candidates: the exact values (from Python's
    /// `decimal.Decimal(f)`) end in 5 just past the shortest length. CPython 3.11.7 printed these
    /// reprs (round half to even); Rust's `{:e}` rounds these ties up (`...002.3`).
    #[test]
    fn float_repr_breaks_exact_ties_half_to_even_like_python() {
        let cases: &[(u64, &str)] = &[
            (0xc30fa36fd398d412, "-1113178120592002.2"), // exact -1113178120592002.25
            (0x42d9636d03665f08, "111659285584252.12"),  // exact 111659285584252.125
            (0xc2ea97257f2320b4, "-233891771783429.62"), // exact -233891771783429.625
            (0x431d2f16d00751c1, "2053637337633904.2"),  // exact 2053637337633904.25
        ];
        for &(bits, want) in cases {
            assert_eq!(float_repr(f64::from_bits(bits)), want, "bits {bits:#x}");
        }
    }

    #[test]
    fn float_repr_nonfinite_uses_python_repr_spelling() {
        assert_eq!(float_repr(f64::NAN), "nan");
        assert_eq!(float_repr(f64::INFINITY), "inf");
        assert_eq!(float_repr(f64::NEG_INFINITY), "-inf");
    }

    #[test]
    fn nonfinite_markers() {
        assert_eq!(
            nonfinite_marker(f64::NAN),
            Some(json!({"__float__": "NaN"}))
        );
        assert_eq!(
            nonfinite_marker(f64::INFINITY),
            Some(json!({"__float__": "Infinity"}))
        );
        assert_eq!(
            nonfinite_marker(f64::NEG_INFINITY),
            Some(json!({"__float__": "-Infinity"}))
        );
        assert_eq!(nonfinite_marker(0.0), None);
        assert_eq!(nonfinite_marker(f64::MAX), None);
    }

    /// Expected output printed by CPython 3.11.7 `json.dumps(s)`.
    #[test]
    fn string_escapes_match_python() {
        let s = "a\"b\\c/d\n\r\t\u{8}\u{c}\u{0}\u{1}\u{1f}\u{7f} é€😀\u{2028}\u{d7ff}\u{e000}\u{ffff}~ ";
        let want = r#""a\"b\\c/d\n\r\t\b\f\u0000\u0001\u001f\u007f \u00e9\u20ac\ud83d\ude00\u2028\ud7ff\ue000\uffff~ ""#;
        assert_eq!(dumps(&json!(s)), want);
    }

    /// Expected output printed by CPython 3.11.7 `json.dumps(obj, indent=2, sort_keys=True)`.
    #[test]
    fn nested_layout_and_key_order_match_python() {
        let v: Value = serde_json::from_str(
            r#"{"b":[1,{"x":[]},{}],"a":{"é":1,"Z":2,"a":null,"_":true,"A":false},"c":[]}"#,
        )
        .expect("valid JSON");
        let want = "{\n  \"a\": {\n    \"A\": false,\n    \"Z\": 2,\n    \"_\": true,\n    \"a\": null,\n    \"\\u00e9\": 1\n  },\n  \"b\": [\n    1,\n    {\n      \"x\": []\n    },\n    {}\n  ],\n  \"c\": []\n}";
        assert_eq!(dumps(&v), want);
        assert_eq!(dumps(&json!({})), "{}");
        assert_eq!(dumps(&json!([])), "[]");
    }

    /// Expected output printed by CPython 3.11.7 for nested lists and the i64/u64 extremes.
    #[test]
    fn nested_lists_and_integer_extremes_match_python() {
        let v = json!({"k": [[1, [2, []]], i64::MIN, u64::MAX]});
        let want = "{\n  \"k\": [\n    [\n      1,\n      [\n        2,\n        []\n      ]\n    ],\n    -9223372036854775808,\n    18446744073709551615\n  ]\n}";
        assert_eq!(dumps(&v), want);
    }

    /// Python's `sorted` on str is code-point order: CPython 3.11.7 printed
    /// `["B", "_", "a", "\u00e9", "\uffff", "\ud83d\ude00"]` for `sorted([...])` of these keys.
    /// UTF-16 order would put the astral character before U+FFFF.
    #[test]
    fn keys_sort_by_code_point_not_utf16() {
        let v = json!({"\u{1F600}": 0, "\u{ffff}": 0, "é": 0, "a": 0, "_": 0, "B": 0});
        let out = dumps(&v);
        let order: Vec<usize> = [
            "\"B\"",
            "\"_\"",
            "\"a\"",
            "\\u00e9",
            "\\uffff",
            "\\ud83d\\ude00",
        ]
        .iter()
        .map(|k| out.find(k).expect("key present"))
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{out}");
    }

    /// Expected output printed by CPython 3.11.7 `json.dumps` of a dict with int keys under
    /// `id2label` and str keys under `label2id`.
    #[test]
    fn id2label_sorts_numerically_label2id_does_not() {
        let v: Value = serde_json::from_str(
            r#"{"label2id":{"LABEL_10":10,"LABEL_2":2,"LABEL_0":0,"LABEL_1":1,"LABEL_11":11},
                "id2label":{"10":"LABEL_10","2":"LABEL_2","0":"LABEL_0","1":"LABEL_1",
                            "-3":"LABEL_-3","11":"LABEL_11","100":"LABEL_100"}}"#,
        )
        .expect("valid JSON");
        let want = "{\n  \"id2label\": {\n    \"-3\": \"LABEL_-3\",\n    \"0\": \"LABEL_0\",\n    \"1\": \"LABEL_1\",\n    \"2\": \"LABEL_2\",\n    \"10\": \"LABEL_10\",\n    \"11\": \"LABEL_11\",\n    \"100\": \"LABEL_100\"\n  },\n  \"label2id\": {\n    \"LABEL_0\": 0,\n    \"LABEL_1\": 1,\n    \"LABEL_10\": 10,\n    \"LABEL_11\": 11,\n    \"LABEL_2\": 2\n  }\n}";
        let style = PyJsonStyle {
            trailing_newline: false,
            numeric_key_objects: vec!["id2label".into()],
        };
        assert_eq!(py_json_string(&v, &style), want);
        let with_nl = PyJsonStyle::transformers_config();
        assert_eq!(py_json_string(&v, &with_nl), format!("{want}\n"));
    }

    #[test]
    fn numeric_keys_apply_at_any_depth_but_only_directly_under_the_name() {
        let v = json!({
            "text_config": {"id2label": {"10": "b", "9": "a"}},
            "other": {"10": 0, "9": 0},
            "id2label": [{"10": 0, "9": 0}]
        });
        let out = py_json_string(&v, &PyJsonStyle::transformers_config());
        let pos = |needle: &str, from: usize| from + out[from..].find(needle).expect("present");
        // text_config.id2label: numeric.
        let tc = pos("\"text_config\"", 0);
        assert!(pos("\"9\"", tc) < pos("\"10\"", tc));
        // "other": code-point order.
        let other = pos("\"other\"", 0);
        assert!(pos("\"10\"", other) < pos("\"9\"", other));
        // Object inside a list under "id2label": not the object named id2label, code-point order.
        let list = pos("\"id2label\": [", 0);
        assert!(pos("\"10\"", list) < pos("\"9\"", list));
    }

    #[test]
    fn numeric_key_order_edge_cases() {
        let mut keys = vec![
            "b",
            "10",
            "-1",
            "01",
            "a",
            "2",
            "-20",
            "0",
            "99999999999999999999999",
            "-0",
            "",
            "+1",
            "1e3",
        ];
        keys.sort_by(|a, b| cmp_numeric_keys(a, b));
        assert_eq!(
            keys,
            vec![
                "-20",
                "-1",
                "0",
                "2",
                "10",
                "99999999999999999999999",
                "",
                "+1",
                "-0",
                "01",
                "1e3",
                "a",
                "b"
            ]
        );
    }

    #[test]
    fn int_and_float_stay_distinct_after_parsing() {
        let v: Value = serde_json::from_str(
            r#"[10000, 10000.0, 1e16, 1E-5, -7, 0, 0.0, 18446744073709551615]"#,
        )
        .expect("valid JSON");
        assert_eq!(
            dumps(&v),
            "[\n  10000,\n  10000.0,\n  1e+16,\n  1e-05,\n  -7,\n  0,\n  0.0,\n  18446744073709551615\n]"
        );
    }

    #[test]
    fn write_py_json_matches_py_json_string() {
        let v = json!({"z": [1.5, "é"], "a": {"id2label": {"1": "x", "0": "y"}}});
        let style = PyJsonStyle::transformers_config();
        let mut buf = Vec::new();
        write_py_json(&mut buf, &v, &style).expect("Vec never fails");
        assert_eq!(buf, py_json_string(&v, &style).into_bytes());
    }

    #[test]
    fn scalars_at_top_level() {
        assert_eq!(dumps(&json!(null)), "null");
        assert_eq!(dumps(&json!(true)), "true");
        assert_eq!(dumps(&json!(false)), "false");
        assert_eq!(dumps(&json!("x")), "\"x\"");
        assert_eq!(dumps(&json!(0.5)), "0.5");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        #[test]
        fn float_repr_round_trips_and_looks_like_a_float(bits in any::<u64>()) {
            let f = f64::from_bits(bits);
            prop_assume!(f.is_finite());
            let s = float_repr(f);
            let back: f64 = s.parse().map_err(|e| TestCaseError::fail(format!("{s}: {e}")))?;
            prop_assert_eq!(back.to_bits(), f.to_bits(), "{}", s);
            prop_assert!(s.contains('.') || s.contains('e'), "{}", s);
        }

        #[test]
        fn float_repr_round_trips_for_ordinary_magnitudes(f in -1e20f64..1e20f64) {
            let s = float_repr(f);
            let back: f64 = s.parse().map_err(|e| TestCaseError::fail(format!("{s}: {e}")))?;
            prop_assert_eq!(back.to_bits(), f.to_bits(), "{}", s);
            prop_assert!(s.contains('.') || s.contains('e'), "{}", s);
        }
    }
}
