//! The payloads of answers that are more than raw data, each with one
//! encoder (the node that answers) and one decoder (the node or client that
//! asked):
//!
//! - a chunk list, the answer to `ListChunks`: per chunk its volume (or
//!   engine key, to a node) and chunk index, u64 LE each
//!   ([`CHUNK_ENTRY_BYTES`]): [`encode_chunk_list`], [`decode_chunk_list`];
//! - what a down member missed, the answer to `ListChunks` with
//!   [`FLAG_CATCH_UP`](crate::FLAG_CATCH_UP): blocks per chunk (u64 LE),
//!   [`CATCH_UP_NOT_RECORDED`] when the source did not record every write;
//!   then per chunk its volume and chunk index (u64 LE each) and a bitmap,
//!   one bit per block in u64 LE words: [`encode_catch_up_answer`],
//!   [`CatchUpAnswer::parse`];
//! - a block-state table and data, the answer to `BackfillRead`: per block
//!   its version (u64 LE) and kind (u8, [`BlockKind`]), [`STATE_BYTES`]
//!   each, zero-padded to whole blocks ([`state_table_bytes`]), then the
//!   data: [`encode_state_table`], [`BackfillAnswer::parse`];
//! - the states-only answer, to `BackfillRead` with
//!   [`FLAG_STATES_ONLY`](crate::FLAG_STATES_ONLY): per block its version
//!   (u64 LE), kind (u8) and the data's crc32c (u32 LE, 0 unless data),
//!   [`STATE_CRC_BYTES`] each: [`encode_state_crc_table`],
//!   [`StateCrcTable::parse`];
//! - the answer to `Fill`: how many blocks the node copied into the head
//!   layer (u32 LE, [`FILL_ANSWER_BYTES`]): [`encode_fill_answer`],
//!   [`decode_fill_answer`].
//!
//! Encoders write into the caller's buffer (the 4-byte Fill answer is
//! returned as an array). Decoders read bytes from the
//! network: a payload that is short, too long or not made of whole entries
//! is a [`PayloadError`], never a panic; an unknown block kind reads as
//! [`BlockKind::Unwritten`] (a block the sender does not hold: nothing is
//! copied from it).

use crate::{get_u32, get_u64, put_u32, put_u64, BLOCK_BYTES};

/// Bytes per block in a `BackfillRead` state table: version (8), kind (1).
pub const STATE_BYTES: usize = 9;
/// Bytes per block in the answer to a `BackfillRead` with
/// [`FLAG_STATES_ONLY`](crate::FLAG_STATES_ONLY): version (8), kind (1),
/// crc32c (4).
pub const STATE_CRC_BYTES: usize = 13;
/// Bytes per chunk in a `ListChunks` answer: volume (8), chunk index (8).
pub const CHUNK_ENTRY_BYTES: usize = 16;
/// The blocks-per-chunk field of a catch-up answer when the source did not
/// record every write the member missed (it copies the partition whole).
pub const CATCH_UP_NOT_RECORDED: u64 = 0;

/// Bytes of a `Fill` answer: the blocks copied, u32 LE.
pub const FILL_ANSWER_BYTES: usize = 4;

/// Bytes of a block, as the state tables' padding counts them.
const BLOCK: usize = BLOCK_BYTES as usize;

/// What a payload's bytes do not match.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("{payload} of {bytes} bytes, expected {expected}")]
    Length {
        payload: &'static str,
        bytes: usize,
        expected: usize,
    },
    #[error("{payload} of {bytes} bytes, not whole {entry_bytes}-byte entries")]
    Entries {
        payload: &'static str,
        bytes: usize,
        entry_bytes: usize,
    },
    #[error("{payload} for {bytes} bytes of data, not whole {BLOCK_BYTES}-byte blocks")]
    NotBlocks { payload: &'static str, bytes: usize },
    #[error("catch-up answer for {0} blocks per chunk: no bitmap is that large")]
    BlocksPerChunk(u64),
}

