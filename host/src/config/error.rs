//! The one error type of [`crate::config`].

use std::path::{Path, PathBuf};

/// What went wrong while reading a merge configuration or a command-line parameter flag.
///
/// Every variant says where (`file`, `line`, `column` where the YAML parser reports them, the
/// key) and its message says what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The YAML file could not be read.
    #[error("cannot read merge config {}: {source}; check the path and its permissions", path.display())]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The text is not valid YAML, or a value has the wrong shape or type (as reported by the
    /// YAML parser, with its position).
    #[error("{}: {message}; fix the YAML at that position", location(file.as_deref(), *line, *column))]
    Yaml {
        /// The file, when the text came from one.
        file: Option<PathBuf>,
        /// 1-based line, when known.
        line: Option<u32>,
        /// 1-based column, when known.
        column: Option<u32>,
        /// The parser's message (its own position suffix removed), prefixed with the path inside
        /// the document (`models[1].parameters`) when the parser gives one.
        message: String,
    },

    /// A key that this schema (mergekit 0.1.5 `mergekit-yaml`) does not have.
    #[error(
        "{}: unknown key `{key}` {}{}; known keys there: {}. Remove or rename it",
        location(file.as_deref(), *line, *column),
        if section.is_empty() { "at the top level".to_string() } else { format!("in `{section}`") },
        suggestion.as_ref().map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default(),
        expected.join(", ")
    )]
    UnknownKey {
        /// The file, when the text came from one.
        file: Option<PathBuf>,
        /// 1-based line, when known.
        line: Option<u32>,
        /// 1-based column, when known.
        column: Option<u32>,
        /// Where the key sits inside the document (`""` for the top level, `models[0]`, ...).
        section: String,
        /// The unknown key.
        key: String,
        /// The closest known key, when one is close.
        suggestion: Option<Box<str>>,
        /// The keys that are allowed there.
        expected: Box<[String]>,
    },

    /// The YAML is well formed but the configuration is not valid (a missing or conflicting
    /// key, an unsupported dtype, unequal slice lengths, ...).
    #[error("{}: `{key}`: {message}", location(file.as_deref(), *line, None))]
    Invalid {
        /// The file, when the text came from one.
        file: Option<PathBuf>,
        /// 1-based line of the top-level key involved, when it can be found.
        line: Option<u32>,
        /// The key involved (`merge_method`, `slices[1]`, ...).
        key: String,
        /// What is wrong and what to do.
        message: String,
    },

    /// The configuration uses a mergekit feature that this implementation does not support.
    #[error("{}: `{key}`: {message}", location(file.as_deref(), *line, None))]
    Unsupported {
        /// The file, when the text came from one.
        file: Option<PathBuf>,
        /// 1-based line of the top-level key involved, when it can be found.
        line: Option<u32>,
        /// The key involved.
        key: String,
        /// What is not supported and what to use instead.
        message: String,
    },

    /// A `mergekit-moe` configuration was given where a `mergekit-yaml` one was expected.
    #[error(
        "{}: this is a mergekit-moe config (it has `experts:` and no `merge_method:`), not a \
         mergekit-yaml merge config; load it with `MoeConfig` / as a mixture-of-experts build",
        location(file.as_deref(), None, None)
    )]
    MoeConfig {
        /// The file, when the text came from one.
        file: Option<PathBuf>,
    },

    /// A `mergekit-yaml` configuration was given where a `mergekit-moe` one was expected.
    #[error(
        "{}: this is a mergekit-yaml merge config (it has `merge_method:`), not a mergekit-moe \
         config; load it with `MergeConfig`",
        location(file.as_deref(), None, None)
    )]
    NotMoeConfig {
        /// The file, when the text came from one.
        file: Option<PathBuf>,
    },

    /// A command-line model or parameter flag could not be parsed.
    #[error("invalid flag `{flag}`: {message}")]
    Flag {
        /// The flag's text as given.
        flag: String,
        /// What is wrong and the expected form.
        message: String,
    },
}

impl ConfigError {
    /// Attaches the file name to an error produced while parsing text that came from `file`.
    pub(crate) fn with_file(mut self, path: &Path) -> Self {
        match &mut self {
            ConfigError::Yaml { file, .. }
            | ConfigError::UnknownKey { file, .. }
            | ConfigError::Invalid { file, .. }
            | ConfigError::Unsupported { file, .. }
            | ConfigError::MoeConfig { file }
            | ConfigError::NotMoeConfig { file } => *file = Some(path.to_path_buf()),
            ConfigError::Read { .. } | ConfigError::Flag { .. } => {}
        }
        self
    }

