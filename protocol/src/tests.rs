use proptest::prelude::*;

use super::*;

fn kind() -> impl Strategy<Value = Kind> {
    (1u8..=9).prop_map(|b| Kind::from_u8(b).unwrap())
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
