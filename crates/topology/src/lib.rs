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
mod model;
mod raw;
mod validate;

use std::path::Path;

pub use diff::{diff, TopologyDiff};
pub use error::{Problem, TopologyError};
pub use model::{
    AdminSettings, AffinitySettings, FailoverSettings, HealthSettings, MeteringSettings, Pricing,
    ProbeSettings, Region, ReloadSettings, Replica, ServerSettings, StickyStoreSettings, Tenant,
    Topology, UpstreamSettings, UsageLog, DEFAULT_RETRY_UNANSWERED,
};
pub use validate::{MAX_POINTS_PER_WEIGHT, MAX_RING_POINTS, MAX_TOKEN_LEN_LIMIT, MAX_WEIGHT};

impl Topology {
    /// Parses and validates YAML text; `source_name` names it in errors (a file path).
    pub fn from_yaml(text: &str, source_name: &str) -> Result<Topology, TopologyError> {
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

    /// Reads, parses and validates a file.
    pub fn load(path: &Path) -> Result<Topology, TopologyError> {
        let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_yaml(&text, &path.display().to_string())
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

#[cfg(test)]
mod tests;
