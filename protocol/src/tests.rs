extern crate std;
use std::prelude::rust_2024::*;
use std::{format, vec};

use proptest::prelude::*;

use super::*;

fn kind() -> impl Strategy<Value = Kind> {
    (1u8..=10).prop_map(|b| Kind::from_u8(b).unwrap())
}

proptest! {
    #[test]
    fn encode_decode_round_trips(k in kind(), seq in any::<u64>(), body in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let f = Frame::new(k, seq, body);
        let bytes = f.encode();
        let (back, used) = decode(&bytes, DEFAULT_MAX_FRAME).unwrap().unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(back, f);
        prop_assert_eq!(peek_header(&bytes).map(|h| h.2), Some(bytes.len()));
    }

    #[test]
    fn every_prefix_needs_more(k in kind(), seq in any::<u64>(), body in proptest::collection::vec(any::<u8>(), 0..300)) {
        let bytes = Frame::new(k, seq, body).encode();
        for n in 0..bytes.len() {
            prop_assert_eq!(decode(&bytes[..n], DEFAULT_MAX_FRAME), Ok(None));
        }
    }

    #[test]
    fn random_input_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(&bytes, 256);
        let _ = peek_header(&bytes);
        let f = Frame::new(Kind::Hello, 0, bytes);
        let _ = f.decode_body::<Hello>("HELLO");
    }
}

#[test]
fn a_frame_over_the_maximum_is_refused_before_it_arrives() {
    let mut bytes = (1_000_000u32).to_be_bytes().to_vec();
    bytes.push(3);
    assert_eq!(
        decode(&bytes, DEFAULT_MAX_FRAME),
        Err(ProtocolError::TooLarge {
            len: 1_000_000,
            max: DEFAULT_MAX_FRAME
        })
    );
}

#[test]
fn short_lengths_and_unknown_types_are_errors() {
    assert_eq!(
        decode(&[0, 0, 0, 3, 1, 0, 0], 100),
        Err(ProtocolError::TooShort(3))
    );
    let mut f = Frame::new(Kind::Data, 1, b"x".to_vec()).encode();
    f[4] = 42;
    assert_eq!(decode(&f[..5], 100), Err(ProtocolError::UnknownType(42)));
    assert_eq!(
        ProtocolError::UnknownType(42).code(),
        ErrorCode::UnknownType
    );
}

#[test]
fn control_bodies_round_trip_as_cbor() {
    let hello = Hello {
        device: "device-0001".into(),
        app: "echo".into(),
        resume: None,
    };
    let f = Frame::control(Kind::Hello, 0, &hello);
    assert_eq!(f.decode_body::<Hello>("HELLO").unwrap(), hello);
    assert!(f.decode_body::<Welcome>("WELCOME").is_err());
    let e = ErrorCode::UnknownApp.frame(3, "no app named x");
    let body: ErrorBody = e.decode_body("ERROR").unwrap();
    assert_eq!(body.code, 5);
}

/// The worked example of PROTOCOL.md, byte for byte.
#[test]
fn the_documented_example_is_exact() {
    let hello = Hello {
        device: "d1".into(),
        app: "echo".into(),
        resume: None,
    };
    let bytes = Frame::control(Kind::Hello, 0, &hello).encode();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        hex,
        "0000001d010000000000000000a26664657669636562643163617070646563686f"
    );
    let data = Frame::new(Kind::Data, 1, b"hi".to_vec()).encode();
    let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, "0000000b0300000000000000016869");
}

#[test]
fn names_are_unique_and_codes_round_trip() {
    let kinds: std::collections::HashSet<_> = Kind::ALL.iter().map(|k| k.as_str()).collect();
    assert_eq!(kinds.len(), Kind::ALL.len());
    for (i, k) in Kind::ALL.iter().enumerate() {
        assert_eq!(*k as usize, i + 1);
        assert_eq!(Kind::from_u8(*k as u8), Some(*k));
    }
    let names: std::collections::HashSet<_> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(names.len(), ErrorCode::ALL.len());
    for c in ErrorCode::ALL {
        assert_eq!(ErrorCode::from_u16(c as u16), Some(c));
    }
    assert_eq!(ErrorCode::from_u16(0), None);
    assert_eq!(ErrorCode::from_u16(16), None);
    assert_eq!(ErrorCode::UnknownApp.as_str(), "unknown_app");
    let body = ErrorBody {
        code: 5,
        text: "x".into(),
    };
    assert_eq!(body.to_string(), "unknown_app (x)");
    let unknown = ErrorBody {
        code: 99,
        text: "y".into(),
    };
    assert_eq!(unknown.to_string(), "code 99 (y)");
}

#[cfg(feature = "codec")]
mod codec {
    use std::vec;
    use std::vec::Vec;

    use bytes::BytesMut;
    use proptest::prelude::*;
    use tokio_util::codec::{Decoder, Encoder};

    use super::kind;
    use crate::codec::CodecError;
    use crate::*;

