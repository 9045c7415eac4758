//! The embedded redb backend against the store conformance suite, on a real file.

use tokenfab_store::{RedbStore, Store, StoreError};

#[tokio::test]
async fn redb_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data");
    tokenfab_store::conformance::check(|| RedbStore::open(&path).unwrap()).await;
}

#[tokio::test]
async fn a_second_server_on_the_same_directory_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let first = RedbStore::open(dir.path()).unwrap();
    let err = RedbStore::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
    assert!(
        err.to_string().contains("another tokenfab server is already using it"),
        "{err}"
    );
    assert!(first.load().await.unwrap().batches.is_empty());
}

#[tokio::test]
async fn an_unusable_directory_says_where() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let err = RedbStore::open(&file.join("sub")).unwrap_err();
    assert!(
        err.to_string().starts_with(&format!(
            "cannot open the data directory {}",
            file.join("sub").display()
        )),
        "{err}"
    );
}
