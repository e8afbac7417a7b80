//! Arbitrary bytes through the decoding and validation of every public request, and through
//! the write-log entry codec: an error or a value, never a panic. The number of cases is
//! bounded for `scripts/test` (`PROPTEST_CASES` raises it for a longer run, see the README).

use engram_domain::Limits;
use engram_domain::api::LoggedWrite;
use engram_domain::validate;
use engram_proto::prost::Message;
use engram_proto::v1 as pb;
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(512),
        ..ProptestConfig::default()
    }
}

/// Bytes that are mostly well-formed protobuf: a random message of tags and values, so the
/// decoder gets past the first byte and reaches validation.
fn wire() -> impl Strategy<Value = Vec<u8>> {
    let field = (
        1u32..16,
        0u8..3,
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(number, kind, payload)| {
            let mut out = Vec::new();
            match kind {
                0 => {
                    encode_varint(u64::from(number << 3), &mut out);
                    encode_varint(payload.iter().map(|b| u64::from(*b)).sum(), &mut out);
                }
                1 => {
                    encode_varint(u64::from(number << 3 | 2), &mut out);
                    encode_varint(payload.len() as u64, &mut out);
                    out.extend_from_slice(&payload);
                }
                _ => out.extend_from_slice(&payload),
            }
            out
        });
    proptest::collection::vec(field, 0..12).prop_map(|fields| fields.concat())
}

fn encode_varint(mut value: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Decode `bytes` as `M` and, if that works, validate it: either may refuse, neither may
/// panic.
fn through<M: Message + Default, T>(
    bytes: &[u8],
    validate: impl Fn(M, &Limits) -> engram_domain::Result<T>,
) {
    let limits = Limits::default();
    if let Ok(request) = M::decode(bytes) {
        let _ = validate(request, &limits);
    }
}

fn every_request(bytes: &[u8]) {
    through::<pb::RememberRequest, _>(bytes, validate::remember);
    through::<pb::RecallRequest, _>(bytes, validate::recall);
    through::<pb::GetRequest, _>(bytes, validate::get);
    through::<pb::ListRequest, _>(bytes, validate::list);
    through::<pb::UpdateRequest, _>(bytes, validate::update);
    through::<pb::ForgetRequest, _>(bytes, validate::forget);
    through::<pb::BuildContextRequest, _>(bytes, validate::build_context);
    through::<pb::ConverseRequest, _>(bytes, validate::converse);
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_never_panic_a_request(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        every_request(&bytes);
    }

    #[test]
    fn arbitrary_fields_never_panic_a_request(bytes in wire()) {
        every_request(&bytes);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_log_entry_codec(bytes in wire()) {
        let _ = LoggedWrite::decode(&bytes, &Limits::default());
    }
}
