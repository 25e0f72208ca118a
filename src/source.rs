//! Errors that point into a configuration or policy file by line and column.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// An error at a position in a text file, printed as `file:line:column: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceError {
    /// The file that contains the error.
    pub file: PathBuf,
    /// 1-based line number.
    pub line: usize,
    /// 1-based column, counted in characters.
    pub column: usize,
    /// What is wrong and what to do about it.
    pub message: String,
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

impl std::error::Error for SourceError {}

impl SourceError {
    /// Builds an error at byte `offset` of `text`.
    pub fn at(file: &Path, text: &str, offset: usize, message: impl Into<String>) -> Self {
        let (line, column) = line_column(text, offset);
        SourceError {
            file: file.to_owned(),
            line,
            column,
            message: message.into(),
        }
    }

    /// Builds an error at the start of a span, or at line 1 when there is none.
    pub fn at_span(
        file: &Path,
        text: &str,
        span: Option<Range<usize>>,
        message: impl Into<String>,
    ) -> Self {
        Self::at(file, text, span.map_or(0, |s| s.start), message)
    }

    /// Converts a TOML parse or type error, keeping its position.
    pub fn from_toml(file: &Path, text: &str, error: &toml::de::Error) -> Self {
        // toml's messages can span lines; keep each error on one log line.
        let message = error.message().trim_end().replace('\n', " ");
        Self::at_span(file, text, error.span(), message)
    }
}

/// Converts a byte offset into a 1-based line and character column.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Parses TOML text into `T`, reporting errors with file, line and column.
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    file: &Path,
    text: &str,
) -> Result<T, SourceError> {
    toml::from_str(text).map_err(|e| SourceError::from_toml(file, text, &e))
}

/// Reads and parses a TOML file, reporting errors with file, line and column.
pub fn read_toml<T: serde::de::DeserializeOwned>(file: &Path) -> Result<(T, String), SourceError> {
    let text = std::fs::read_to_string(file).map_err(|e| SourceError {
        file: file.to_owned(),
        line: 1,
        column: 1,
        message: format!("cannot read the file: {e}"),
    })?;
    let value = parse_toml(file, &text)?;
    Ok((value, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_column_counts_from_one() {
        let text = "a = 1\nbé = x\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 6), (2, 1));
        assert_eq!(line_column(text, 10), (2, 4));
    }

    #[test]
    fn toml_error_has_position() {
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Sample {
            name: String,
        }
        let text = "name = \"a\"\nbogus = 1\n";
        let err = parse_toml::<Sample>(Path::new("x.toml"), text).unwrap_err();
        assert_eq!((err.line, err.column), (2, 1), "{err}");
        assert!(
            err.to_string()
                .starts_with("x.toml:2:1: unknown field `bogus`"),
            "{err}"
        );
    }
}
