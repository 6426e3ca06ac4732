use super::journal::JOURNAL_SEALED_LEN;
use super::superblock::{SB_CRC, SB_NODE_ID};
use super::*;

#[test]
fn map_round_trips_and_rejects_damage() {
    let entries: Vec<BlockEntry> = (0..256u32)
        .map(|i| match i % 3 {
            0 => BlockEntry::UNWRITTEN,
            1 => BlockEntry {
                phys: i as u16 + 7,
                kind: BlockKind::Data,
                crc: i.wrapping_mul(0x9E37_79B9),
                version: u64::MAX - i as u64,
            },
            _ => BlockEntry::zeroed(i as u64 * 1000),
        })
        .collect();
    let mut b = vec![0u8; BLOCK_SIZE];
    let h = MapHeader {
        generation: 5,
        journal_seq: 77,
        volume: 9,
        chunk: 11,
    };
    encode_map(42, 3, &h, &entries, &mut b);
    let mut out = vec![BlockEntry::UNWRITTEN; 256];
    let got = decode_map(42, 3, 256, &b, &mut out).expect("valid map");
    assert_eq!(
        (got.generation, got.journal_seq, got.volume, got.chunk),
        (5, 77, 9, 11)
    );
    assert_eq!(out, entries);
    assert!(
        decode_map(43, 3, 256, &b, &mut out).is_none(),
        "foreign disk uuid accepted"
    );
    assert!(
        decode_map(42, 4, 256, &b, &mut out).is_none(),
        "other slot accepted"
    );
    b[100] ^= 1;
    assert!(
        decode_map(42, 3, 256, &b, &mut out).is_none(),
        "damaged map accepted"
    );
}

#[test]
fn records_and_headers_round_trip() {
    let owner = SlotOwner {
        volume: 1,
        chunk: u64::MAX,
        epoch: 3,
    };
    for r in [
        Record::Write {
            slot: 9,
            logical: 255,
            phys: 300,
            crc: 0xdead_beef,
            version: 1 << 60,
            in_journal: false,
        },
        Record::Write {
            slot: 9,
            logical: 3,
            phys: 4,
            crc: 1,
            version: 2,
            in_journal: true,
        },
        Record::Zero {
            slot: 1,
            logical: 0,
            version: 5,
        },
        Record::Alloc { slot: 7, owner },
        Record::Free {
            slot: u32::MAX,
            version: 0,
        },
        Record::Free {
            slot: 3,
            version: 1 << 62,
        },
        Record::Floor { version: 77 },
        Record::Forget {
            slot: 9,
            first: 3,
            count: 253,
        },
    ] {
        let mut b = [0u8; RECORD_BYTES];
        encode_record(&r, &mut b);
        assert_eq!(decode_record(&b), Some(r));
    }
    let mut b = vec![0u8; BLOCK_SIZE];
    encode_slot_header(42, 8, 99, Some(owner), &mut b);
    assert_eq!(decode_slot_header(42, 8, &b), Some((99, Some(owner))));
    encode_slot_header(42, 8, 100, None, &mut b);
    assert_eq!(decode_slot_header(42, 8, &b), Some((100, None)));
    assert_eq!(decode_slot_header(42, 9, &b), None);
}

fn geometry() -> Geometry {
    Geometry::for_disk(0x1234_5678_9abc_def0, 64 << 20, 256, 64, 2, 16).expect("geometry")
}

#[test]
fn format_1_disks_keep_their_journal_layout() {
    let mut g = geometry();
    let mut b = vec![0u8; BLOCK_SIZE];
    for (journal_data, compact_journal, version) in
        [(true, true, 3), (true, false, 2), (false, false, 1)]
    {
        g.journal_data = journal_data;
        g.compact_journal = compact_journal;
        let sb = Superblock {
            geometry: g,
            node_id: Some(3),
        };
        encode_superblock(&sb, &mut b);
        assert_eq!(get_u32(&b, 8), version);
        match decode_superblock(&b) {
            SuperblockState::Valid(got) => assert_eq!(got, sb),
            _ => panic!("superblock of format {version} not read back"),
        }
    }
    // Format 1: sequence numbers fill the ring; format 2: every other
    // block, the data block after each.
    g.journal_data = false;
    assert_eq!((g.journal_seqs(), g.journal_position(17)), (16, 1));
    g.journal_data = true;
    assert_eq!((g.journal_seqs(), g.journal_position(17)), (8, 2));
    assert_eq!(g.journal_position(7), 14);
    put_u32(&mut b, 8, 4);
    seal(&mut b, SB_CRC);
    assert!(matches!(
        decode_superblock(&b),
        SuperblockState::WrongVersion(4)
    ));
    assert!(Geometry::for_disk(1, 64 << 20, 256, 64, 2, 17).is_err());
}

