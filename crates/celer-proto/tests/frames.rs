//! Frames round-trip; any corruption, truncation, foreign or oversized frame
//! is caught.

use celer_proto::*;
use proptest::prelude::*;

fn op() -> impl Strategy<Value = Op> {
    prop::sample::select(vec![
        Op::Read,
        Op::Write,
        Op::WritePrimary,
        Op::WriteZeroes,
        Op::Discard,
        Op::Flush,
        Op::RouteTable,
        Op::Ping,
        Op::Hello,
        Op::ListChunks,
        Op::BackfillRead,
        Op::Challenge,
        Op::Renew,
        Op::Fill,
    ])
}

fn status() -> impl Strategy<Value = Status> {
    prop::sample::select(vec![
        Status::Ok,
        Status::StaleEpoch,
        Status::NotReplica,
        Status::NotInSync,
        Status::Checksum,
        Status::OutOfRange,
        Status::Invalid,
        Status::NoSpace,
        Status::Io,
        Status::ReadOnly,
        Status::RouteBehind,
        Status::Unavailable,
        Status::Busy,
        Status::Unauthorized,
        Status::Expired,
        Status::OlderVersion,
        Status::VersionAhead,
    ])
}

prop_compose! {
    fn header()(op in op(), status in status(), response in any::<bool>(), flags in any::<u16>(),
                id in any::<u32>(), length in any::<u32>(), epoch in any::<u64>(), volume in any::<u64>(), offset in any::<u64>(),
                version in any::<u64>(), attachment in any::<u32>(), fence in any::<u32>(), snapshot in any::<u64>(),
                payload in prop::collection::vec(any::<u8>(), 0..3000))
        -> (Header, Vec<u8>) {
        let mut h = Header::request(op, id);
        h.length = length;
        h.flags = flags;
        h.epoch = epoch;
        h.volume = volume;
        h.offset = offset;
        h.version = version;
        h.attachment = attachment;
        h.fence = fence;
        h.snapshot = snapshot;
        let h = if response { Header::response_to(&h, status) } else { h };
        // The payload goes in two pieces, as writev would send it.
        let split = payload.len() / 3;
        let h = h.with_payload([&payload[..split], &payload[split..]]);
        (h, payload)
    }
}

proptest! {
    #[test]
    fn round_trip((h, payload) in header()) {
        let bytes = h.encode();
        let got = decode_header(&bytes).expect("valid").expect("complete");
        prop_assert_eq!(got, h);
        prop_assert_eq!(got.payload_bytes as usize, payload.len());
        prop_assert!(got.verify_payload([&payload[..]]).is_ok());
    }

    #[test]
    fn any_flipped_header_bit_is_caught((h, _p) in header(), bit in 0usize..HEADER_BYTES * 8) {
        let mut bytes = h.encode();
        bytes[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(decode_header(&bytes).is_err(), "flipped bit {} accepted", bit);
    }

    #[test]
    fn any_flipped_payload_bit_is_caught((h, mut payload) in header(), bit in any::<usize>()) {
        prop_assume!(!payload.is_empty());
        let bit = bit % (payload.len() * 8);
        payload[bit / 8] ^= 1 << (bit % 8);
        prop_assert_eq!(h.verify_payload([&payload[..]]), Err(FrameError::PayloadChecksum));
    }

    #[test]
    fn truncated_header_asks_for_more((h, _p) in header(), cut in 0usize..HEADER_BYTES) {
        prop_assert_eq!(decode_header(&h.encode()[..cut]), Ok(None));
    }

    #[test]
    fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = decode_header(&bytes);
    }
}

#[test]
fn foreign_old_and_oversized_frames_are_refused() {
    let h = Header::request(Op::Write, 1);
    let mut b = h.encode();
    b[0..4].copy_from_slice(b"HTTP");
    assert!(matches!(decode_header(&b), Err(FrameError::BadMagic(_))));

    let mut b = h.encode();
    b[4] = 9; // version 9, crc not even checked first
    assert_eq!(decode_header(&b), Err(FrameError::Version { found: 9 }));

    // A protocol v2 peer's frame (64-byte header) is named as such from its
    // first 6 bytes: nobody waits for the rest of a longer v3 header.
    let mut v2 = [0u8; 64];
    v2[0..4].copy_from_slice(b"CLR1");
    v2[4..6].copy_from_slice(&2u16.to_le_bytes());
    assert_eq!(
        decode_header(&v2[..6]),
        Err(FrameError::Version { found: 2 })
    );
    assert_eq!(decode_header(&v2), Err(FrameError::Version { found: 2 }));
    assert!(matches!(
        decode_header(b"CLX"),
        Err(FrameError::BadMagic(_))
    ));

    // An oversized payload with a valid crc is refused before anyone
    // allocates or reads it.
    let mut big = h;
    big.payload_bytes = PAYLOAD_MAX_BYTES + 1;
    assert_eq!(
        decode_header(&big.encode()),
        Err(FrameError::PayloadTooLarge(PAYLOAD_MAX_BYTES + 1))
    );

    // Responses keep the request's id, epoch and address.
    let mut r = Header::request(Op::Read, 42);
    r.epoch = 7;
    r.volume = 3;
    r.offset = 4096;
    let resp = Header::response_to(&r, Status::StaleEpoch);
    let got = decode_header(&resp.encode())
        .expect("valid")
        .expect("complete");
    assert_eq!(
        (got.kind, got.request_id, got.epoch, got.status),
        (Kind::Response, 42, 7, Status::StaleEpoch)
    );
}