/// A block's kind as state tables carry it (one byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockKind {
    /// Never written: reads as zeroes, version 0.
    Unwritten = 0,
    Data = 1,
    /// Zeroed or discarded at its version.
    Zero = 2,
}

impl BlockKind {
    /// The kind byte `b` names; an unknown one reads as unwritten.
    pub fn from_byte(b: u8) -> BlockKind {
        match b {
            1 => BlockKind::Data,
            2 => BlockKind::Zero,
            _ => BlockKind::Unwritten,
        }
    }
}

// ---- ListChunks: chunk lists ----

/// Appends a `ListChunks` answer's entries, (volume, chunk index) each, to
/// `out`.
pub fn encode_chunk_list(chunks: impl IntoIterator<Item = (u64, u64)>, out: &mut Vec<u8>) {
    for (volume, chunk) in chunks {
        out.extend_from_slice(&volume.to_le_bytes());
        out.extend_from_slice(&chunk.to_le_bytes());
    }
}

/// The (volume, chunk index) entries of a `ListChunks` answer; an error if
/// it is not whole entries.
pub fn decode_chunk_list(
    payload: &[u8],
) -> Result<impl ExactSizeIterator<Item = (u64, u64)> + '_, PayloadError> {
    if !payload.len().is_multiple_of(CHUNK_ENTRY_BYTES) {
        return Err(PayloadError::Entries {
            payload: "chunk list",
            bytes: payload.len(),
            entry_bytes: CHUNK_ENTRY_BYTES,
        });
    }
    Ok(payload
        .chunks_exact(CHUNK_ENTRY_BYTES)
        .map(|e| (get_u64(e, 0), get_u64(e, 8))))
}

// ---- ListChunks with FLAG_CATCH_UP: what a down member missed ----

/// Words (u64) of one chunk's bitmap in a catch-up answer.
pub fn catch_up_bitmap_words(blocks_per_chunk: u64) -> usize {
    blocks_per_chunk.div_ceil(64) as usize
}

/// Bytes of a catch-up answer listing `chunks` chunks.
pub fn catch_up_answer_bytes(blocks_per_chunk: u64, chunks: usize) -> usize {
    8 + chunks * (16 + catch_up_bitmap_words(blocks_per_chunk) * 8)
}

/// The whole catch-up answer of a source that did not record every write
/// the member missed.
pub const CATCH_UP_NOT_RECORDED_ANSWER: [u8; 8] = CATCH_UP_NOT_RECORDED.to_le_bytes();

/// Appends a catch-up answer to `out`: `blocks_per_chunk`, then per chunk
/// (volume, chunk index, bitmap). Each bitmap has
/// [`catch_up_bitmap_words`]`(blocks_per_chunk)` words, bit `b % 64` of
/// word `b / 64` set when block `b` was written.
pub fn encode_catch_up_answer<'a>(
    blocks_per_chunk: u64,
    chunks: impl IntoIterator<Item = (u64, u64, &'a [u64])>,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(&blocks_per_chunk.to_le_bytes());
    for (volume, chunk, bitmap) in chunks {
        debug_assert_eq!(bitmap.len(), catch_up_bitmap_words(blocks_per_chunk));
        out.extend_from_slice(&volume.to_le_bytes());
        out.extend_from_slice(&chunk.to_le_bytes());
        for w in bitmap {
            out.extend_from_slice(&w.to_le_bytes());
        }
    }
}

/// A received catch-up answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CatchUpAnswer<'a> {
    /// The source did not record every write the member missed.
    NotRecorded,
    Recorded(CatchUpChunks<'a>),
}

/// The chunks of a recorded catch-up answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CatchUpChunks<'a> {
    blocks_per_chunk: u64,
    entry_bytes: usize,
    entries: &'a [u8],
}