/// A compact block (format 3) is sealed over its first 512 bytes: the
/// data after them may be anything; its header and records may not.
/// Formats before 3 take none.
#[test]
fn compact_journal_blocks_are_sealed_over_their_records_only() {
    let mut b = vec![0u8; 2 * BLOCK_SIZE];
    for (i, x) in b.iter_mut().enumerate() {
        *x = (i * 7 + 3) as u8;
    }
    let rec = Record::Write {
        slot: 1,
        logical: 2,
        phys: 3,
        crc: 4,
        version: 5,
        in_journal: true,
    };
    for r in 0..2 {
        let at = JOURNAL_HEADER_BYTES + r * RECORD_BYTES;
        encode_record(&rec, &mut b[at..at + RECORD_BYTES]);
    }
    let data: Vec<u8> = b[JOURNAL_COMPACT_BYTES..JOURNAL_COMPACT_BYTES + 64].to_vec();
    seal_journal_block(9, 1, 77, 70, 2, true, &mut b);
    // The data after the records' bytes is left as it was.
    assert_eq!(
        &b[JOURNAL_COMPACT_BYTES..JOURNAL_COMPACT_BYTES + 64],
        &data[..]
    );
    let h = decode_journal_block(9, 1, true, &b).expect("a valid compact block");
    assert_eq!(
        (h.seq, h.acked_through, h.count, h.compact),
        (77, 70, 2, true)
    );
    assert!(
        decode_journal_block(9, 1, false, &b).is_none(),
        "format 2 takes none"
    );
    b[1000] ^= 1;
    assert!(
        decode_journal_block(9, 1, true, &b).is_some(),
        "data is not sealed"
    );
    b[JOURNAL_COMPACT_BYTES - 1] ^= 1;
    assert!(decode_journal_block(9, 1, true, &b).is_none());
    b[JOURNAL_COMPACT_BYTES - 1] ^= 1;
    put_u32(&mut b, JOURNAL_SEALED_LEN, 1024);
    assert!(
        decode_journal_block(9, 1, true, &b).is_none(),
        "unknown sealed length"
    );
    // A whole block decodes under every format, and is not compact.
    seal_journal_block(9, 1, 78, 70, 2, false, &mut b);
    for allowed in [true, false] {
        let h = decode_journal_block(9, 1, allowed, &b).expect("a whole block");
        assert_eq!((h.seq, h.compact), (78, false));
    }
}

#[test]
fn superblock_node_id_round_trips() {
    let g = geometry();
    let mut b = vec![0u8; BLOCK_SIZE];
    for node_id in [None, Some(0), Some(7), Some(u64::MAX)] {
        encode_superblock(
            &Superblock {
                geometry: g,
                node_id,
            },
            &mut b,
        );
        match decode_superblock(&b) {
            SuperblockState::Valid(sb) => assert_eq!(
                sb,
                Superblock {
                    geometry: g,
                    node_id
                }
            ),
            _ => panic!("superblock with node id {node_id:?} does not decode"),
        }
    }
    b[SB_NODE_ID] ^= 1;
    assert!(matches!(decode_superblock(&b), SuperblockState::Corrupt));
}

/// A superblock as the encoder wrote it before the node id existed:
/// the 48 bytes of geometry, zeroes after, sealed. It still decodes,
/// with no node id; and a superblock without a node id is exactly that.
#[test]
fn superblock_from_before_the_node_id_reads_as_none() {
    // A format 1 disk (one block per journal sequence number).
    let g = Geometry {
        journal_data: false,
        compact_journal: false,
        ..geometry()
    };
    let mut old = vec![0u8; BLOCK_SIZE];
    old[0..8].copy_from_slice(SUPERBLOCK_MAGIC);
    put_u32(&mut old, 8, 1);
    put_u64(&mut old, 16, g.disk_uuid);
    put_u32(&mut old, 24, g.chunk_blocks);
    put_u32(&mut old, 28, g.spare_blocks);
    put_u32(&mut old, 32, g.shard_count);
    put_u32(&mut old, 36, g.journal_blocks);
    put_u64(&mut old, 40, g.slot_count);
    seal(&mut old, SB_CRC);
    match decode_superblock(&old) {
        SuperblockState::Valid(sb) => {
            assert_eq!(
                sb,
                Superblock {
                    geometry: g,
                    node_id: None
                }
            )
        }
        _ => panic!("an old superblock does not decode"),
    }
    let mut new = vec![0u8; BLOCK_SIZE];
    encode_superblock(
        &Superblock {
            geometry: g,
            node_id: None,
        },
        &mut new,
    );
    assert_eq!(new, old, "no node id must encode as the old format did");
}
