//! Python semantics peft relies on, in one place: `re` patterns ([`PyRegex`]), `re.escape`
//! ([`re_escape`]) and peft's suffix rule for module-name lists ([`name_matches_suffix`]).
//!
//! Every pattern in an adapter config is a *Python* `re` pattern. [`PyRegex`] compiles it with
//! the `regex` crate (linear time) and falls back to `fancy_regex` for the Python features the
//! `regex` crate lacks (look-around, back-references), so configs written for peft keep working.
//!
//! ```
//! use peftkit_peft::{name_matches_suffix, re_escape, PyRegex};
//!
//! let re = PyRegex::fullmatch(r"q_proj|v_proj").unwrap();
//! assert!(re.is_match("v_proj").unwrap());
//! assert_eq!(re_escape("layers.0.q_proj"), r"layers\.0\.q_proj");
//! assert!(name_matches_suffix("model.layers.0.q_proj", "q_proj"));
//! assert!(!name_matches_suffix("model.layers.0.xq_proj", "q_proj"));
//! ```

/// A Python `re` pattern that failed to compile or to run.
#[derive(Debug, thiserror::Error)]
pub enum RegexError {
    /// Neither engine accepts the pattern.
    #[error("invalid regular expression {pattern:?}: {message}")]
    Invalid {
        /// The pattern as written (Python syntax).
        pattern: String,
        /// Both engines' complaints.
        message: String,
    },
    /// The backtracking engine gave up (e.g. its backtrack limit was hit).
    #[error("regular expression {pattern:?} failed on {text:?}: {message}")]
    Runtime {
        /// The pattern as written (Python syntax).
        pattern: String,
        /// The input being matched.
        text: String,
        /// The engine's complaint.
        message: String,
    },
}

/// Which Python `re` function a [`PyRegex`] behaves like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PyMatchMode {
    /// `re.search`: a match anywhere.
    Search,
    /// `re.match`: a match starting at the beginning of the text.
    Match,
    /// `re.fullmatch`: the whole text must match.
    FullMatch,
}

#[derive(Clone)]
enum Engine {
    Std(regex::Regex),
    Fancy(fancy_regex::Regex),
}

/// A Python `re` pattern compiled for one of `re.search` / `re.match` / `re.fullmatch`.
///
/// Compiled with the `regex` crate when possible and with `fancy_regex` otherwise (look-around,
/// back-references). `\Z` (Python's end of text) is translated to `\z`. Known remaining
/// differences from Python, irrelevant for module names: Python's `$` also matches before a final
/// `"\n"`, and POSIX-class or set-operation syntax inside `[...]` means different things.
#[derive(Clone)]
pub struct PyRegex {
    pattern: String,
    mode: PyMatchMode,
    engine: Engine,
}

impl std::fmt::Debug for PyRegex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PyRegex")
            .field("pattern", &self.pattern)
            .field("mode", &self.mode)
            .field("fancy", &self.uses_fancy())
            .finish()
    }
}

impl PyRegex {
    /// Compiles `pattern` (Python syntax) to behave like `re.<mode>(pattern, text)`.
    pub fn new(pattern: &str, mode: PyMatchMode) -> Result<Self, RegexError> {
        let body = translate_python_syntax(pattern);
        // The group keeps alternations in the pattern from escaping the anchors.
        let wrapped = match mode {
            PyMatchMode::Search => body,
            PyMatchMode::Match => format!(r"\A(?:{body})"),
            PyMatchMode::FullMatch => format!(r"\A(?:{body})\z"),
        };
        let engine = match regex::Regex::new(&wrapped) {
            Ok(re) => Engine::Std(re),
            Err(std_err) => match fancy_regex::Regex::new(&wrapped) {
                Ok(re) => Engine::Fancy(re),
                Err(fancy_err) => {
                    return Err(RegexError::Invalid {
                        pattern: pattern.to_owned(),
                        message: format!("regex: {std_err}; fancy-regex: {fancy_err}"),
                    })
                }
            },
        };
        Ok(Self {
            pattern: pattern.to_owned(),
            mode,
            engine,
        })
    }

    /// `re.search(pattern, text)`.
    pub fn search(pattern: &str) -> Result<Self, RegexError> {
        Self::new(pattern, PyMatchMode::Search)
    }

    /// `re.match(pattern, text)` (anchored at the start only).
    pub fn match_start(pattern: &str) -> Result<Self, RegexError> {
        Self::new(pattern, PyMatchMode::Match)
    }

    /// `re.fullmatch(pattern, text)`.
    pub fn fullmatch(pattern: &str) -> Result<Self, RegexError> {
        Self::new(pattern, PyMatchMode::FullMatch)
    }

    /// The pattern as given (Python syntax, without the anchoring added for the mode).
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// The `re` function this regex behaves like.
    pub fn mode(&self) -> PyMatchMode {
        self.mode
    }

    /// Whether the pattern needed the backtracking engine.
    pub fn uses_fancy(&self) -> bool {
        matches!(self.engine, Engine::Fancy(_))
    }

