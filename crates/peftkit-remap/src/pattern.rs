//! Name patterns of the conversion tables: how one side of a rule is searched in a tensor name,
//! and how the other side is written in its place.
//!
//! The matching rules are transformers' (`WeightTransform.__init__` and `rename_source_key` in
//! `core_model_loading.py`), re-implemented on the `regex` crate:
//!
//! * the patterns of a side are tried as one alternation, **longest pattern first** (stable);
//! * `*.` stands for an expert index and is searched as `.*\.`;
//! * a pattern ending in an ASCII letter or digit must end on a name boundary: the next
//!   character is not a word character (transformers appends `(?!\w)`; `regex` has no
//!   look-ahead, so the boundary character is matched outside the reported text);
//! * the replacement is the *write form* of the other side's first pattern: without its leading
//!   `^`, with `\.` unescaped and its capture group replaced by the text the searched side
//!   captured;
//! * the write form replaces the **first textual occurrence** of the matched text in the name
//!   (Python's `str.replace(m, r, 1)`), which is not always the match position.

use regex::Regex;

/// The compiled search and write forms of one side of a rule.
#[derive(Debug, Clone)]
pub(crate) struct Side {
    /// The patterns as written in the table.
    pub(crate) patterns: Vec<String>,
    regex: Regex,
    /// For each pattern index: the capture index of its own group (if it has one).
    inner_group: Vec<Option<usize>>,
    /// For each pattern index: the capture index of the branch (`g{i}`).
    branch_group: Vec<usize>,
    /// Write forms, one per pattern.
    pub(crate) templates: Vec<Template>,
}

/// What a side looks like when written: literal text around an optional captured part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template {
    before: String,
    after: String,
    has_group: bool,
}

impl Template {
    /// The written text, with `captured` in place of the group.
    pub(crate) fn fill(&self, captured: Option<&str>) -> String {
        if self.has_group {
            format!("{}{}{}", self.before, captured.unwrap_or(""), self.after)
        } else {
            self.before.clone()
        }
    }

    pub(crate) fn has_group(&self) -> bool {
        self.has_group
    }
}

/// A search hit of a side in a name.
#[derive(Debug, Clone)]
pub(crate) struct Hit {
    /// Index of the pattern that matched.
    pub(crate) pattern: usize,
    /// The matched text (without the boundary character).
    pub(crate) text: String,
    /// The text of the pattern's capture group.
    pub(crate) captured: Option<String>,
}

/// Position of the first capture group `( … )` (an opening parenthesis not followed by `?`,
/// not escaped), as a byte range including both parentheses.
fn capture_group(pattern: &str) -> Result<Option<(usize, usize)>, String> {
    let bytes = pattern.as_bytes();
    let mut i = 0;
    let mut found: Option<(usize, usize)> = None;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'(' => {
                if bytes.get(i + 1) == Some(&b'?') {
                    let kind = bytes.get(i + 2).copied();
                    if matches!(kind, Some(b'=' | b'!' | b'<')) {
                        return Err("look-around groups are not supported (the `regex` crate has none); express the condition with the pattern itself".into());
                    }
                    if kind != Some(b':') {
                        return Err(
                            "only plain `( … )` capture groups and `(?: … )` groups are supported"
                                .into(),
                        );
                    }
                }
                let start = i;
                let mut depth = 0usize;
                let mut j = i;
                let end = loop {
                    match bytes.get(j) {
                        None => return Err("unbalanced parenthesis".into()),
                        Some(b'\\') => j += 2,
                        Some(b'(') => {
                            depth += 1;
                            j += 1;
                        }
                        Some(b')') => {
                            depth -= 1;
                            j += 1;
                            if depth == 0 {
                                break j;
                            }
                        }
                        Some(_) => j += 1,
                    }
                };
                if bytes.get(start + 1) != Some(&b'?') {
                    if found.is_some() {
                        return Err("at most one capture group per pattern".into());
                    }
                    found = Some((start, end));
                }
                i = end;
            }
            _ => i += 1,
        }
    }
    Ok(found)
}

/// Literal text of a pattern fragment outside the capture group: `\.` becomes `.`; other regex
/// syntax cannot be written and is refused.
fn literal(fragment: &str, pattern: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = fragment.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('.') => out.push('.'),
                other => {
                    return Err(format!(
                        "`{pattern}` cannot be written as a name: escape `\\{}` outside the capture group (only `\\.` is allowed there)",
                        other.map(String::from).unwrap_or_default()
                    ))
                }
            },
            '[' | ']' | '{' | '}' | '|' | '+' | '?' | '$' | '^' | '(' | ')' => {
                return Err(format!(
                    "`{pattern}` cannot be written as a name: `{c}` outside the capture group"
                ))
            }
            other => out.push(other),
        }
    }
    Ok(out)
}

/// The write form of a pattern (see the module documentation).
pub(crate) fn template(pattern: &str) -> Result<Template, String> {
    let body = pattern.strip_prefix('^').unwrap_or(pattern);
    Ok(match capture_group(body)? {
        Some((s, e)) => Template {
            before: literal(&body[..s], pattern)?,
            after: literal(&body[e..], pattern)?,
            has_group: true,
        },
        None => Template {
            before: literal(body, pattern)?,
            after: String::new(),
            has_group: false,
        },
    })
}

