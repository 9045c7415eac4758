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
