//! Identifier newtypes. A bare `u64` or `String` never stands for an id.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A batch, numbered by the control plane in submission order. Shown to tenants as
/// `batch_00000042`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BatchId(pub u64);

impl fmt::Display for BatchId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "batch_{:08}", self.0)
    }
}

/// A string that is not a batch id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a batch id: batch ids look like batch_00000042")]
pub struct BadBatchId(pub String);

impl FromStr for BatchId {
    type Err = BadBatchId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.strip_prefix("batch_")
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse().ok())
            .map(BatchId)
            .ok_or_else(|| BadBatchId(s.to_string()))
    }
}

/// A file a tenant uploaded through the OpenAI-compatible Files API. Shown as
/// `file-00000042`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FileId(pub u64);

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "file-{:08}", self.0)
    }
}

impl FromStr for FileId {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.strip_prefix("file-")
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse().ok())
            .map(FileId)
            .ok_or(())
    }
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(pub String);

        impl $name {
            pub fn new(s: impl Into<String>) -> Self {
                $name(s.into())
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name(s.to_string())
            }
        }
    };
}

string_id!(
    /// A tenant: an organisation or team that submits batches and is billed for them.
    TenantId
);
string_id!(
    /// A node: one machine running one agent.
    NodeId
);
string_id!(
    /// A super-node: a set of nodes whose devices share a high-bandwidth domain
    /// (an HGX board, a GB200 NVL72 rack, a CloudMatrix 384).
    SuperNodeId
);
string_id!(
    /// A model as tokenfab names it (`llama-3.1-8b`); the catalog maps it to its shape.
    ModelId
);
string_id!(
    /// An accelerator class from the catalog (`h100-sxm`, `l40s`, ...).
    AcceleratorId
);
string_id!(
    /// An engine replica on a node (`r0`), unique on that node.
    ReplicaId
);

/// A group of requests leased together to one agent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WorkUnitId(pub u64);

impl fmt::Display for WorkUnitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "wu_{}", self.0)
    }
}

/// One request: the `index`-th valid request of a batch (0-based, in input order).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RequestRef {
    pub batch: BatchId,
    pub index: u32,
}

impl fmt::Display for RequestRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.batch, self.index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_id_round_trips_and_rejects_junk() {
        let id = BatchId(42);
        assert_eq!(id.to_string(), "batch_00000042");
        assert_eq!("batch_00000042".parse::<BatchId>(), Ok(id));
        assert_eq!("batch_123456789".parse::<BatchId>(), Ok(BatchId(123_456_789)));
        for bad in ["", "batch_", "batch_x1", "42", "batch_-1", "Batch_1"] {
            let err = bad.parse::<BatchId>().unwrap_err();
            assert!(err.to_string().contains("batch_00000042"), "{err}");
        }
    }
}
