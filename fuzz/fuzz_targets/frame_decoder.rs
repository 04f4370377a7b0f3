//! Feeds arbitrary bytes to the frame decoder, as a hostile peer would: it must return a typed
//! error or a valid message, never panic, and never use more than it was given.
#![no_main]

use braid_protocol::frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    // A stream may hold several frames back to back: decode until an error or the end.
    while let Ok(Some((message, used))) = frame::decode(rest) {
        assert!(used <= rest.len());
        assert!(frame::validate(&message).is_ok());
        // What decodes must encode back to a frame that decodes to the same message.
        let again = frame::encode_to_vec(&message).expect("a decoded message re-encodes");
        let (round_trip, _) = frame::decode(&again).expect("re-encoded frame decodes").expect("whole");
        assert_eq!(round_trip, message);
        // Decoding from the frame as shared bytes gives the same message.
        let shared = bytes::Bytes::copy_from_slice(rest);
        let (from_shared, shared_used) =
            frame::decode_shared(&shared).expect("decodes shared").expect("whole");
        assert_eq!((from_shared, shared_used), (message, used));
        rest = &rest[used..];
    }
    let _ = frame::decode_body(data);
});
