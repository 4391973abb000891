//! Shard planning exactly as huggingface_hub's `split_state_dict_into_shards_factory` does it.

use crate::error::{CheckpointError, Result};

/// transformers 5.x's default `max_shard_size`.
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 50_000_000_000;

/// Parses a shard size the way huggingface_hub's `parse_size_to_int` does: an integer number
/// of bytes, or a number followed by a decimal unit (`KB`, `MB`, `GB`, `TB`, any case, spaces
/// allowed). Binary units (`GiB`) and bare numbers in a string are rejected, as they are there.
///
/// ```
/// use peftkit_checkpoint::parse_size;
/// assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
/// assert_eq!(parse_size(" 1.5 MB ").unwrap(), 1_500_000);
/// assert!(parse_size("5GiB").is_err());
/// assert!(parse_size("100").is_err());
/// ```
pub fn parse_size(input: &str) -> Result<u64> {
    let err = |reason: &str| CheckpointError::InvalidShardSize {
        input: input.to_owned(),
        reason: reason.to_owned(),
    };
    let s = input.trim();
    // Python takes the last two characters as the unit; with fewer there is no unit.
    let split = s
        .char_indices()
        .rev()
        .nth(1)
        .map(|(i, _)| i)
        .ok_or_else(|| err("no unit"))?;
    let (number, unit) = s.split_at(split);
    let mult: f64 = match unit.to_ascii_uppercase().as_str() {
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        _ => return Err(err(&unit_problem(s))),
    };
    let number = number.trim();
    let value: f64 =
        parse_python_float(number).ok_or_else(|| err(&format!("`{number}` is not a number")))?;
    let bytes = value * mult;
    if !bytes.is_finite() || bytes < 0.0 {
        return Err(err("the size must be a non-negative finite number"));
    }
    // Python's int() truncates toward zero.
    Ok(bytes.trunc() as u64)
}

/// Parses a `max_shard_size` as transformers takes it, `int | str`: an integer is a number of
/// bytes (`"10000"`), anything else goes through [`parse_size`] (`"5GB"`, `"1.5 MB"`). This is
/// what the command line's `--max-shard-size` accepts.
///
/// ```
/// use peftkit_checkpoint::parse_max_shard_size;
/// assert_eq!(parse_max_shard_size("10000").unwrap(), 10_000);
/// assert_eq!(parse_max_shard_size("5GB").unwrap(), 5_000_000_000);
/// let e = parse_max_shard_size("5 GiB").unwrap_err().to_string();
/// assert!(e.contains("`GiB`") && e.contains("10000") && e.contains("50GB"), "{e}");
/// ```
pub fn parse_max_shard_size(input: &str) -> Result<u64> {
    let s = input.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().map_err(|_| CheckpointError::InvalidShardSize {
            input: input.to_owned(),
            reason: "the number of bytes does not fit in 64 bits".to_owned(),
        });
    }
    parse_size(input)
}

/// Why the end of `s` is not a unit. huggingface_hub reads the last two characters as the unit
/// (`"5 GiB"` gives `IB`); the message names the whole trailing word instead, which is what the
/// user typed.
fn unit_problem(s: &str) -> String {
    let word_start = s
        .char_indices()
        .rev()
        .take_while(|(_, c)| c.is_alphabetic())
        .last()
        .map_or(s.len(), |(i, _)| i);
    match &s[word_start..] {
        "" => "no unit".to_owned(),
        w if w.len() == 3 && w[1..2].eq_ignore_ascii_case("i") => {
            format!("`{w}` is a binary unit, which huggingface_hub does not accept")
        }
        w => format!("`{w}` is not a unit"),
    }
}

/// Accepts what Python's `float()` accepts for plain decimal numbers (no `inf`/`nan`, no
/// underscores).
fn parse_python_float(s: &str) -> Option<f64> {
    let ok = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
        && s.bytes().any(|b| b.is_ascii_digit());
    if ok {
        s.parse().ok()
    } else {
        None
    }
}

