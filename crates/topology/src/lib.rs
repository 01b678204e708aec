//! Tether's topology: the YAML file that describes listeners, regions, replicas, tenants and
//! prices, and the validated [`Topology`] the proxy serves from.
//!
//! Loading has two layers, after river's raw/internal split: serde types that mirror the file
//! (every struct `deny_unknown_fields`, so a typo is an error with its line, never a silently
//! ignored setting), then a conversion that checks cross-field rules and reports **all**
//! problems at once, each with its YAML path (`regions[1].replicas[0].address`). A `Topology`
//! therefore always satisfies the rules listed in `docs/configuration.md`.
//!
//! This crate is pure: it never touches the network or Pingora.
//!
//! ```
//! use tether_topology::Topology;
//!
//! let yaml = r#"
//! listen: 127.0.0.1:8080
//! local_region: eu
//! regions:
//!   - name: eu
//!     replicas:
//!       - { id: eu-1, address: "127.0.0.1:9101" }
//!       - { id: eu-2, address: "127.0.0.1:9102", weight: 2, state: draining }
//! "#;
//! let topology = Topology::from_yaml(yaml, "example.yaml").unwrap();
//! assert_eq!(topology.regions[0].replicas[1].weight, 2);
//!
//! let err = Topology::from_yaml(&yaml.replace("local_region: eu", "local_region: ap"), "bad.yaml")
//!     .unwrap_err();
//! assert_eq!(err.to_string(), "bad.yaml: 1 problem:\n  - local_region: \"ap\" is not a region (regions: eu)");
//! ```

mod diff;
mod error;
mod input;
mod model;
mod raw;
mod validate;

use std::io::Read;
use std::path::Path;

pub use diff::{diff, TopologyDiff};
pub use error::{Problem, TopologyError};
pub use input::{MAX_CONFIG_BYTES, MAX_NESTING_DEPTH};
pub use model::{
    AdminSettings, AffinitySettings, CertificateFiles, FailoverSettings, HealthSettings,
    MeteringSettings, Pricing, ProbeSettings, Rate, Region, ReloadSettings, Replica,
    RequestBodySettings, SecretSource, ServerSettings, StickyStoreSettings, Tenant, TenantLimits,
    TlsListener, Topology, UpstreamAuth, UpstreamSettings, UpstreamTls, UsageLog,
    DEFAULT_RETRY_UNANSWERED,
};
pub use tether_engine::EngineKind;
pub use validate::{
    admin_needs_token, MAX_POINTS_PER_WEIGHT, MAX_RING_POINTS, MAX_TOKEN_LEN_LIMIT, MAX_WEIGHT,
};

impl Topology {
    /// Parses and validates YAML text; `source_name` names it in errors (a file path). Text
    /// over [`MAX_CONFIG_BYTES`] or nested deeper than [`MAX_NESTING_DEPTH`] is refused before
    /// parsing; a leading byte-order mark is skipped.
    pub fn from_yaml(text: &str, source_name: &str) -> Result<Topology, TopologyError> {
        let text = input::prepare(text).map_err(|refusal| limit(source_name, refusal))?;
        let raw: raw::RawTopology =
            serde_yaml::from_str(text).map_err(|e| TopologyError::Parse {
                source_name: source_name.to_owned(),
                line: e.location().map(|l| l.line()),
                column: e.location().map(|l| l.column()),
                message: e.to_string(),
            })?;
        validate::validate(raw).map_err(|problems| TopologyError::Invalid {
            source_name: source_name.to_owned(),
            problems,
        })
    }

    /// Reads, parses and validates a file. Reading stops past [`MAX_CONFIG_BYTES`], so a wrong
    /// path to a huge file fails fast.
    pub fn load(path: &Path) -> Result<Topology, TopologyError> {
        let source_name = path.display().to_string();
        let read_error = |source| TopologyError::Read {
            path: path.to_owned(),
            source,
        };
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|file| {
                file.take(MAX_CONFIG_BYTES as u64 + 1)
                    .read_to_end(&mut bytes)
            })
            .map_err(read_error)?;
        if bytes.len() > MAX_CONFIG_BYTES {
            return Err(limit(&source_name, input::too_large()));
        }
        let text = String::from_utf8(bytes).map_err(|e| {
            read_error(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                not_utf8(e.as_bytes(), e.utf8_error().valid_up_to()),
            ))
        })?;
        Self::from_yaml(&text, &source_name)
    }

    /// The local region.
    pub fn local(&self) -> &Region {
        &self.regions[self.local_region]
    }

    /// All replicas with their region index, in file order.
    pub fn replicas(&self) -> impl Iterator<Item = (usize, &Replica)> {
        self.regions
            .iter()
            .enumerate()
            .flat_map(|(r, region)| region.replicas.iter().map(move |replica| (r, replica)))
    }
}

fn limit(source_name: &str, refusal: input::Refusal) -> TopologyError {
    TopologyError::Limit {
        source_name: source_name.to_owned(),
        line: refusal.line,
        message: refusal.message,
    }
}

/// Why `bytes` are not a topology's text, for the operator.
fn not_utf8(bytes: &[u8], valid_up_to: usize) -> String {
    if bytes.starts_with(&[0xff, 0xfe]) || bytes.starts_with(&[0xfe, 0xff]) {
        "not UTF-8 but UTF-16 (it starts with a UTF-16 byte-order mark): save it as UTF-8".into()
    } else {
        format!("not UTF-8: invalid byte sequence at offset {valid_up_to}")
    }
}

#[cfg(test)]
mod tests;