impl Side {
    /// Compiles the patterns of one side.
    pub(crate) fn new(patterns: Vec<String>) -> Result<Self, String> {
        if patterns.is_empty() {
            return Err("a side needs at least one pattern".into());
        }
        let mut order: Vec<usize> = (0..patterns.len()).collect();
        // Longest first, stable: a name is matched by the first branch that fits.
        order.sort_by_key(|&i| std::cmp::Reverse(patterns[i].chars().count()));
        let mut branches = Vec::new();
        let mut has_group = Vec::new();
        for &i in &order {
            let p = &patterns[i];
            if p.is_empty() {
                return Err("empty pattern".into());
            }
            let group = capture_group(p).map_err(|e| format!("`{p}`: {e}"))?;
            has_group.push((i, group.is_some()));
            let body = p.replace("*.", r".*\.");
            let boundary = body
                .chars()
                .last()
                .is_some_and(|c| c.is_ascii_alphanumeric());
            branches.push(format!(
                "(?P<g{i}>{body}){}",
                if boundary { r"(?:\W|$)" } else { "" }
            ));
        }
        let regex = Regex::new(&branches.join("|")).map_err(|e| format!("{e}"))?;
        let mut branch_group = vec![0usize; patterns.len()];
        let mut inner_group = vec![None; patterns.len()];
        for (idx, name) in regex.capture_names().enumerate() {
            if let Some(i) = name
                .and_then(|n| n.strip_prefix('g'))
                .and_then(|n| n.parse::<usize>().ok())
            {
                branch_group[i] = idx;
                if has_group.iter().any(|&(j, g)| j == i && g) {
                    // The pattern's own group is the next one opened inside its branch.
                    inner_group[i] = Some(idx + 1);
                }
            }
        }
        let templates = patterns
            .iter()
            .map(|p| template(p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Side {
            patterns,
            regex,
            inner_group,
            branch_group,
            templates,
        })
    }

    /// Searches the side in `name` (see the module documentation).
    pub(crate) fn find(&self, name: &str) -> Option<Hit> {
        let caps = self.regex.captures(name)?;
        let pattern =
            (0..self.patterns.len()).find(|&i| caps.get(self.branch_group[i]).is_some())?;
        let text = caps.get(self.branch_group[pattern])?.as_str().to_owned();
        let captured = self.inner_group[pattern]
            .and_then(|g| caps.get(g))
            .map(|m| m.as_str().to_owned());
        Some(Hit {
            pattern,
            text,
            captured,
        })
    }

    /// Whether the side's patterns carry a capture group.
    pub(crate) fn has_group(&self) -> bool {
        self.templates.iter().any(Template::has_group)
    }
}

/// Replaces the first textual occurrence of `hit.text` in `name` by `write` filled with the
/// captured text, as Python's `str.replace(old, new, 1)` does.
pub(crate) fn rewrite(name: &str, hit: &Hit, write: &Template) -> String {
    name.replacen(&hit.text, &write.fill(hit.captured.as_deref()), 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(p: &[&str]) -> Side {
        Side::new(p.iter().map(|s| s.to_string()).collect()).unwrap()
    }

    #[test]
    fn boundary_after_alphanumeric_end() {
        let s = side(&["attention.key"]);
        assert!(s.find("x.attention.key_cache").is_none());
        assert_eq!(
            s.find("x.attention.key.weight").unwrap().text,
            "attention.key"
        );
        assert_eq!(s.find("x.attention.key").unwrap().text, "attention.key");
        // The boundary failing at one position does not stop the search at later ones.
        assert_eq!(
            s.find("attention.keys.attention.key.w").unwrap().text,
            "attention.key"
        );
    }

    #[test]
    fn wildcard_dots_and_expert_star() {
        let s = side(&[".experts.*.w1.weight", ".experts.*.w3.weight"]);
        let h = s.find("model.layers.0.mlp.experts.12.w3.weight").unwrap();
        assert_eq!(h.pattern, 1);
        assert_eq!(h.text, ".experts.12.w3.weight");
        assert!(s
            .find("model.layers.0.mlp.experts.12.w3.weight_scale")
            .is_none());
        assert_eq!(
            s.templates[0].fill(None),
            ".experts.*.w1.weight",
            "the write form keeps the star"
        );
    }

    #[test]
    fn capture_groups_are_carried_across() {
        let o = side(&[r"^vision_model\.(.+)"]);
        let v = side(&["^(.+)"]);
        let h = o.find("vision_model.encoder.w").unwrap();
        assert_eq!(
            rewrite("vision_model.encoder.w", &h, &v.templates[0]),
            "encoder.w"
        );
        let h = v.find("encoder.w").unwrap();
        assert_eq!(
            rewrite("encoder.w", &h, &o.templates[0]),
            "vision_model.encoder.w"
        );
    }

    #[test]
    fn replaces_first_textual_occurrence() {
        // Python's str.replace: the first occurrence of the matched text, wherever the match was.
        let s = side(&["^b.c"]);
        let h = s.find("bxc.a.bxc").unwrap();
        assert_eq!(rewrite("bxc.a.bxc", &h, &template("z").unwrap()), "z.a.bxc");
    }

    #[test]
    fn longest_pattern_first() {
        let s = side(&["a.b", "a.b.c"]);
        assert_eq!(s.find("x.a.b.c").unwrap().pattern, 1);
    }

    #[test]
    fn unwritable_patterns_are_refused() {
        assert!(template(r"layers\.\d+\.x").is_err());
        assert!(template("a|b").is_err());
        assert!(Side::new(vec!["a(?!b)".into()]).is_err());
        assert!(Side::new(vec!["(a)(b)".into()]).is_err());
        assert_eq!(
            template(r"^encoder\.layer\.").unwrap().fill(None),
            "encoder.layer."
        );
    }
}
