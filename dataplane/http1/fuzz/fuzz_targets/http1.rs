//! Hostile bytes into the request-head parser, the framing decision and the chunked
//! decoder (fed in two pieces split where the input says): nothing may panic, consumed
//! counts stay within the input, and a split never changes the decoded body.
#![no_main]

use flynn_http1::{parse_request, ChunkedDecoder, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_request_line: 256,
        max_head: 1024,
        max_headers: 16,
    };
    if let Ok(Some((mut head, n))) = parse_request(data, &limits) {
        assert!(n <= data.len());
        let _ = head.framing();
        let _ = head.keep_alive();
        head.strip_hop_by_hop();
    }
    let split = data.first().map_or(0, |b| *b as usize).min(data.len());
    let mut whole_out = Vec::new();
    let whole = ChunkedDecoder::new().decode(data, &mut whole_out);
    let mut d = ChunkedDecoder::new();
    let mut parts_out = Vec::new();
    let first = d.decode(&data[..split], &mut parts_out);
    if let (Ok(whole), Ok(first)) = (&whole, first) {
        assert!(whole.consumed <= data.len());
        if !first.done {
            if let Ok(second) = d.decode(&data[split..], &mut parts_out) {
                assert_eq!(split + second.consumed, whole.consumed);
                assert_eq!(second.done, whole.done);
                assert_eq!(parts_out, whole_out);
            }
        }
    }
});
