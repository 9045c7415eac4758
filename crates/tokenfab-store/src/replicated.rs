//! One commit ([`WriteSet`]) as a replicated log carries it, shared by the replicated
//! backends (etcd, Raft): the operations and the parsed requests inline, each file's
//! content as a reference `C` of the backend's own (etcd: key ranges of parts; Raft: parts
//! in earlier log entries). Encoded with postcard; the encoding is part of each backend's
//! log format, so the field order never changes.

use crate::{BatchInputs, StagedInput, StoreError, WriteSet};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use tokenfab_core::batch_input::{LineError, ParsedRequest};
use tokenfab_core::durable::DurableOp;
use tokenfab_core::{BatchId, FileId};

/// A commit whose files are referred to by `C`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Commit<C> {
    pub ops: Vec<DurableOp>,
    pub inputs: Vec<Input<C>>,
    pub files: Vec<(FileId, C)>,
}

/// A batch's input: its parsed requests inline, its file's content by reference.
#[derive(Debug, Serialize, Deserialize)]
pub struct Input<C> {
    pub batch: BatchId,
    pub requests: Vec<ParsedRequest>,
    pub line_errors: Vec<LineError>,
    pub content: C,
}

impl<C> Commit<C> {
    /// Describes `set`, asking `content` for a reference to each file (an input's, then
    /// each uploaded file's, in order) after it has written the file where it belongs.
    pub fn describe(
        set: &WriteSet,
        mut content: impl FnMut(&Path) -> Result<C, StoreError>,
    ) -> Result<Self, StoreError> {
        let mut commit = Commit {
            ops: set.ops.clone(),
            inputs: Vec::with_capacity(set.inputs.len()),
            files: Vec::with_capacity(set.files.len()),
        };
        for input in &set.inputs {
            commit.inputs.push(Input {
                batch: input.batch,
                requests: input.requests.as_ref().clone(),
                line_errors: input.line_errors.clone(),
                content: content(input.file.path())?,
            });
        }
        for (id, staged) in &set.files {
            commit.files.push((*id, content(staged.path())?));
        }
        Ok(commit)
    }

    /// The commit as a [`WriteSet`], asking `stage` for each file's content staged on the
    /// replica's store (in the order `describe` met them).
    pub fn into_write_set(
        self,
        mut stage: impl FnMut(C) -> Result<StagedInput, StoreError>,
    ) -> Result<WriteSet, StoreError> {
        let mut set = WriteSet {
            ops: self.ops,
            ..Default::default()
        };
        for input in self.inputs {
            set.inputs.push(BatchInputs {
                batch: input.batch,
                file: stage(input.content)?,
                requests: Arc::new(input.requests),
                line_errors: input.line_errors,
            });
        }
        for (id, content) in self.files {
            set.files.push((id, stage(content)?));
        }
        Ok(set)
    }
}

/// Implements [`crate::Store`]'s reads (and `stage`, `free_bytes`, `file_path`, `backup`)
/// by the replica's embedded store, which a replicated backend's `$local` method returns:
/// every replica serves reads from its own copy. Invoked inside `impl Store for ...`.
#[macro_export]
macro_rules! reads_from_embedded_store {
    ($local:ident) => {
        fn stage(&self) -> Result<$crate::StagedInput, $crate::StoreError> {
            $crate::Store::stage(self.$local())
        }

        async fn load(&self) -> Result<$crate::Loaded, $crate::StoreError> {
            $crate::Store::load(self.$local()).await
        }

        async fn idle_shares(&self) -> Result<Vec<$crate::IdleRow>, $crate::StoreError> {
            $crate::Store::idle_shares(self.$local()).await
        }

        async fn history(&self) -> Result<Vec<$crate::HistoryRow>, $crate::StoreError> {
            $crate::Store::history(self.$local()).await
        }

        async fn bodies(
            &self,
            items: Vec<tokenfab_core::RequestRef>,
        ) -> Result<Vec<Option<$crate::LeasedBody>>, $crate::StoreError> {
            $crate::Store::bodies(self.$local(), items).await
        }

        async fn results(
            &self,
            batch: tokenfab_core::BatchId,
            kind: $crate::ResultKind,
            cursor: $crate::Cursor,
            limit: usize,
        ) -> Result<$crate::Page, $crate::StoreError> {
            $crate::Store::results(self.$local(), batch, kind, cursor, limit).await
        }

        fn free_bytes(&self) -> Option<u64> {
            $crate::Store::free_bytes(self.$local())
        }

        fn file_path(&self, id: tokenfab_core::FileId) -> Option<std::path::PathBuf> {
            $crate::Store::file_path(self.$local(), id)
        }

        async fn backup(
            &self,
            out: Box<dyn std::io::Write + Send>,
        ) -> Result<$crate::backup::BackupSummary, $crate::StoreError> {
            $crate::Store::backup(self.$local(), out).await
        }
    };
}
