//! Errors of loading a topology: unreadable, unparsable, or invalid (with every problem).

use std::fmt;
use std::path::PathBuf;

use thiserror::Error;

/// One thing wrong with a topology, located by its YAML path (`regions[1].replicas[0].id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// YAML path of the offending key.
    pub key: String,
    /// What is wrong, in words an operator can act on.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Why a topology could not be loaded.
#[derive(Debug, Error)]
pub enum TopologyError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The text is larger or nested deeper than any topology needs; refused before parsing
    /// (see [`MAX_CONFIG_BYTES`](crate::MAX_CONFIG_BYTES) and
    /// [`MAX_NESTING_DEPTH`](crate::MAX_NESTING_DEPTH)).
    #[error("{source_name}: {message}")]
    Limit {
        /// File name (or `<string>`).
        source_name: String,
        /// 1-based line, when one is to blame.
        line: Option<usize>,
        /// What is wrong, with the limit.
        message: String,
    },
    /// The YAML is malformed or does not fit the schema (unknown key, wrong type, …).
    #[error("{source_name}: {message}")]
    Parse {
        /// File name (or `<string>`).
        source_name: String,
        /// 1-based line, when serde_yaml knows it.
        line: Option<usize>,
        /// 1-based column, when serde_yaml knows it.
        column: Option<usize>,
        /// serde_yaml's message, which names the key path and the line.
        message: String,
    },
    /// The YAML parsed but breaks one or more rules; every problem is listed.
    #[error("{source_name}: {} problem{}:\n{}", problems.len(), if problems.len() == 1 { "" } else { "s" }, ProblemList(problems))]
    Invalid {
        /// File name (or `<string>`).
        source_name: String,
        /// Every problem found, in file order.
        problems: Vec<Problem>,
    },
}

impl TopologyError {
    /// The problems of an `Invalid` error (empty for the other kinds).
    pub fn problems(&self) -> &[Problem] {
        match self {
            TopologyError::Invalid { problems, .. } => problems,
            _ => &[],
        }
    }
}

struct ProblemList<'a>(&'a [Problem]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "  - {p}")?;
        }
        Ok(())
    }
}
