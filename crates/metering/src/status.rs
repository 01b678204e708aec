//! What a usage record says about its counts: the extractor's verdict on a response that ran
//! its course, or why there is no verdict to give.

use std::fmt;
use std::str::FromStr;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

use crate::{Extraction, UsageOutcome};

/// A record's `usage_status`: `found`, `missing`, `malformed`, `too_large` (what the
/// extractor concluded), `incomplete` or `not_metered`.
///
/// The extractor's four verdicts are not repeated here but wrapped
/// ([`UsageStatus::Extracted`]): a status is a verdict plus the two cases the extractor cannot
/// see, a response that broke off and one that was never metered. It is written as one flat
/// label, in the log and in metrics alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UsageStatus {
    /// The extractor's verdict on the whole response (or on its usage, found before the
    /// response broke off).
    Extracted(UsageOutcome),
    /// The response broke off (client gone, replica failed mid-body) before any usage was
    /// read.
    Incomplete,
    /// Tether did not meter the response, e.g. one of its own errors.
    NotMetered,
}

impl UsageStatus {
    /// Usage was found.
    pub const FOUND: UsageStatus = UsageStatus::Extracted(UsageOutcome::Found);

    /// Every status.
    pub const ALL: [UsageStatus; 6] = [
        UsageStatus::FOUND,
        UsageStatus::Extracted(UsageOutcome::Missing),
        UsageStatus::Extracted(UsageOutcome::Malformed),
        UsageStatus::Extracted(UsageOutcome::TooLarge),
        UsageStatus::Incomplete,
        UsageStatus::NotMetered,
    ];

    /// The status of a response: `extraction` is what its extractor finished with (`None`
    /// when it had none), `broke_off` whether the response ended with an error rather than
    /// its last byte. Found usage is found however the response ended; a verdict of missing,
    /// malformed or too large on a body that never finished is no verdict, so it is
    /// `incomplete`.
    pub fn of(extraction: Option<&Extraction>, broke_off: bool) -> UsageStatus {
        match extraction.map(|x| x.outcome) {
            None => UsageStatus::NotMetered,
            Some(UsageOutcome::Found) => UsageStatus::FOUND,
            Some(_) if broke_off => UsageStatus::Incomplete,
            Some(outcome) => UsageStatus::Extracted(outcome),
        }
    }

    /// Whether usage was found.
    pub const fn is_found(self) -> bool {
        matches!(self, UsageStatus::Extracted(UsageOutcome::Found))
    }

    /// Label for the usage log and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            UsageStatus::Extracted(outcome) => outcome.as_str(),
            UsageStatus::Incomplete => "incomplete",
            UsageStatus::NotMetered => "not_metered",
        }
    }
}

impl fmt::Display for UsageStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A label that names no [`UsageStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{label:?} is not a usage status (found, missing, malformed, too_large, incomplete or not_metered)")]
pub struct UnknownUsageStatus {
    /// The label as given.
    pub label: String,
}

impl FromStr for UsageStatus {
    type Err = UnknownUsageStatus;

    fn from_str(label: &str) -> Result<UsageStatus, UnknownUsageStatus> {
        UsageStatus::ALL
            .into_iter()
            .find(|s| s.as_str() == label)
            .ok_or_else(|| UnknownUsageStatus {
                label: label.to_owned(),
            })
    }
}

// By hand rather than derived: the wrapped verdict is written flat, as its own label.
impl Serialize for UsageStatus {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for UsageStatus {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<UsageStatus, D::Error> {
        struct Label;

        impl de::Visitor<'_> for Label {
            type Value = UsageStatus;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a usage status label")
            }

            fn visit_str<E: de::Error>(self, label: &str) -> Result<UsageStatus, E> {
                label.parse().map_err(E::custom)
            }
        }

        deserializer.deserialize_str(Label)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Usage;

    fn extraction(outcome: UsageOutcome) -> Extraction {
        Extraction {
            usage: Usage::default(),
            outcome,
            model: None,
        }
    }

    #[test]
    fn every_extraction_and_ending_has_its_status() {
        use UsageOutcome::{Found, Malformed, Missing, TooLarge};
        let cases = [
            (None, false, "not_metered"),
            (None, true, "not_metered"),
            (Some(Found), false, "found"),
            (Some(Found), true, "found"),
            (Some(Missing), false, "missing"),
            (Some(Missing), true, "incomplete"),
            (Some(Malformed), false, "malformed"),
            (Some(Malformed), true, "incomplete"),
            (Some(TooLarge), false, "too_large"),
            (Some(TooLarge), true, "incomplete"),
        ];
        for (outcome, broke_off, label) in cases {
            let x = outcome.map(extraction);
            let status = UsageStatus::of(x.as_ref(), broke_off);
            assert_eq!(
                status.as_str(),
                label,
                "{outcome:?}, broke off: {broke_off}"
            );
            assert_eq!(status.is_found(), label == "found");
        }
    }

    #[test]
    fn labels_serde_and_from_str_agree() {
        let labels: Vec<&str> = UsageStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            labels,
            [
                "found",
                "missing",
                "malformed",
                "too_large",
                "incomplete",
                "not_metered"
            ]
        );
        for status in UsageStatus::ALL {
            let label = status.as_str();
            let json = serde_json::to_string(&status).unwrap();
            assert_eq!(json, format!("\"{label}\""));
            assert_eq!(serde_json::from_str::<UsageStatus>(&json).unwrap(), status);
            assert_eq!(label.parse::<UsageStatus>(), Ok(status));
            assert_eq!(status.to_string(), label);
        }
        for outcome in [
            UsageOutcome::Found,
            UsageOutcome::Missing,
            UsageOutcome::Malformed,
            UsageOutcome::TooLarge,
        ] {
            assert_eq!(
                serde_json::to_string(&outcome).unwrap(),
                format!("\"{}\"", outcome.as_str()),
                "the extractor's verdict and the status it becomes are spelt alike"
            );
        }
    }

    #[test]
    fn unknown_labels_are_refused() {
        for label in ["", "Found", "too-large", "unknown"] {
            assert_eq!(
                label.parse::<UsageStatus>().unwrap_err().label,
                label.to_owned()
            );
            assert!(serde_json::from_str::<UsageStatus>(&format!("{label:?}")).is_err());
        }
        assert!(serde_json::from_str::<UsageStatus>("3").is_err());
    }
}