/// One chunk of a catch-up answer: the blocks written while the member was
/// down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CatchUpChunk<'a> {
    pub volume: u64,
    pub chunk: u64,
    bitmap: &'a [u8],
}

impl<'a> CatchUpAnswer<'a> {
    /// Checks a catch-up answer: a header, and whole entries of the size
    /// its blocks per chunk make.
    pub fn parse(payload: &'a [u8]) -> Result<CatchUpAnswer<'a>, PayloadError> {
        if payload.len() < 8 {
            return Err(PayloadError::Length {
                payload: "catch-up answer",
                bytes: payload.len(),
                expected: 8,
            });
        }
        let blocks_per_chunk = get_u64(payload, 0);
        let entries = &payload[8..];
        if blocks_per_chunk == CATCH_UP_NOT_RECORDED {
            if !entries.is_empty() {
                return Err(PayloadError::Length {
                    payload: "catch-up answer \"not recorded\"",
                    bytes: payload.len(),
                    expected: 8,
                });
            }
            return Ok(CatchUpAnswer::NotRecorded);
        }
        let entry_bytes = usize::try_from(blocks_per_chunk.div_ceil(64))
            .ok()
            .and_then(|words| words.checked_mul(8))
            .and_then(|b| b.checked_add(16))
            .ok_or(PayloadError::BlocksPerChunk(blocks_per_chunk))?;
        if !entries.len().is_multiple_of(entry_bytes) {
            return Err(PayloadError::Entries {
                payload: "catch-up answer",
                bytes: payload.len(),
                entry_bytes,
            });
        }
        Ok(CatchUpAnswer::Recorded(CatchUpChunks {
            blocks_per_chunk,
            entry_bytes,
            entries,
        }))
    }
}

impl<'a> CatchUpChunks<'a> {
    /// Blocks per chunk, as the source counts them.
    pub fn blocks_per_chunk(&self) -> u64 {
        self.blocks_per_chunk
    }

    /// Chunks listed.
    pub fn len(&self) -> usize {
        self.entries.len() / self.entry_bytes
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = CatchUpChunk<'a>> + 'a {
        self.entries
            .chunks_exact(self.entry_bytes)
            .map(|e| CatchUpChunk {
                volume: get_u64(e, 0),
                chunk: get_u64(e, 8),
                bitmap: &e[16..],
            })
    }
}

impl CatchUpChunk<'_> {
    /// Whether block `block` of the chunk was written (false past the
    /// bitmap's end).
    pub fn written(&self, block: usize) -> bool {
        let at = block / 64 * 8;
        self.bitmap
            .get(at..at + 8)
            .is_some_and(|w| get_u64(w, 0) >> (block % 64) & 1 == 1)
    }
}

// ---- BackfillRead: block-state table and data ----

/// Bytes of the state table that starts a `BackfillRead` answer for
/// `blocks` blocks: [`STATE_BYTES`] each, padded to whole blocks (the data
/// after it stays block-aligned).
pub fn state_table_bytes(blocks: usize) -> usize {
    (blocks * STATE_BYTES).next_multiple_of(BLOCK)
}

/// Writes a block-state table into `out` (the table's place in the
/// answer, [`state_table_bytes`] long): per block its version and kind,
/// then zeroes to the end of `out`.
///
/// # Panics
///
/// If `out` has no room for every state (the caller sized it wrongly).
pub fn encode_state_table(states: impl IntoIterator<Item = (BlockKind, u64)>, out: &mut [u8]) {
    let mut written = 0;
    for (kind, version) in states {
        let e = &mut out[written..written + STATE_BYTES];
        put_u64(e, 0, version);
        e[8] = kind as u8;
        written += STATE_BYTES;
    }
    out[written..].fill(0);
}

/// A received `BackfillRead` answer (without `FLAG_STATES_ONLY`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackfillAnswer<'a> {
    pub states: StateTable<'a>,
    /// The blocks' data, `data_bytes` long.
    pub data: &'a [u8],
}

