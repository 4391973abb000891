//! transformers' `dot_natural_key`: the order a model loaded by `from_pretrained` is saved in.
//!
//! A name is split on `.`; an all-digit part sorts as an integer before any text part; a
//! text part sorts by code point, with trailing digits compared as an integer
//! (`shard_2` before `shard_11`). Parts are compared left to right, and a name that is a
//! prefix of another sorts first.

use std::cmp::Ordering;

#[derive(Debug, PartialEq, Eq)]
enum Part<'a> {
    Int(&'a str),
    Text(&'a str, Option<&'a str>),
}

fn parts(key: &str) -> impl Iterator<Item = Part<'_>> {
    key.split('.').map(|p| {
        if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) {
            Part::Int(p)
        } else {
            let text = p.trim_end_matches(|c: char| c.is_ascii_digit());
            let digits = &p[text.len()..];
            Part::Text(text, (!digits.is_empty()).then_some(digits))
        }
    })
}

/// Compares two non-empty ASCII digit strings as unbounded integers.
fn cmp_int(a: &str, b: &str) -> Ordering {
    let a = a.trim_start_matches('0');
    let b = b.trim_start_matches('0');
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

fn cmp_part(a: &Part<'_>, b: &Part<'_>) -> Ordering {
    match (a, b) {
        (Part::Int(x), Part::Int(y)) => cmp_int(x, y),
        (Part::Int(_), Part::Text(..)) => Ordering::Less,
        (Part::Text(..), Part::Int(_)) => Ordering::Greater,
        (Part::Text(t1, d1), Part::Text(t2, d2)) => t1.cmp(t2).then_with(|| match (d1, d2) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Less,
            (Some(_), None) => Ordering::Greater,
            (Some(x), Some(y)) => cmp_int(x, y),
        }),
    }
}

/// Compares two state-dict names the way `sorted(keys, key=dot_natural_key)` does.
///
/// ```
/// use peftkit_checkpoint::natural_cmp;
/// assert!(natural_cmp("model.layers.2.w", "model.layers.10.w").is_lt());
/// assert!(natural_cmp("lm_head.weight", "model.embed_tokens.weight").is_lt());
/// ```
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let mut pa = parts(a);
    let mut pb = parts(b);
    loop {
        match (pa.next(), pb.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) => match cmp_part(&x, &y) {
                Ordering::Equal => continue,
                other => return other,
            },
        }
    }
}

/// Sorts names stably in natural order.
pub fn sort_natural<T>(items: &mut [T], key: impl Fn(&T) -> &str) {
    items.sort_by(|a, b| natural_cmp(key(a), key(b)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_before_text_and_numeric_suffixes() {
        let mut v = vec![
            "a.b",
            "a.10",
            "a.2",
            "a.shard_11",
            "a.shard_2",
            "a.shard",
            "a",
            "a.b.c",
        ];
        sort_natural(&mut v, |s| s);
        assert_eq!(
            v,
            [
                "a",
                "a.2",
                "a.10",
                "a.b",
                "a.b.c",
                "a.shard",
                "a.shard_2",
                "a.shard_11"
            ]
        );
    }

    #[test]
    fn leading_zeros_compare_equal_and_stay_stable() {
        assert_eq!(natural_cmp("x.01", "x.1"), Ordering::Equal);
        assert!(natural_cmp("x.99999999999999999999999", "x.100000000000000000000000").is_lt());
    }
}
