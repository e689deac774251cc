//! Configuration errors, each naming the file, line and column it is about.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem in one file. Messages describe the offending value by its role, never by
/// echoing a secret: key files hold only hashes, so nothing in them is secret anyway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; 0 when the problem is about the file as a whole (unreadable, missing).
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl ConfigError {
    /// A problem with a file as a whole (missing, unreadable, refused), not a place in it.
    pub fn whole_file(path: &Path, message: impl Into<String>) -> Self {
        Self { file: path.to_path_buf(), line: 0, column: 0, message: message.into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}:{}:{}: {}", self.file.display(), self.line, self.column, self.message)
        }
    }
}

/// Everything wrong with a configuration, so one `keygate check` shows it all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(error: ConfigError) -> Self {
        Self(vec![error])
    }
}

/// A file's text, kept to turn byte spans into line and column and to collect errors.
pub struct SourceFile<'a> {
    pub path: &'a Path,
    pub text: &'a str,
    pub errors: Vec<ConfigError>,
}

impl<'a> SourceFile<'a> {
    pub fn new(path: &'a Path, text: &'a str) -> Self {
        Self { path, text, errors: Vec::new() }
    }

    pub fn error_at(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        let start = span.start.min(self.text.len());
        let before = &self.text.as_bytes()[..start];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let column = String::from_utf8_lossy(&before[line_start..]).chars().count() + 1;
        ConfigError { file: self.path.to_path_buf(), line, column, message: message.into() }
    }

    pub fn push(&mut self, span: Range<usize>, message: impl Into<String>) {
        let error = self.error_at(span, message);
        self.errors.push(error);
    }

    pub fn whole_file(path: &Path, message: impl Into<String>) -> ConfigError {
        ConfigError::whole_file(path, message)
    }

    /// A TOML syntax or schema error, located where the parser says.
    pub fn toml_error(&self, error: &toml::de::Error) -> ConfigError {
        let message = error.message().trim().to_string();
        match error.span() {
            Some(span) => self.error_at(span, message),
            None => ConfigError { line: 1, column: 1, ..Self::whole_file(self.path, message) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_become_line_and_column() {
        let text = "a = 1\nbb = \"x\"\n";
        let source = SourceFile::new(Path::new("k.toml"), text);
        let error = source.error_at(11..14, "bad");
        assert_eq!((error.line, error.column), (2, 6));
        assert_eq!(error.to_string(), "k.toml:2:6: bad");
    }
}
