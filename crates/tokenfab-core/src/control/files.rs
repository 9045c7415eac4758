//! Uploaded files (the OpenAI Files API): ownership, limits, retention and deletion.

use super::*;

impl ControlCore {
    /// Accepts an uploaded file of `bytes` bytes (its content staged by the shell, which
    /// must persist the resulting `CreateFile` with it before acknowledging). Checked
    /// against the tenant's stored-bytes limit and the free disk space.
    pub(crate) fn add_file(
        &mut self,
        now: Timestamp,
        tenant: &TenantId,
        filename: String,
        bytes: u64,
        purpose: String,
    ) -> Result<FileMeta, SubmitError> {
        self.check_storage()?;
        self.check_quota(now, tenant, 0, 0, bytes)?;
        let meta = FileMeta {
            id: FileId(self.next_file),
            tenant: tenant.clone(),
            filename,
            bytes,
            created_at: now,
            purpose,
        };
        self.next_file += 1;
        self.actions
            .push_back(Action::Persist(DurableOp::CreateFile { meta: meta.clone() }));
        self.keep_file(meta.clone());
        Ok(meta)
    }

    pub(super) fn keep_file(&mut self, meta: FileMeta) {
        if let Some(end) = self.file_expiry(&meta) {
            self.files_retained.insert((end, meta.id));
        }
        self.files_by_tenant.insert((meta.tenant.clone(), meta.id));
        self.next_file = self.next_file.max(meta.id.0 + 1);
        self.files.insert(meta.id, meta);
    }

    /// When a file's retention ends (files follow their tenant's retention, counted from
    /// the upload), if it does.
    pub fn file_expiry(&self, meta: &FileMeta) -> Option<Timestamp> {
        let keep = self
            .config
            .tenant_retention
            .get(&meta.tenant)
            .copied()
            .or(self.config.retention)?;
        Some(meta.created_at.saturating_add(keep))
    }

    /// One of `tenant`'s files.
    pub fn file(&self, tenant: &TenantId, id: FileId) -> Result<&FileMeta, FileError> {
        self.files
            .get(&id)
            .filter(|f| &f.tenant == tenant)
            .ok_or(FileError::NotFound(id))
    }

    /// `tenant`'s files after `after` (newest first, or oldest first with `ascending`).
    pub fn list_files(
        &self,
        tenant: &TenantId,
        after: Option<FileId>,
        limit: usize,
        ascending: bool,
    ) -> (Vec<FileMeta>, bool) {
        let all = self
            .files_by_tenant
            .range((tenant.clone(), FileId(0))..=(tenant.clone(), FileId(u64::MAX)))
            .map(|(_, id)| *id);
        let ids: Vec<FileId> = if ascending {
            all.filter(|id| after.is_none_or(|a| *id > a)).collect()
        } else {
            all.rev().filter(|id| after.is_none_or(|a| *id < a)).collect()
        };
        let more = ids.len() > limit;
        (
            ids.into_iter().take(limit).map(|id| self.files[&id].clone()).collect(),
            more,
        )
    }

    /// A tenant deletes one of its files (batches created from it keep their own copy).
    pub(crate) fn delete_file(&mut self, tenant: &TenantId, id: FileId) -> Result<(), FileError> {
        self.file(tenant, id)?;
        self.drop_file(id);
        Ok(())
    }

    pub(super) fn drop_file(&mut self, id: FileId) {
        let Some(meta) = self.files.remove(&id) else {
            return;
        };
        if let Some(end) = self.file_expiry(&meta) {
            self.files_retained.remove(&(end, id));
        }
        self.files_by_tenant.remove(&(meta.tenant, id));
        self.actions.push_back(Action::Persist(DurableOp::DeleteFile { id }));
    }

    /// Restores the files read back from the store (after [`ControlCore::recover`]);
    /// `next` is the first file id never given out.
    pub fn restore_files(&mut self, files: impl IntoIterator<Item = FileMeta>, next: u64) {
        for f in files {
            self.keep_file(f);
        }
        self.next_file = self.next_file.max(next);
    }
}