    fn decode_all(codec: &mut FrameCodec, bytes: &[u8], step: usize) -> Vec<Frame> {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for chunk in bytes.chunks(step.max(1)) {
            buf.extend_from_slice(chunk);
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                out.push(f);
            }
        }
        assert!(buf.is_empty(), "{} bytes left over", buf.len());
        out
    }

    proptest! {
        /// The codec and the slice decoder agree, whatever the chunking of the stream.
        #[test]
        fn codec_agrees_with_decode_on_any_chunking(
            frames in proptest::collection::vec((kind(), any::<u64>(), proptest::collection::vec(any::<u8>(), 0..300)), 1..8),
            step in 1usize..64,
        ) {
            let frames: Vec<Frame> = frames.into_iter().map(|(k, s, b)| Frame::new(k, s, b)).collect();
            let mut codec = FrameCodec::default();
            let mut wire = BytesMut::new();
            for f in &frames {
                codec.encode(f, &mut wire).unwrap();
            }
            let mut flat = Vec::new();
            for f in &frames {
                f.encode_into(&mut flat);
            }
            prop_assert_eq!(&wire[..], &flat[..]);
            prop_assert_eq!(decode_all(&mut codec, &wire, step), frames);
        }

        #[test]
        fn codec_never_panics_on_random_input(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let mut codec = FrameCodec::new(256);
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
        }
    }

    #[test]
    fn an_oversized_prefix_is_refused_before_the_body_arrives() {
        let mut codec = FrameCodec::new(1000);
        let mut buf = BytesMut::from(&1001u32.to_be_bytes()[..]);
        match codec.decode(&mut buf) {
            Err(CodecError::Protocol(ProtocolError::TooLarge {
                len: 1001,
                max: 1000,
            })) => {}
            other => panic!("expected TooLarge, got {other:?}"),
        }
        // Nothing was reserved for the refused frame.
        assert!(buf.capacity() < 1000);
        // A frame of exactly the maximum is taken.
        let f = Frame::new(Kind::Data, 7, vec![1u8; 1000 - HEADER]);
        let mut wire = BytesMut::new();
        codec.encode(&f, &mut wire).unwrap();
        assert_eq!(decode_all(&mut codec, &wire, 100), vec![f]);
        // ...and one byte more is not sent.
        let over = Frame::new(Kind::Data, 7, vec![1u8; 1001 - HEADER]);
        assert!(codec.encode(&over, &mut BytesMut::new()).is_err());
    }

    #[test]
    fn short_lengths_and_unknown_types_are_refused_from_the_header() {
        let mut codec = FrameCodec::default();
        let mut short = BytesMut::from(&[0u8, 0, 0, 3][..]);
        assert!(matches!(
            codec.decode(&mut short),
            Err(CodecError::Protocol(ProtocolError::TooShort(3)))
        ));
        let mut unknown = BytesMut::from(&[0u8, 0, 0, 20, 42][..]);
        assert!(matches!(
            codec.decode(&mut unknown),
            Err(CodecError::Protocol(ProtocolError::UnknownType(42)))
        ));
    }
}

/// The CHECKPOINT example of PROTOCOL.md, byte for byte.
#[test]
fn the_documented_checkpoint_example_is_exact() {
    let f = Frame::control(
        Kind::Checkpoint,
        5,
        &Checkpoint {
            ticket: serde_bytes::ByteBuf::from(vec![0xaa, 0xbb, 0xcc]),
        },
    );
    let hex: String = f.encode().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, "000000150a0000000000000005a1667469636b657443aabbcc");
    let w = Welcome {
        session: "s".into(),
        gateway: "g".into(),
        resumed: Some(Resumed {
            seq: 5,
            state: "restored".into(),
        }),
        resume_refused: None,
    };
    let back: Welcome = Frame::control(Kind::Welcome, 0, &w)
        .decode_body("WELCOME")
        .unwrap();
    assert_eq!(back, w);
    // An older WELCOME (no resume fields) still decodes.
    let old = Frame::control(
        Kind::Welcome,
        0,
        &std::collections::BTreeMap::from([("session", "s"), ("gateway", "g")]),
    );
    let w: Welcome = old.decode_body("WELCOME").unwrap();
    assert_eq!((w.resumed, w.resume_refused), (None, None));
}

/// The owned serde types (the gateway's and the proxy's) and the in-place readers and
/// writers (the device's) make and read the same bytes.
mod body_agreement {
    use std::prelude::rust_2024::*;
    use std::vec;

    use proptest::prelude::*;
    use serde_bytes::ByteBuf;

    use crate::body::*;
    use crate::*;

    fn text() -> impl Strategy<Value = String> {
        proptest::string::string_regex(".{0,40}").unwrap()
    }