/// One unit of planning: a tensor, or a family of tensors sharing one storage (which
/// huggingface_hub places together in the shard of the first member).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanItem {
    /// Names in the unit, first member first.
    pub names: Vec<String>,
    /// Bytes of the unit's storage.
    pub size: u64,
}

/// Splits `items`, in order, into shards of at most `max_size` bytes: a new shard starts
/// when the current one would exceed the limit (strictly: an exact fit stays), and an item
/// larger than the limit gets a shard of its own at once while the current shard stays open.
/// Returns the names of each shard in planning order.
///
/// ```
/// use peftkit_checkpoint::{plan_shards, PlanItem};
/// let items = [("a", 6), ("big", 20), ("b", 4), ("c", 1)]
///     .map(|(n, s)| PlanItem { names: vec![n.into()], size: s });
/// let shards = plan_shards(&items, 10);
/// assert_eq!(shards, vec![vec!["big".to_string()], vec!["a".into(), "b".into()], vec!["c".into()]]);
/// ```
pub fn plan_shards(items: &[PlanItem], max_size: u64) -> Vec<Vec<String>> {
    let mut shards: Vec<Vec<String>> = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut current_size = 0u64;
    for item in items {
        if item.size > max_size {
            shards.push(item.names.clone());
            continue;
        }
        if current_size + item.size > max_size {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.extend(item.names.iter().cloned());
        current_size += item.size;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(v: &[(&str, u64)]) -> Vec<PlanItem> {
        v.iter()
            .map(|(n, s)| PlanItem {
                names: vec![(*n).to_owned()],
                size: *s,
            })
            .collect()
    }

    #[test]
    fn exact_fit_stays_in_the_shard() {
        assert_eq!(
            plan_shards(&items(&[("a", 5), ("b", 5), ("c", 1)]), 10),
            vec![vec!["a", "b"], vec!["c"]]
        );
    }

    #[test]
    fn oversize_item_gets_its_own_shard_and_current_stays_open() {
        let s = plan_shards(&items(&[("a", 3), ("huge", 11), ("b", 3)]), 10);
        assert_eq!(s, vec![vec!["huge"], vec!["a", "b"]]);
    }

    #[test]
    fn family_counts_as_one_unit() {
        let it = vec![
            PlanItem {
                names: vec!["x".into()],
                size: 4,
            },
            PlanItem {
                names: vec!["e0".into(), "e1".into()],
                size: 8,
            },
        ];
        assert_eq!(plan_shards(&it, 10), vec![vec!["x"], vec!["e0", "e1"]]);
    }

    #[test]
    fn sizes_parse_like_huggingface_hub() {
        assert_eq!(parse_size("5gb").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("20KB").unwrap(), 20_000);
        assert_eq!(parse_size("0.5TB").unwrap(), 500_000_000_000);
        for bad in ["5GiB", "100", "5 G", "", "GB", "x GB", "-1GB", "nanGB"] {
            assert!(parse_size(bad).is_err(), "{bad} should be rejected");
        }
        let msg = parse_size("5GiB").unwrap_err().to_string();
        assert!(
            msg.contains("50GB") && msg.contains("KB, MB, GB or TB") && msg.contains("`GiB`"),
            "{msg}"
        );
    }

    #[test]
    fn max_shard_size_is_an_integer_or_a_size_string() {
        // transformers takes `int | str`: digits are bytes, the rest is parse_size_to_int.
        assert_eq!(parse_max_shard_size("10000").unwrap(), 10_000);
        assert_eq!(parse_max_shard_size(" 7 ").unwrap(), 7);
        assert_eq!(parse_max_shard_size("1.5 MB").unwrap(), 1_500_000);
        for (bad, why) in [
            ("5 GiB", "`GiB` is a binary unit"),
            ("5 G", "`G` is not a unit"),
            ("12", ""),
            ("99999999999999999999999", "64 bits"),
            ("", "no unit"),
            ("5 XB", "`XB` is not a unit"),
        ] {
            match parse_max_shard_size(bad) {
                Err(e) => assert!(e.to_string().contains(why), "{bad}: {e}"),
                Ok(n) => assert!(bad == "12" && n == 12, "{bad} accepted as {n}"),
            }
        }
    }
}
