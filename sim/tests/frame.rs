//! The frame decoder is total: garbage gives typed errors, never a panic,
//! and garbage on a connection costs the broker that connection only.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sim::proto::{
    decode_one, encode, FrameDecoder, FrameError, Request, RequestFrame, Response, ResponseFrame, WireTp, MAX_FRAME,
};

fn sample_frames() -> Vec<Vec<u8>> {
    let tp = WireTp { topic: "orders".into(), partition: 2 };
    vec![
        encode(&RequestFrame {
            id: 1,
            body: Request::Produce {
                topic: "orders".into(),
                key: Some(b"order-1".to_vec()),
                headers: vec![("h".into(), vec![1, 2, 3])],
                payload: br#"{"aggregate_id":"order-1"}"#.to_vec(),
                producer: Some((1, 7)),
            },
        }),
        encode(&RequestFrame {
            id: 2,
            body: Request::Poll { group: "g".into(), member: 9, ack_events: 3, fetch: vec![(tp.clone(), 4)], max: 16 },
        }),
        encode(&RequestFrame { id: 3, body: Request::Commit { group: "g".into(), member: 9, offsets: vec![(tp, 5)] } }),
        encode(&ResponseFrame { id: 4, body: Response::Joined { member: 1 << 32, generation: 2 } }),
    ]
}

/// Feeds `bytes` to the decoder in random chunks; returns what it said.
fn feed(bytes: &[u8], rng: &mut SmallRng) -> Result<usize, FrameError> {
    let mut d = FrameDecoder::new();
    let mut frames = 0;
    let mut rest = bytes;
    while !rest.is_empty() {
        let n = rng.gen_range(1..=rest.len());
        d.push(&rest[..n]);
        rest = &rest[n..];
        while d.next_frame::<RequestFrame>()?.is_some() {
            frames += 1;
        }
    }
    Ok(frames)
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = SmallRng::seed_from_u64(0xf4a3);
    for _ in 0..20_000 {
        let len = rng.gen_range(0..64);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        if rng.gen_bool(0.5) && bytes.len() >= 4 {
            // A plausible length prefix, so the body parser is reached.
            let body = (bytes.len() - 4) as u32;
            bytes[..4].copy_from_slice(&body.to_be_bytes());
        }
        let _ = decode_one::<RequestFrame>(&bytes);
        let _ = decode_one::<ResponseFrame>(&bytes);
        let _ = feed(&bytes, &mut rng);
    }
}

#[test]
fn mutated_frames_never_panic() {
    let mut rng = SmallRng::seed_from_u64(0xbee5);
    let frames = sample_frames();
    for _ in 0..20_000 {
        let mut bytes = frames[rng.gen_range(0..frames.len())].clone();
        match rng.gen_range(0..4) {
            0 => {
                let i = rng.gen_range(0..bytes.len());
                bytes[i] ^= 1 << rng.gen_range(0..8);
            }
            1 => bytes.truncate(rng.gen_range(0..bytes.len())),
            2 => {
                let i = rng.gen_range(4..bytes.len());
                bytes.insert(i, rng.gen());
            }
            _ => {
                let other = &frames[rng.gen_range(0..frames.len())];
                bytes.extend_from_slice(&other[..rng.gen_range(0..other.len())]);
            }
        }
        match decode_one::<RequestFrame>(&bytes) {
            Ok((_, used)) => assert!(used <= bytes.len()),
            Err(
                FrameError::Malformed(_)
                | FrameError::Truncated { .. }
                | FrameError::TooLarge { .. }
                | FrameError::Empty,
            ) => {}
        }
        let _ = feed(&bytes, &mut rng);
    }
}

#[test]
fn typed_errors() {
    assert_eq!(decode_one::<RequestFrame>(&[]), Err(FrameError::Truncated { have: 0, need: 4 }));
    assert_eq!(decode_one::<RequestFrame>(&[0, 0, 0, 0]), Err(FrameError::Empty));
    let huge = ((MAX_FRAME + 1) as u32).to_be_bytes();
    assert_eq!(decode_one::<RequestFrame>(&huge), Err(FrameError::TooLarge { len: MAX_FRAME + 1, limit: MAX_FRAME }));
    assert!(matches!(decode_one::<RequestFrame>(b"\0\0\0\x02{}"), Err(FrameError::Malformed(_))));
    let good = &sample_frames()[0];
    assert_eq!(
        decode_one::<RequestFrame>(&good[..good.len() - 1]),
        Err(FrameError::Truncated { have: good.len() - 1, need: good.len() })
    );
    // Several frames in one buffer, split anywhere.
    let all: Vec<u8> = sample_frames()[..3].concat();
    let mut rng = SmallRng::seed_from_u64(1);
    for _ in 0..100 {
        assert_eq!(feed(&all, &mut rng), Ok(3));
    }
}

/// A client that sends garbage loses its connection; the broker serves the next one.
#[test]
fn garbage_costs_the_broker_one_connection() {
    use sim::broker::{self, BrokerSettings, SharedDisk};
    use sim::history::History;
    use sim::proto::{read_frame, write_frame};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use turmoil::net::TcpStream;

    let mut sim = turmoil::Builder::new().rng_seed(3).build();
    let settings = BrokerSettings {
        topics: vec![("orders".into(), 3)],
        default_partitions: 1,
        session_timeout: Duration::from_millis(600),
        expiry_check: Duration::from_millis(50),
        idle_timeout: Duration::from_secs(5),
    };
    let (disk, history) = (SharedDisk::default(), History::new());
    {
        let (disk, history) = (disk.clone(), history.clone());
        sim.host(broker::BROKER, move || broker::run(disk.clone(), settings.clone(), history.clone()));
    }
    sim.client("client", async move {
        let addr = (broker::BROKER, broker::PORT);
        for garbage in [&b"\xff\xff\xff\xff"[..], b"\0\0\0\x05hello", b"\0\0\0\0", b"\0\0\0\x02[]"] {
            let mut s = TcpStream::connect(addr).await?;
            s.write_all(garbage).await?;
            let mut buf = [0u8; 16];
            // The broker hangs up: EOF or reset, never an answer.
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => {}
                Ok(n) => panic!("broker answered garbage with {n} bytes"),
            }
        }
        let mut s = TcpStream::connect(addr).await?;
        let req = RequestFrame {
            id: 1,
            body: Request::Produce {
                topic: "orders".into(),
                key: Some(b"k".to_vec()),
                headers: vec![],
                payload: b"x".to_vec(),
                producer: None,
            },
        };
        write_frame(&mut s, &req).await?;
        let resp: ResponseFrame = read_frame(&mut s).await?;
        assert!(matches!(resp.body, Response::Produced { offset: 0, duplicate: false, .. }), "{resp:?}");
        Ok(())
    });
    sim.run().expect("simulation");
    assert_eq!(disk.lock().topics["orders"].iter().map(Vec::len).sum::<usize>(), 1);
}
