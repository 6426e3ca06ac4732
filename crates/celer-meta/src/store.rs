//! [`MetaStore`]: where the control service keeps its metadata — a
//! key/value map of bytes plus an append-only change log — and its embedded
//! redb backend ([`RedbStore`], the default).
//!
//! Invariants: [`MetaStore::apply`] is atomic (every op and the log entry
//! land, or none); log sequence numbers are 1, 2, 3... without gaps, and an
//! append whose `seq` is not `last_seq() + 1` fails with
//! [`StoreError::Conflict`] without changing anything. That check is also
//! the fence between control processes sharing one store (etcd): a process
//! that lost the leadership cannot append behind the new leader's back.

use std::path::{Path, PathBuf};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("metadata store {path}: {reason}")]
    Redb { path: PathBuf, reason: String },
    #[error("etcd metadata store: {0}")]
    Etcd(String),
    #[error("change log conflict: wanted to append entry {want}, the store's last entry is {last}: another control process writes to this store")]
    Conflict { want: u64, last: u64 },
    #[error("corrupt metadata under key `{key}`: {reason}")]
    Corrupt { key: String, reason: String },
}

/// Key/value pairs, in key order.
pub type KeyValues = Vec<(Vec<u8>, Vec<u8>)>;

/// One change of an atomic batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put { key: Vec<u8>, value: Vec<u8> },
    Delete { key: Vec<u8> },
}

impl Op {
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Op {
        Op::Put {
            key: key.into(),
            value: value.into(),
        }
    }
    pub fn delete(key: impl Into<Vec<u8>>) -> Op {
        Op::Delete { key: key.into() }
    }
}

/// The control service's storage. Calls block (redb commits with fsync,
/// etcd waits for its quorum); the server calls them off the async threads.
pub trait MetaStore: Send + Sync + 'static {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Every key starting with `prefix`, in key order.
    fn scan_prefix(&self, prefix: &[u8]) -> Result<KeyValues, StoreError>;

    /// Applies `ops` in order, atomically, and appends the `log` entries
    /// (`(seq, entry)`, consecutive) to the change log in the same
    /// transaction, failing with [`StoreError::Conflict`] unless the first
    /// `seq` is `last_seq() + 1`.
    fn apply(&self, ops: &[Op], log: &[(u64, Vec<u8>)]) -> Result<(), StoreError>;

    /// The last change-log sequence number (0: empty log).
    fn last_seq(&self) -> Result<u64, StoreError>;

    /// Change-log entries with `seq > after`, oldest first, at most `limit`.
    fn log_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;

    fn put(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.apply(&[Op::put(key, value)], &[])
    }

    fn delete(&self, key: &[u8]) -> Result<(), StoreError> {
        self.apply(&[Op::delete(key)], &[])
    }
}

const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");

/// The default store: one redb file (`DIR/meta.redb`).
pub struct RedbStore {
    db: redb::Database,
    path: PathBuf,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish()
    }
}

impl RedbStore {
    /// The file name inside the data directory.
    pub const FILE_NAME: &'static str = "meta.redb";

