//! What `/healthz` says: whether the store works and how much disk is left.

use serde::Serialize;
use std::sync::Mutex;

/// The control plane's health, as the core loop last saw it.
#[derive(Debug, Default)]
pub struct Health {
    state: Mutex<HealthDoc>,
}

/// The `/healthz` document.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct HealthDoc {
    /// `ok`; `degraded` (new batches refused for lack of disk space, everything else
    /// works); `unavailable` (the store failed and is being reopened: nothing is
    /// answered until it works again).
    pub status: &'static str,
    /// What is wrong, for people.
    pub problems: Vec<String>,
    pub store_ok: bool,
    pub disk_free_bytes: Option<u64>,
    pub min_free_bytes: u64,
    pub storage_low: bool,
    /// Records the store could not read at the last recovery (left out; see
    /// `tokenfab admin verify`).
    pub unreadable_records: Vec<String>,
    /// The store's backend (and, replicated, this replica and its log position).
    pub store: Option<tokenfab_store::StoreInfo>,
}

impl Health {
    pub fn new() -> Self {
        Health {
            state: Mutex::new(HealthDoc {
                status: "ok",
                store_ok: true,
                ..HealthDoc::default()
            }),
        }
    }

    fn update(&self, f: impl FnOnce(&mut HealthDoc)) {
        if let Ok(mut s) = self.state.lock() {
            f(&mut s);
            s.problems.clear();
            if !s.store_ok {
                s.problems
                    .push("the durable store failed; it is being reopened (see the log)".into());
            }
            if s.storage_low {
                let problem = format!(
                    "the data directory has {} free, under the {} kept for running work: new batches are refused; free space or grow the volume",
                    s.disk_free_bytes.map_or("?".into(), tokenfab_core::usage::human_bytes),
                    tokenfab_core::usage::human_bytes(s.min_free_bytes)
                );
                s.problems.push(problem);
            }
            if !s.unreadable_records.is_empty() {
                let problem = format!(
                    "{} records of the store could not be read and were left out (first: {}); stop the server and run tokenfab admin verify --salvage",
                    s.unreadable_records.len(),
                    s.unreadable_records[0]
                );
                s.problems.push(problem);
            }
            s.status = if !s.store_ok {
                "unavailable"
            } else if s.storage_low || !s.unreadable_records.is_empty() {
                "degraded"
            } else {
                "ok"
            };
        }
    }

    pub fn store_failed(&self, _error: &str) {
        self.update(|s| s.store_ok = false);
    }

    pub fn store_recovered(&self) {
        self.update(|s| s.store_ok = true);
    }

    pub fn store_info(&self, info: tokenfab_store::StoreInfo) {
        self.update(|s| s.store = Some(info));
    }

    pub fn disk(&self, free: Option<u64>, min_free: u64, low: bool) {
        self.update(|s| {
            s.disk_free_bytes = free;
            s.min_free_bytes = min_free;
            s.storage_low = low;
        });
    }

    pub fn unreadable(&self, records: Vec<String>) {
        self.update(|s| s.unreadable_records = records);
    }

    pub fn doc(&self) -> HealthDoc {
        self.state.lock().map(|s| s.clone()).unwrap_or_default()
    }
}
