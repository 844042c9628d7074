//! The simulator's frame decoder (`sim::proto`) on arbitrary bytes, whole and
//! in arbitrary chunks: every input yields frames or a typed `FrameError`,
//! never a panic, and every decoded frame survives encode-then-decode.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sim::proto::{decode_one, encode, FrameDecoder, RequestFrame, ResponseFrame};

fn round_trips<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(frame: &T) {
    let bytes = encode(frame);
    let (again, used) = decode_one::<T>(&bytes).expect("an encoded frame decodes");
    assert_eq!(used, bytes.len());
    assert_eq!(&again, frame);
}

fn stream<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(data: &[u8], chunk: usize) {
    let whole = decode_one::<T>(data);
    if let Ok((frame, _)) = &whole {
        round_trips(frame);
    }
    let mut decoder = FrameDecoder::new();
    let mut first = None;
    for piece in data.chunks(chunk) {
        decoder.push(piece);
        loop {
            match decoder.next_frame::<T>() {
                Ok(Some(frame)) => {
                    round_trips(&frame);
                    first.get_or_insert(frame);
                }
                Ok(None) => break,
                // A typed error: the connection would be dropped here.
                Err(_) => return,
            }
        }
    }
    // Chunking never changes what the first frame is.
    if let (Ok((whole, _)), Some(first)) = (whole, first) {
        assert_eq!(whole, first);
    }
}

fuzz_target!(|data: &[u8]| {
    let chunk = usize::from(data.first().copied().unwrap_or(0) % 16) + 1;
    stream::<RequestFrame>(data, chunk);
    stream::<ResponseFrame>(data, chunk);
});
