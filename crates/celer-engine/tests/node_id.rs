//! The storage node a disk belongs to, recorded in its superblock: absent
//! after format, written durably (also while the engine runs), kept across
//! reopen and rebuild, never silently replaced, and still readable when one
//! superblock copy is torn.

mod common;

use std::os::unix::fs::FileExt;

use celer_engine::{AlignedBuf, Engine, EngineError, OpenOptions};
use common::*;

fn filled(seed: u64, blocks: usize) -> AlignedBuf {
    let mut b = AlignedBuf::new(blocks);
    for i in 0..blocks {
        pattern(seed, i as u64, &mut b[i * BS..(i + 1) * BS]);
    }
    b
}

fn raw_block(path: &std::path::Path, block: u64) -> Vec<u8> {
    let f = std::fs::File::open(path).expect("raw open");
    let mut b = vec![0u8; BS];
    f.read_exact_at(&mut b, block * BS as u64)
        .expect("raw read");
    b
}

fn put_raw_block(path: &std::path::Path, block: u64, b: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("raw open");
    f.write_all_at(b, block * BS as u64).expect("raw write");
    f.sync_all().expect("sync");
}

#[test]
fn a_new_disk_has_no_node_and_keeps_the_one_recorded_while_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = temp_disk(dir.path(), "disk");
    Engine::format(&path, &small_format(2, 8 << 20)).expect("format");
    assert_eq!(Engine::node_id_of(&path).expect("read"), None);

    let mut engine = Engine::open(&path, &OpenOptions::default()).expect("open");
    assert_eq!(engine.node_id(), None);
    let shard = engine.shard_for(1, 0) as usize;
    let mut data = filled(5, 4);
    write(&mut engine.shards_mut()[shard], 1, 0, &mut data, 1).expect("write");
    // Recorded while the shards run, as a node does after registering.
    Engine::record_node_id(&path, 42).expect("record");
    assert_eq!(Engine::node_id_of(&path).expect("read"), Some(42));
    write(
        &mut engine.shards_mut()[shard],
        1,
        4 * BS as u64,
        &mut data,
        2,
    )
    .expect("write");
    engine.close().expect("close");

    let mut engine = Engine::open(&path, &OpenOptions::default()).expect("reopen");
    assert_eq!(engine.node_id(), Some(42));
    let got = read(&mut engine.shards_mut()[shard], 1, 0, 4).expect("read");
    assert!(
        got[..] == data[..],
        "data written before the id was recorded"
    );
    engine.close().expect("close");

    // Recording the same id again writes nothing and succeeds; another id
    // is refused with a message naming both and the way out.
    let before = raw_block(&path, 0);
    Engine::record_node_id(&path, 42).expect("same id again");
    assert_eq!(raw_block(&path, 0), before);
    let e = Engine::record_node_id(&path, 43).expect_err("another node");
    assert!(
        matches!(
            e,
            EngineError::DiskOfAnotherNode {
                recorded: 42,
                requested: 43,
                ..
            }
        ),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("node 42") && msg.contains("node 43") && msg.contains("format"),
        "{msg}"
    );
    assert_eq!(Engine::node_id_of(&path).expect("read"), Some(42));

    // A rebuild keeps it; a format forgets it (a new disk identity).
    Engine::rebuild(&path).expect("rebuild");
    assert_eq!(Engine::node_id_of(&path).expect("read"), Some(42));
    Engine::format(&path, &small_format(2, 8 << 20)).expect("format again");
    assert_eq!(Engine::node_id_of(&path).expect("read"), None);
}

/// Copy 0 is written and synced before copy 1: whichever of the two a
/// crash tears, the disk opens, with the old or the new id.
#[test]
fn a_torn_superblock_copy_leaves_the_old_or_the_new_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = temp_disk(dir.path(), "disk");
    Engine::format(&path, &small_format(1, 8 << 20)).expect("format");
    let old = raw_block(&path, 0);
    Engine::record_node_id(&path, 7).expect("record");
    let new = raw_block(&path, 0);
    assert_eq!(raw_block(&path, 1), new, "both copies carry the id");

    // Crash after copy 0: new copy 0, old copy 1.
    put_raw_block(&path, 1, &old);
    assert_eq!(Engine::node_id_of(&path).expect("read"), Some(7));
    // Copy 0 torn (half new, half garbage), copy 1 still old.
    let mut torn = new.clone();
    torn[BS / 2..].fill(0xA5);
    put_raw_block(&path, 0, &torn);
    assert_eq!(Engine::node_id_of(&path).expect("read"), None);
    let engine = Engine::open(&path, &OpenOptions::default()).expect("open");
    assert_eq!(engine.node_id(), None);
    engine.close().expect("close");
    // Recording again repairs both copies.
    Engine::record_node_id(&path, 7).expect("record again");
    assert_eq!(raw_block(&path, 0), new);
    assert_eq!(raw_block(&path, 1), new);
}