    /// Whether the Python call would return a match object.
    pub fn is_match(&self, text: &str) -> Result<bool, RegexError> {
        match &self.engine {
            Engine::Std(re) => Ok(re.is_match(text)),
            Engine::Fancy(re) => re.is_match(text).map_err(|e| self.runtime(text, e)),
        }
    }

    /// The text of named group `name` in the first match (`m.groupdict().get(name)`); `None`
    /// when there is no match or the group did not take part in it.
    pub fn named_group(&self, text: &str, name: &str) -> Result<Option<String>, RegexError> {
        match &self.engine {
            Engine::Std(re) => Ok(re
                .captures(text)
                .and_then(|c| c.name(name).map(|m| m.as_str().to_owned()))),
            Engine::Fancy(re) => Ok(re
                .captures(text)
                .map_err(|e| self.runtime(text, e))?
                .and_then(|c| c.name(name).map(|m| m.as_str().to_owned()))),
        }
    }

    fn runtime(&self, text: &str, err: fancy_regex::Error) -> RegexError {
        RegexError::Runtime {
            pattern: self.pattern.clone(),
            text: text.to_owned(),
            message: err.to_string(),
        }
    }
}

/// Rewrites the few Python escapes whose spelling differs in the Rust engines.
fn translate_python_syntax(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len());
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                // Python's `\Z` is "end of text" (Rust's `\z`); Rust rejects `\Z`.
                Some('Z') => out.push_str(r"\z"),
                Some(other) => {
                    out.push('\\');
                    out.push(other);
                }
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Python 3.11's `re.escape`: a backslash before each character of its `_special_chars_map`
/// (`()[]{}?*+-|^$\\.&~# \t\n\r\v\f`), every other character as is. Python before 3.7 escaped
/// every non-alphanumeric character; peft 0.21.2 runs on 3.9+, so this is the set it sees.
pub fn re_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for c in s.chars() {
        if "()[]{}?*+-|^$\\.&~# \t\n\r\x0b\x0c".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `name == entry or name.endswith("." + entry)`: peft's matching of a module name against one
/// entry of a list (`target_modules`, `exclude_modules`, `layers_to_transform` pattern keys and
/// the legacy-MoE rules' module names; see peft's `check_target_module_exists`).
pub fn name_matches_suffix(name: &str, entry: &str) -> bool {
    name == entry
        || (name.len() > entry.len()
            && name.ends_with(entry)
            && name.as_bytes()[name.len() - entry.len() - 1] == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pyregex_modes() {
        let full = PyRegex::fullmatch(r"q_proj|v_proj").unwrap();
        assert!(full.is_match("q_proj").unwrap());
        // Without the group the alternation would escape the anchors.
        assert!(!full.is_match("xq_proj").unwrap());
        assert!(!full.is_match("q_projx").unwrap());
        let m = PyRegex::match_start(r"q").unwrap();
        assert!(m.is_match("q_proj").unwrap());
        assert!(!m.is_match("a.q_proj").unwrap());
        let s = PyRegex::search(r"q").unwrap();
        assert!(s.is_match("a.q_proj").unwrap());
    }

    #[test]
    fn pyregex_falls_back_to_fancy_for_lookaround() {
        let re = PyRegex::fullmatch(r".*\.(?!k_proj)[a-z]_proj").unwrap();
        assert!(re.uses_fancy());
        assert!(re.is_match("layers.0.q_proj").unwrap());
        assert!(!re.is_match("layers.0.k_proj").unwrap());
        let backref = PyRegex::fullmatch(r"(?P<a>\w+)\.(?P=a)").unwrap();
        assert!(backref.is_match("x.x").unwrap());
        assert!(!backref.is_match("x.y").unwrap());
        let z = PyRegex::match_start(r"q_proj\Z").unwrap();
        assert!(z.is_match("q_proj").unwrap());
        assert!(!z.is_match("q_proj.x").unwrap());
        assert!(matches!(
            PyRegex::fullmatch("(unclosed"),
            Err(RegexError::Invalid { .. })
        ));
    }

    #[test]
    fn re_escape_is_python_311() {
        // Output of Python 3.11 `re.escape` on the same strings.
        assert_eq!(re_escape("a.b_c-d"), r"a\.b_c\-d");
        assert_eq!(re_escape("x/y:z@w!'\"%,;<=>`"), "x/y:z@w!'\"%,;<=>`");
        assert_eq!(re_escape("é ü"), "é\\ ü");
        assert_eq!(
            re_escape("()[]{}?*+|^$\\&~#"),
            r"\(\)\[\]\{\}\?\*\+\|\^\$\\\&\~\#"
        );
    }

    #[test]
    fn suffix_rule() {
        assert!(name_matches_suffix("q_proj", "q_proj"));
        assert!(name_matches_suffix("a.q_proj", "q_proj"));
        assert!(!name_matches_suffix("aq_proj", "q_proj"));
        assert!(!name_matches_suffix("proj", "q_proj"));
    }
}