impl<'a> BackfillAnswer<'a> {
    /// Splits the answer to a `BackfillRead` of `data_bytes` bytes into its
    /// state table and data; an error unless `data_bytes` is whole blocks
    /// and the payload exactly the padded table and the data.
    pub fn parse(payload: &'a [u8], data_bytes: usize) -> Result<BackfillAnswer<'a>, PayloadError> {
        if !data_bytes.is_multiple_of(BLOCK) {
            return Err(PayloadError::NotBlocks {
                payload: "BackfillRead answer",
                bytes: data_bytes,
            });
        }
        let blocks = data_bytes / BLOCK;
        let table_bytes = state_table_bytes(blocks);
        if payload.len().checked_sub(table_bytes) != Some(data_bytes) {
            return Err(PayloadError::Length {
                payload: "BackfillRead answer",
                bytes: payload.len(),
                expected: table_bytes.saturating_add(data_bytes),
            });
        }
        Ok(BackfillAnswer {
            states: StateTable {
                table: &payload[..blocks * STATE_BYTES],
            },
            data: &payload[table_bytes..],
        })
    }
}

/// The block states of a `BackfillRead` answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateTable<'a> {
    /// [`STATE_BYTES`] per block, without the padding.
    table: &'a [u8],
}

impl<'a> StateTable<'a> {
    /// Blocks in the table.
    pub fn blocks(&self) -> usize {
        self.table.len() / STATE_BYTES
    }

    /// Block `i`'s kind and version (`None` past the table's end).
    pub fn get(&self, i: usize) -> Option<(BlockKind, u64)> {
        let at = i.checked_mul(STATE_BYTES)?;
        let e = self.table.get(at..at.checked_add(STATE_BYTES)?)?;
        Some(state_of(e))
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = (BlockKind, u64)> + 'a {
        self.table.chunks_exact(STATE_BYTES).map(state_of)
    }
}

/// A state entry's kind and version (`e` holds at least [`STATE_BYTES`]).
fn state_of(e: &[u8]) -> (BlockKind, u64) {
    (BlockKind::from_byte(e[8]), get_u64(e, 0))
}

// ---- BackfillRead with FLAG_STATES_ONLY: states and crcs ----

/// Writes the states-only answer into `out` ([`STATE_CRC_BYTES`] per
/// block): per block its version, kind and crc32c, then zeroes to the end
/// of `out`.
///
/// # Panics
///
/// If `out` has no room for every state (the caller sized it wrongly).
pub fn encode_state_crc_table(
    states: impl IntoIterator<Item = (BlockKind, u64, u32)>,
    out: &mut [u8],
) {
    let mut written = 0;
    for (kind, version, crc) in states {
        let e = &mut out[written..written + STATE_CRC_BYTES];
        put_u64(e, 0, version);
        e[8] = kind as u8;
        put_u32(e, 9, crc);
        written += STATE_CRC_BYTES;
    }
    out[written..].fill(0);
}

/// A received states-only answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateCrcTable<'a> {
    table: &'a [u8],
}

