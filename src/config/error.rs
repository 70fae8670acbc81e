//! Configuration errors. Each names the file, the key path and the reason.

use std::fmt;
use std::path::PathBuf;

/// One thing wrong with a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Key path in the file, e.g. `listeners[1].pool`; empty for the file as a whole.
    pub path: String,
    /// What is wrong, in a sentence a user can act on.
    pub reason: String,
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("{}: cannot read: {source}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML of the expected shape (syntax, unknown key, wrong type). Serde stops at
    /// the first such problem, so there is one.
    #[error("{}:{line}:{column}: {}{reason}", file.display(), path_prefix(path))]
    Syntax {
        file: PathBuf,
        path: String,
        line: usize,
        column: usize,
        reason: String,
    },
    /// The file parsed, but its values do not make a working configuration.
    #[error("{}", Invalid { file, problems })]
    Invalid {
        file: PathBuf,
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// Every problem as (key path, reason), for callers and tests that want them one by one.
    pub fn problems(&self) -> Vec<Problem> {
        match self {
            ConfigError::Read { source, .. } => vec![Problem {
                path: String::new(),
                reason: format!("cannot read: {source}"),
            }],
            ConfigError::Syntax { path, reason, .. } => vec![Problem {
                path: path.clone(),
                reason: reason.clone(),
            }],
            ConfigError::Invalid { problems, .. } => problems.clone(),
        }
    }
}

fn path_prefix(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!("{path}: ")
    }
}

/// Formats the problems of [`ConfigError::Invalid`], one per line.
struct Invalid<'a> {
    file: &'a PathBuf,
    problems: &'a [Problem],
}

impl fmt::Display for Invalid<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(
                f,
                "{}: {}{}",
                self.file.display(),
                path_prefix(&problem.path),
                problem.reason
            )?;
        }
        Ok(())
    }
}