    proptest! {
        #[test]
        fn hello(device in text(), app in text(), resume in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..600))) {
            let owned = Hello { device: device.clone(), app: app.clone(), resume: resume.clone().map(ByteBuf::from) };
            let bytes = Frame::control(Kind::Hello, 0, &owned).body;
            let r = HelloRef::decode(&bytes).unwrap();
            prop_assert_eq!(r, HelloRef { device: &device, app: &app, resume: resume.as_deref() });
            let mut out = vec![0u8; HelloRef::max_len(device.len(), app.len(), resume.as_ref().map_or(0, |t| t.len()))];
            let n = r.encode(&mut out).unwrap();
            prop_assert_eq!(&out[..n], &bytes[..]);
        }

        #[test]
        fn welcome(session in text(), gateway in text(), seq in proptest::option::of(any::<u64>()), refused in proptest::option::of(text())) {
            let owned = Welcome {
                session: session.clone(),
                gateway: gateway.clone(),
                resumed: seq.map(|seq| Resumed { seq, state: "restored".into() }),
                resume_refused: refused.clone(),
            };
            let bytes = Frame::control(Kind::Welcome, 0, &owned).body;
            let r = WelcomeRef::decode(&bytes).unwrap();
            prop_assert_eq!(r.session, session.as_str());
            prop_assert_eq!(r.gateway, gateway.as_str());
            prop_assert_eq!(r.resumed.map(|r| (r.seq, r.state)), seq.map(|s| (s, "restored")));
            prop_assert_eq!(r.resume_refused, refused.as_deref());
            let mut out = vec![0u8; bytes.len()];
            let n = r.encode(&mut out).unwrap();
            prop_assert_eq!(&out[..n], &bytes[..]);
        }

        #[test]
        fn checkpoint_error_goaway(ticket in proptest::collection::vec(any::<u8>(), 0..600), code in any::<u16>(), t in text()) {
            let c = Frame::control(Kind::Checkpoint, 1, &Checkpoint { ticket: ByteBuf::from(ticket.clone()) }).body;
            prop_assert_eq!(CheckpointRef::decode(&c).unwrap().ticket, &ticket[..]);
            let e = Frame::control(Kind::Error, 0, &ErrorBody { code, text: t.clone() }).body;
            prop_assert_eq!(ErrorRef::decode(&e).unwrap(), ErrorRef { code, text: &t });
            let g = Frame::control(Kind::Goaway, 0, &Goaway { reason: t.clone() }).body;
            prop_assert_eq!(GoawayRef::decode(&g).unwrap().reason, t.as_str());
            // And back: what the in-place writers make, the serde types read.
            let mut out = vec![0u8; 700];
            let n = CheckpointRef { ticket: &ticket }.encode(&mut out).unwrap();
            prop_assert_eq!(&out[..n], &c[..]);
            let n = ErrorRef { code, text: &t }.encode(&mut out).unwrap();
            prop_assert_eq!(&out[..n], &e[..]);
            let n = GoawayRef { reason: &t }.encode(&mut out).unwrap();
            prop_assert_eq!(&out[..n], &g[..]);
        }

        #[test]
        fn arbitrary_bodies_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = HelloRef::decode(&bytes);
            let _ = WelcomeRef::decode(&bytes);
            let _ = CheckpointRef::decode(&bytes);
            let _ = ErrorRef::decode(&bytes);
            let _ = GoawayRef::decode(&bytes);
            let _ = split(&bytes, 128);
        }
    }

    #[test]
    fn unknown_keys_are_skipped_and_missing_ones_refused() {
        // {"ticket": h'aa', "x": [1, 2]}
        let body = [
            0xa2, 0x66, b't', b'i', b'c', b'k', b'e', b't', 0x41, 0xaa, 0x61, b'x', 0x82, 1, 2,
        ];
        assert_eq!(CheckpointRef::decode(&body).unwrap().ticket, &[0xaa]);
        // {"x": 1}
        assert_eq!(
            CheckpointRef::decode(&[0xa1, 0x61, b'x', 1]),
            Err(BadBody("CHECKPOINT"))
        );
        // A ticket that is text, not bytes.
        let body = [0xa1, 0x66, b't', b'i', b'c', b'k', b'e', b't', 0x61, b'a'];
        assert_eq!(CheckpointRef::decode(&body), Err(BadBody("CHECKPOINT")));
        // Trailing bytes after the map.
        let body = [0xa1, 0x66, b'r', b'e', b'a', b's', b'o', b'n', 0x60, 0x00];
        assert_eq!(GoawayRef::decode(&body), Err(BadBody("GOAWAY")));
        // An indefinite-length map is read too.
        let body = [
            0xbf, 0x66, b'r', b'e', b'a', b's', b'o', b'n', 0x61, b'z', 0xff,
        ];
        assert_eq!(GoawayRef::decode(&body).unwrap().reason, "z");
    }

    #[test]
    fn the_documented_hello_is_written_in_place() {
        let mut out = [0u8; 64];
        let n = HelloRef {
            device: "d1",
            app: "echo",
            resume: None,
        }
        .encode(&mut out)
        .unwrap();
        let mut frame = header_bytes(Kind::Hello, 0, n).to_vec();
        frame.extend_from_slice(&out[..n]);
        let documented = Frame::control(
            Kind::Hello,
            0,
            &Hello {
                device: "d1".into(),
                app: "echo".into(),
                resume: None,
            },
        )
        .encode();
        assert_eq!(frame, documented);
        assert_eq!(&frame[..4], &[0, 0, 0, 0x1d]);
        assert_eq!(
            HelloRef {
                device: "d1",
                app: "echo",
                resume: None
            }
            .encode(&mut [0u8; 10]),
            Err(TooSmall)
        );
    }
}