    /// Opens (or creates) `dir/meta.redb`, creating `dir` if needed.
    pub fn open_dir(dir: &Path) -> Result<RedbStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Redb {
            path: dir.to_path_buf(),
            reason: format!("cannot create the data directory: {e}"),
        })?;
        RedbStore::open(&dir.join(Self::FILE_NAME))
    }

    /// Opens (or creates) the redb file at `path`.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let err = |e: &dyn std::fmt::Display| StoreError::Redb {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let db = redb::Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Redb {
                path: path.to_path_buf(),
                reason: "already open by another process: is another `celer meta serve` using this data directory?".into(),
            },
            e => err(&e),
        })?;
        RedbStore::with_tables(db, path)
    }

    /// A store in memory (redb's in-memory backend): the same code as on
    /// disk, nothing survives the process. For the simulator and tests.
    pub fn in_memory() -> Result<RedbStore, StoreError> {
        let path = Path::new("(memory)");
        let db = redb::Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(|e| StoreError::Redb {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        RedbStore::with_tables(db, path)
    }

    fn with_tables(db: redb::Database, path: &Path) -> Result<RedbStore, StoreError> {
        let err = |e: &dyn std::fmt::Display| StoreError::Redb {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        // Read transactions fail on tables that do not exist yet.
        let txn = db.begin_write().map_err(|e| err(&e))?;
        txn.open_table(KV).map_err(|e| err(&e))?;
        txn.open_table(LOG).map_err(|e| err(&e))?;
        txn.commit().map_err(|e| err(&e))?;
        Ok(RedbStore {
            db,
            path: path.to_path_buf(),
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Redb {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }
}

impl MetaStore for RedbStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(KV).map_err(|e| self.err(e))?;
        let v = t.get(key).map_err(|e| self.err(e))?;
        Ok(v.map(|g| g.value().to_vec()))
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<KeyValues, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(KV).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for item in t.range(prefix..).map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push((k.value().to_vec(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn apply(&self, ops: &[Op], log: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
        check_consecutive(log);
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            if let Some((first, _)) = log.first() {
                let mut l = txn.open_table(LOG).map_err(|e| self.err(e))?;
                let last = l
                    .last()
                    .map_err(|e| self.err(e))?
                    .map(|(k, _)| k.value())
                    .unwrap_or(0);
                if *first != last + 1 {
                    // Dropping the transaction aborts it.
                    return Err(StoreError::Conflict { want: *first, last });
                }
                for (seq, entry) in log {
                    l.insert(*seq, entry.as_slice()).map_err(|e| self.err(e))?;
                }
            }
            let mut t = txn.open_table(KV).map_err(|e| self.err(e))?;
            for op in ops {
                match op {
                    Op::Put { key, value } => {
                        t.insert(key.as_slice(), value.as_slice())
                            .map_err(|e| self.err(e))?;
                    }
                    Op::Delete { key } => {
                        t.remove(key.as_slice()).map_err(|e| self.err(e))?;
                    }
                }
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    fn last_seq(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let l = txn.open_table(LOG).map_err(|e| self.err(e))?;
        let last = l.last().map_err(|e| self.err(e))?;
        Ok(last.map(|(k, _)| k.value()).unwrap_or(0))
    }

    fn log_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let l = txn.open_table(LOG).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        let Some(from) = after.checked_add(1) else {
            return Ok(out);
        };
        for item in l.range(from..).map_err(|e| self.err(e))?.take(limit) {
            let (k, v) = item.map_err(|e| self.err(e))?;
            out.push((k.value(), v.value().to_vec()));
        }
        Ok(out)
    }
}

/// A caller's bug, not an operating error: the entries of one batch are
/// numbered one after the other.
pub(crate) fn check_consecutive(log: &[(u64, Vec<u8>)]) {
    for w in log.windows(2) {
        assert_eq!(w[1].0, w[0].0 + 1, "change-log batch is not consecutive");
    }
}

/// Contract tests any backend must pass.
#[cfg(test)]
pub(crate) fn check_store_contract(s: &dyn MetaStore) {
    assert_eq!(s.get(b"a").expect("get"), None);
    s.put(b"a/1", b"x").expect("put");
    s.put(b"a/2", b"y").expect("put");
    s.put(b"b/1", b"z").expect("put");
    assert_eq!(s.get(b"a/1").expect("get").as_deref(), Some(&b"x"[..]));
    let scan = s.scan_prefix(b"a/").expect("scan");
    assert_eq!(
        scan,
        vec![
            (b"a/1".to_vec(), b"x".to_vec()),
            (b"a/2".to_vec(), b"y".to_vec())
        ]
    );
    s.delete(b"a/1").expect("delete");
    assert_eq!(s.get(b"a/1").expect("get"), None);

    assert_eq!(s.last_seq().expect("seq"), 0);
    s.apply(
        &[Op::put("c", "1"), Op::delete("a/2")],
        &[(1, b"e1".to_vec())],
    )
    .expect("apply");
    assert_eq!(s.get(b"c").expect("get").as_deref(), Some(&b"1"[..]));
    assert_eq!(s.get(b"a/2").expect("get"), None);
    // A gap or a replay is refused and changes nothing.
    for bad in [1, 3] {
        let e = s
            .apply(&[Op::put("c", "2")], &[(bad, b"bad".to_vec())])
            .expect_err("conflict");
        assert!(matches!(e, StoreError::Conflict { last: 1, .. }), "{e}");
    }
    assert_eq!(s.get(b"c").expect("get").as_deref(), Some(&b"1"[..]));
    s.apply(&[], &[(2, b"e2".to_vec()), (3, b"e3".to_vec())])
        .expect("append");
    assert_eq!(s.last_seq().expect("seq"), 3);
    assert_eq!(
        s.log_after(0, 10).expect("log"),
        vec![
            (1, b"e1".to_vec()),
            (2, b"e2".to_vec()),
            (3, b"e3".to_vec())
        ]
    );
    assert_eq!(s.log_after(2, 10).expect("log"), vec![(3, b"e3".to_vec())]);
    assert_eq!(s.log_after(0, 1).expect("log").len(), 1);
    assert!(s.log_after(u64::MAX, 1).expect("log").is_empty());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redb_contract_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = RedbStore::open_dir(dir.path()).expect("open");
            check_store_contract(&s);
        }
        let s = RedbStore::open_dir(dir.path()).expect("reopen");
        assert_eq!(s.last_seq().expect("seq"), 3);
        assert_eq!(s.get(b"c").expect("get").as_deref(), Some(&b"1"[..]));
    }
}