    /// The 1-based line the error points at, when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Yaml { line, .. }
            | ConfigError::UnknownKey { line, .. }
            | ConfigError::Invalid { line, .. }
            | ConfigError::Unsupported { line, .. } => line.map(|l| l as usize),
            _ => None,
        }
    }
}

fn location(file: Option<&Path>, line: Option<u32>, column: Option<u32>) -> String {
    let mut out = match file {
        Some(f) => f.display().to_string(),
        None => "<merge config>".to_string(),
    };
    if let Some(l) = line {
        out.push_str(&format!(":{l}"));
        if let Some(c) = column {
            out.push_str(&format!(":{c}"));
        }
    }
    out
}

/// Turns a serde_yaml error into a [`ConfigError`], recognising unknown keys.
pub(crate) fn from_yaml_error(err: &serde_yaml::Error) -> ConfigError {
    let (line, column) = match err.location() {
        Some(loc) => (u32::try_from(loc.line()).ok(), u32::try_from(loc.column()).ok()),
        None => (None, None),
    };
    let full = err.to_string();
    // serde_yaml appends " at line L column C" (and, for scanner errors, more context after a
    // comma); the position is reported separately, so drop the first such suffix.
    let message = match full.find(" at line ") {
        Some(i) => {
            let rest = &full[i + " at line ".len()..];
            match rest.find(", ") {
                Some(j) => format!("{}{}", &full[..i], &rest[j..]),
                None => full[..i].to_string(),
            }
        }
        None => full.clone(),
    };
    if let Some(unknown) = parse_unknown_field(&message) {
        let suggestion = did_you_mean(&unknown.key, unknown.expected.iter().map(String::as_str));
        return ConfigError::UnknownKey {
            file: None,
            line,
            column,
            section: unknown.section,
            key: unknown.key,
            suggestion: suggestion.map(String::into_boxed_str),
            expected: unknown.expected.into(),
        };
    }
    ConfigError::Yaml {
        file: None,
        line,
        column,
        message,
    }
}

struct UnknownField {
    section: String,
    key: String,
    expected: Vec<String>,
}

/// Recognises serde's "unknown field `x`, expected one of `a`, `b`" (optionally prefixed with a
/// document path such as `models[0]: `).
fn parse_unknown_field(message: &str) -> Option<UnknownField> {
    const MARK: &str = "unknown field `";
    let at = message.find(MARK)?;
    let section = message[..at].trim_end().trim_end_matches(':').to_string();
    let rest = &message[at + MARK.len()..];
    let end = rest.find('`')?;
    let key = rest[..end].to_string();
    let tail = &rest[end + 1..];
    let expected = tail
        .split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s.to_string())
        .collect();
    Some(UnknownField {
        section,
        key,
        expected,
    })
}

/// The known key closest to `key`, when it is close enough to be a likely typo.
pub(crate) fn did_you_mean<'a>(key: &str, known: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let key_l = key.to_ascii_lowercase();
    let mut best: Option<(usize, &str)> = None;
    for k in known {
        let d = edit_distance(&key_l, &k.to_ascii_lowercase());
        if best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, k));
        }
    }
    let (d, k) = best?;
    let limit = (key.chars().count() / 3).max(2);
    (d <= limit).then(|| k.to_string())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let sub = prev[j - 1] + usize::from(a[i - 1] != b[j - 1]);
            cur[j] = sub.min(prev[j] + 1).min(cur[j - 1] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn did_you_mean_finds_typos_and_ignores_unrelated_words() {
        let known = ["merge_method", "models", "slices", "parameters", "dtype"];
        assert_eq!(did_you_mean("modles", known).as_deref(), Some("models"));
        assert_eq!(did_you_mean("paramters", known).as_deref(), Some("parameters"));
        assert_eq!(
            did_you_mean("merge-method", known).as_deref(),
            Some("merge_method")
        );
        assert_eq!(did_you_mean("experts", known), None);
    }

    #[test]
    fn unknown_field_messages_are_parsed_with_their_section() {
        let u = parse_unknown_field("models[0]: unknown field `paramters`, expected `model` or `parameters`")
            .expect("recognised");
        assert_eq!(u.section, "models[0]");
        assert_eq!(u.key, "paramters");
        assert_eq!(u.expected, ["model", "parameters"]);
    }
}