impl<'a> StateCrcTable<'a> {
    /// The states-only answer for `blocks` blocks; an error unless it is
    /// exactly that long.
    pub fn parse(payload: &'a [u8], blocks: usize) -> Result<StateCrcTable<'a>, PayloadError> {
        let expected = blocks.saturating_mul(STATE_CRC_BYTES);
        if payload.len() != expected {
            return Err(PayloadError::Length {
                payload: "states-only answer",
                bytes: payload.len(),
                expected,
            });
        }
        Ok(StateCrcTable { table: payload })
    }

    /// Blocks in the table.
    pub fn blocks(&self) -> usize {
        self.table.len() / STATE_CRC_BYTES
    }

    /// Block `i`'s kind, version and crc (`None` past the table's end).
    pub fn get(&self, i: usize) -> Option<(BlockKind, u64, u32)> {
        let at = i.checked_mul(STATE_CRC_BYTES)?;
        let e = self.table.get(at..at.checked_add(STATE_CRC_BYTES)?)?;
        Some(state_crc_of(e))
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = (BlockKind, u64, u32)> + 'a {
        self.table.chunks_exact(STATE_CRC_BYTES).map(state_crc_of)
    }
}

/// A states-only entry's kind, version and crc (`e` holds at least
/// [`STATE_CRC_BYTES`]).
fn state_crc_of(e: &[u8]) -> (BlockKind, u64, u32) {
    (BlockKind::from_byte(e[8]), get_u64(e, 0), get_u32(e, 9))
}

/// The answer to `Fill`: `copied` blocks were copied into the head layer.
pub fn encode_fill_answer(copied: u32) -> [u8; FILL_ANSWER_BYTES] {
    copied.to_le_bytes()
}

/// Reads a `Fill` answer: exactly [`FILL_ANSWER_BYTES`].
pub fn decode_fill_answer(payload: &[u8]) -> Result<u32, PayloadError> {
    <[u8; FILL_ANSWER_BYTES]>::try_from(payload)
        .map(u32::from_le_bytes)
        .map_err(|_| PayloadError::Length {
            payload: "Fill answer",
            bytes: payload.len(),
            expected: FILL_ANSWER_BYTES,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fill_answer_is_four_bytes_and_nothing_else() {
        assert_eq!(decode_fill_answer(&encode_fill_answer(0)), Ok(0));
        assert_eq!(
            decode_fill_answer(&encode_fill_answer(u32::MAX)),
            Ok(u32::MAX)
        );
        for bad in [&[][..], &[1, 2, 3][..], &[1, 2, 3, 4, 5][..]] {
            assert_eq!(
                decode_fill_answer(bad),
                Err(PayloadError::Length {
                    payload: "Fill answer",
                    bytes: bad.len(),
                    expected: FILL_ANSWER_BYTES,
                })
            );
        }
    }
    use proptest::prelude::*;

    fn kind() -> impl Strategy<Value = BlockKind> {
        prop_oneof![
            Just(BlockKind::Unwritten),
            Just(BlockKind::Data),
            Just(BlockKind::Zero)
        ]
    }

    // ---- the bytes, as the node wrote them before the codecs moved here ----

    #[test]
    fn chunk_list_bytes() {
        let mut out = Vec::new();
        encode_chunk_list([(1, 2), (0x0102_0304_0506_0708, u64::MAX)], &mut out);
        let mut want = Vec::new();
        for x in [1u64, 2, 0x0102_0304_0506_0708, u64::MAX] {
            want.extend_from_slice(&x.to_le_bytes());
        }
        assert_eq!(out, want);
    }

    #[test]
    fn catch_up_answer_bytes_and_not_recorded() {
        let bitmap = [0b1011u64, 1 << 63, 0, 7];
        let mut out = Vec::new();
        encode_catch_up_answer(256, [(7, 3, &bitmap[..])], &mut out);
        let mut want = Vec::new();
        for x in [256u64, 7, 3, 0b1011, 1 << 63, 0, 7] {
            want.extend_from_slice(&x.to_le_bytes());
        }
        assert_eq!(out, want);
        assert_eq!(out.len(), catch_up_answer_bytes(256, 1));
        assert_eq!(CATCH_UP_NOT_RECORDED_ANSWER, 0u64.to_le_bytes());
        assert_eq!(
            CatchUpAnswer::parse(&CATCH_UP_NOT_RECORDED_ANSWER),
            Ok(CatchUpAnswer::NotRecorded)
        );
        let Ok(CatchUpAnswer::Recorded(chunks)) = CatchUpAnswer::parse(&out) else {
            panic!("recorded");
        };
        let c: Vec<_> = chunks.iter().collect();
        assert_eq!((c.len(), c[0].volume, c[0].chunk), (1, 7, 3));
        let written: Vec<usize> = (0..300).filter(|&b| c[0].written(b)).collect();
        assert_eq!(written, [0, 1, 3, 127, 192, 193, 194]);
    }

    #[test]
    fn state_table_bytes_and_padding() {
        assert_eq!(state_table_bytes(0), 0);
        assert_eq!(state_table_bytes(1), 4096);
        assert_eq!(state_table_bytes(256), 4096); // 2304 bytes of states
        assert_eq!(state_table_bytes(456), 8192);
        let mut out = [0xaau8; 4096];
        encode_state_table(
            [
                (BlockKind::Data, 0x0102_0304_0506_0708),
                (BlockKind::Zero, 9),
                (BlockKind::Unwritten, 0),
            ],
            &mut out,
        );
        let mut want = vec![8u8, 7, 6, 5, 4, 3, 2, 1, 1];
        want.extend_from_slice(&9u64.to_le_bytes());
        want.push(2);
        want.extend_from_slice(&[0; 9]);
        want.resize(4096, 0);
        assert_eq!(&out[..], &want[..]);
    }

    #[test]
    fn state_crc_table_bytes() {
        let mut out = [0xaau8; 26];
        encode_state_crc_table(
            [
                (BlockKind::Data, 0x0102_0304_0506_0708, 0xdead_beef),
                (BlockKind::Zero, 5, 0),
            ],
            &mut out,
        );
        let mut want = vec![8u8, 7, 6, 5, 4, 3, 2, 1, 1, 0xef, 0xbe, 0xad, 0xde];
        want.extend_from_slice(&5u64.to_le_bytes());
        want.extend_from_slice(&[2, 0, 0, 0, 0]);
        assert_eq!(&out[..], &want[..]);
    }

    #[test]
    #[should_panic]
    fn a_state_table_without_room_is_the_callers_bug() {
        encode_state_table([(BlockKind::Data, 1), (BlockKind::Data, 2)], &mut [0u8; 17]);
    }

    // ---- hostile input ----

    #[test]
    fn unknown_kinds_read_as_unwritten() {
        for b in 3..=255u8 {
            assert_eq!(BlockKind::from_byte(b), BlockKind::Unwritten);
            let mut p = vec![0u8; 4096 + 4096];
            p[..8].copy_from_slice(&7u64.to_le_bytes());
            p[8] = b;
            let a = BackfillAnswer::parse(&p, 4096).expect("well formed");
            assert_eq!(a.states.get(0), Some((BlockKind::Unwritten, 7)));
            let mut t = [0u8; STATE_CRC_BYTES];
            t[8] = b;
            let t = StateCrcTable::parse(&t, 1).expect("well formed");
            assert_eq!(t.get(0), Some((BlockKind::Unwritten, 0, 0)));
        }
    }

    #[test]
    fn short_and_odd_payloads_are_errors() {
        assert_eq!(decode_chunk_list(&[]).map(|l| l.count()), Ok(0));
        for n in (1..64).filter(|n| n % CHUNK_ENTRY_BYTES != 0) {
            assert!(decode_chunk_list(&vec![0; n]).is_err(), "{n} bytes");
        }
        // BackfillRead: the data is whole blocks, the table padded.
        let p = vec![0u8; 4096 * 3];
        assert!(BackfillAnswer::parse(&p, 4096 * 2).is_ok());
        for len in [0, 1, 4095, 4097, 4096 * 3 - 1] {
            assert!(BackfillAnswer::parse(&p[..len], 4096 * 2).is_err(), "{len}");
        }
        assert!(BackfillAnswer::parse(&p, 4096 * 3).is_err(), "no table");
        assert!(
            BackfillAnswer::parse(&p, 4096 * 2 + 512).is_err(),
            "not blocks"
        );
        assert!(BackfillAnswer::parse(&p, usize::MAX).is_err());
        assert!(BackfillAnswer::parse(&[], 0).is_ok_and(|a| a.states.blocks() == 0));
        // States only: exactly 13 bytes per block.
        assert!(StateCrcTable::parse(&[0; 26], 2).is_ok());
        assert!(StateCrcTable::parse(&[0; 25], 2).is_err());
        assert!(StateCrcTable::parse(&[0; 27], 2).is_err());
        assert!(StateCrcTable::parse(&[0; 26], usize::MAX).is_err());
        // Catch-up: a header, whole entries, a bitmap size that exists.
        let mut p = 64u64.to_le_bytes().to_vec();
        p.extend_from_slice(&[0; 24]);
        assert!(CatchUpAnswer::parse(&p).is_ok());
        for len in [0, 7, 9, 31] {
            assert!(CatchUpAnswer::parse(&p[..len]).is_err(), "{len}");
        }
        let mut p = 0u64.to_le_bytes().to_vec();
        p.push(0);
        assert!(CatchUpAnswer::parse(&p).is_err(), "not recorded, and more");
        let huge = u64::MAX.to_le_bytes();
        assert!(CatchUpAnswer::parse(&huge).is_ok_and(|a| match a {
            CatchUpAnswer::Recorded(c) => c.is_empty(),
            CatchUpAnswer::NotRecorded => false,
        }));
        let mut p = u64::MAX.to_le_bytes().to_vec();
        p.extend_from_slice(&[0; 40]);
        assert!(CatchUpAnswer::parse(&p).is_err());
    }

    #[test]
    fn lookups_past_the_end_are_none() {
        let p = vec![0u8; 4096 * 2];
        let a = BackfillAnswer::parse(&p, 4096).expect("one block");
        assert_eq!(a.states.blocks(), 1);
        assert!(a.states.get(1).is_none());
        assert!(a.states.get(usize::MAX / STATE_BYTES).is_none());
        let t = StateCrcTable::parse(&[0; 13], 1).expect("one block");
        assert!(t.get(1).is_none());
        let mut p = 1u64.to_le_bytes().to_vec();
        p.extend_from_slice(&[0xff; 24]);
        let Ok(CatchUpAnswer::Recorded(c)) = CatchUpAnswer::parse(&p) else {
            panic!("recorded");
        };
        let chunk = c.iter().next().expect("a chunk");
        assert!(chunk.written(63));
        assert!(!chunk.written(64));
        assert!(!chunk.written(usize::MAX));
    }

    proptest! {
        #[test]
        fn chunk_lists_round_trip(chunks in proptest::collection::vec(any::<(u64, u64)>(), 0..100)) {
            let mut out = Vec::new();
            encode_chunk_list(chunks.iter().copied(), &mut out);
            prop_assert_eq!(out.len(), chunks.len() * CHUNK_ENTRY_BYTES);
            let back: Vec<_> = decode_chunk_list(&out).expect("decodes").collect();
            prop_assert_eq!(back, chunks);
        }

        #[test]
        fn catch_up_answers_round_trip(
            blocks_per_chunk in 1u64..1100,
            chunks in proptest::collection::vec(
                (any::<u64>(), any::<u64>(), proptest::collection::vec(any::<u64>(), 18)),
                0..20,
            ),
        ) {
            let words = catch_up_bitmap_words(blocks_per_chunk);
            let chunks: Vec<(u64, u64, Vec<u64>)> = chunks
                .into_iter()
                .map(|(v, c, mut b)| { b.truncate(words); (v, c, b) })
                .collect();
            let mut out = Vec::new();
            encode_catch_up_answer(
                blocks_per_chunk,
                chunks.iter().map(|(v, c, b)| (*v, *c, &b[..])),
                &mut out,
            );
            prop_assert_eq!(out.len(), catch_up_answer_bytes(blocks_per_chunk, chunks.len()));
            let Ok(CatchUpAnswer::Recorded(back)) = CatchUpAnswer::parse(&out) else {
                return Err(TestCaseError::fail("not a recorded answer"));
            };
            prop_assert_eq!(back.blocks_per_chunk(), blocks_per_chunk);
            prop_assert_eq!(back.len(), chunks.len());
            for (got, (v, c, bits)) in back.iter().zip(&chunks) {
                prop_assert_eq!((got.volume, got.chunk), (*v, *c));
                for b in 0..words * 64 {
                    prop_assert_eq!(got.written(b), bits[b / 64] >> (b % 64) & 1 == 1);
                }
            }
        }

        #[test]
        fn backfill_answers_round_trip(
            states in proptest::collection::vec((kind(), any::<u64>()), 0..600),
            fill in any::<u8>(),
        ) {
            let blocks = states.len();
            let table_bytes = state_table_bytes(blocks);
            let mut payload = vec![fill; table_bytes + blocks * BLOCK];
            encode_state_table(states.iter().copied(), &mut payload[..table_bytes]);
            prop_assert!(payload[blocks * STATE_BYTES..table_bytes].iter().all(|&b| b == 0));
            let a = BackfillAnswer::parse(&payload, blocks * BLOCK).expect("parses");
            prop_assert_eq!(a.data.len(), blocks * BLOCK);
            prop_assert!(a.data.iter().all(|&b| b == fill));
            prop_assert_eq!(a.states.blocks(), blocks);
            let back: Vec<_> = a.states.iter().collect();
            prop_assert_eq!(&back, &states);
            for (i, s) in states.iter().enumerate() {
                prop_assert_eq!(a.states.get(i), Some(*s));
            }
        }

        #[test]
        fn state_crc_tables_round_trip(
            states in proptest::collection::vec((kind(), any::<u64>(), any::<u32>()), 0..300),
        ) {
            let mut out = vec![0xaa; states.len() * STATE_CRC_BYTES];
            encode_state_crc_table(states.iter().copied(), &mut out);
            let t = StateCrcTable::parse(&out, states.len()).expect("parses");
            let back: Vec<_> = t.iter().collect();
            prop_assert_eq!(&back, &states);
            for (i, s) in states.iter().enumerate() {
                prop_assert_eq!(t.get(i), Some(*s));
            }
        }

        /// Any bytes, any claimed size: an answer or an error, never a
        /// panic, and what parses is consistent.
        #[test]
        fn hostile_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..9000),
            data_bytes in prop_oneof![any::<usize>(), (0usize..3).prop_map(|b| b * BLOCK)],
            blocks in prop_oneof![any::<usize>(), 0usize..700],
            header in prop_oneof![any::<u64>(), 0u64..600],
        ) {
            if let Ok(l) = decode_chunk_list(&bytes) {
                prop_assert_eq!(l.count(), bytes.len() / CHUNK_ENTRY_BYTES);
            }
            if let Ok(a) = BackfillAnswer::parse(&bytes, data_bytes) {
                prop_assert_eq!(a.data.len(), data_bytes);
                prop_assert_eq!(a.states.iter().count(), data_bytes / BLOCK);
            }
            if let Ok(t) = StateCrcTable::parse(&bytes, blocks) {
                prop_assert_eq!(t.iter().count(), blocks);
                prop_assert!(t.get(blocks).is_none());
            }
            let mut p = header.to_le_bytes().to_vec();
            p.extend_from_slice(&bytes);
            for answer in [&bytes[..], &p[..]] {
                if let Ok(CatchUpAnswer::Recorded(c)) = CatchUpAnswer::parse(answer) {
                    for chunk in c.iter() {
                        let blocks = c.blocks_per_chunk().min(5000) as usize;
                        let _ = (0..blocks + 64).filter(|&b| chunk.written(b)).count();
                    }
                }
            }
        }
    }
}
