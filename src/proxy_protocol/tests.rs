//! The parser on every valid and malformed case, the encoder's exact bytes, and properties over
//! arbitrary input.

use super::*;
use proptest::prelude::*;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn v1_exact_bytes_and_round_trip() {
    let h = encode(Version::V1, sa("192.0.2.10:40000"), sa("198.51.100.1:25"));
    assert_eq!(h, b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 25\r\n");
    let h6 = encode(
        Version::V1,
        sa("[2001:db8::10]:40000"),
        sa("[2001:db8::1]:25"),
    );
    assert_eq!(h6, b"PROXY TCP6 2001:db8::10 2001:db8::1 40000 25\r\n");
    for h in [h, h6] {
        let p = parse(&h).unwrap().unwrap();
        assert_eq!(p.len, h.len());
    }
}

#[test]
fn v2_exact_bytes_and_round_trip() {
    let h = encode(Version::V2, sa("192.0.2.10:40000"), sa("198.51.100.1:25"));
    let mut want = V2_SIGNATURE.to_vec();
    want.extend_from_slice(&[0x21, 0x11, 0, 12, 192, 0, 2, 10, 198, 51, 100, 1]);
    want.extend_from_slice(&40000u16.to_be_bytes());
    want.extend_from_slice(&25u16.to_be_bytes());
    assert_eq!(h, want);
    let p = parse(&h).unwrap().unwrap();
    assert_eq!(
        p.addresses,
        Some((sa("192.0.2.10:40000"), sa("198.51.100.1:25")))
    );
    let h6 = encode(Version::V2, sa("[2001:db8::10]:1"), sa("[2001:db8::1]:25"));
    assert_eq!(&h6[12..16], &[0x21, 0x21, 0, 36]);
    assert_eq!(h6.len(), 52);
    assert_eq!(
        parse(&h6).unwrap().unwrap().addresses,
        Some((sa("[2001:db8::10]:1"), sa("[2001:db8::1]:25")))
    );
}

#[test]
fn mixed_families_are_written_as_ipv6() {
    let h = encode(Version::V1, sa("192.0.2.10:1"), sa("[2001:db8::1]:25"));
    assert_eq!(h, b"PROXY TCP6 ::ffff:192.0.2.10 2001:db8::1 1 25\r\n");
    // A mapped client with an IPv4 destination is plain TCP4.
    let h = encode(
        Version::V1,
        sa("[::ffff:192.0.2.10]:1"),
        sa("198.51.100.1:25"),
    );
    assert_eq!(h, b"PROXY TCP4 192.0.2.10 198.51.100.1 1 25\r\n");
}

#[test]
fn unknown_and_local_carry_no_address() {
    assert_eq!(
        parse(b"PROXY UNKNOWN\r\n").unwrap().unwrap().addresses,
        None
    );
    assert_eq!(
        parse(b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n")
            .unwrap()
            .unwrap()
            .addresses,
        None
    );
    let mut local = V2_SIGNATURE.to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0, 0]);
    assert_eq!(
        parse(&local).unwrap().unwrap(),
        Header {
            addresses: None,
            len: 16
        }
    );
}

#[test]
fn every_prefix_of_a_valid_header_needs_more() {
    for h in [
        encode(Version::V1, sa("192.0.2.10:40000"), sa("198.51.100.1:25")),
        encode(Version::V2, sa("[2001:db8::10]:1"), sa("[2001:db8::1]:25")),
    ] {
        for cut in 0..h.len() {
            assert_eq!(parse(&h[..cut]), Ok(None), "prefix of {cut} bytes");
        }
    }
}

#[test]
fn malformed_headers_are_refused() {
    let v2 = |ver_cmd: u8, fam: u8, len: u16, body: &[u8]| {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[ver_cmd, fam]);
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(body);
        h
    };
    let cases: Vec<(Vec<u8>, HeaderError)> = vec![
        (b"EHLO there\r\n".to_vec(), HeaderError::Signature),
        (b"PROXZ TCP4".to_vec(), HeaderError::Signature),
        (
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
            HeaderError::Malformed("unknown protocol"),
        ),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n".to_vec(),
            HeaderError::Malformed("expected four fields"),
        ),
        (
            b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n".to_vec(),
            HeaderError::Malformed("bad IPv4 address"),
        ),
        (
            b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
            HeaderError::Malformed("bad IPv4 address"),
        ),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n".to_vec(),
            HeaderError::Malformed("bad port"),
        ),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n".to_vec(),
            HeaderError::Malformed("bad port"),
        ),
        (
            b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
            HeaderError::Malformed("expected four fields"),
        ),
        (
            b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n".to_vec(),
            HeaderError::Malformed("bad IPv6 address"),
        ),
        (
            b"PROXY TCP4 1.2.3.4\n5.6.7.8".to_vec(),
            HeaderError::Malformed("stray line break"),
        ),
        (
            [b"PROXY TCP4 ".to_vec(), vec![b'1'; 120]].concat(),
            HeaderError::TooLong,
        ),
        (
            v2(0x31, 0x11, 12, &[0; 12]),
            HeaderError::Malformed("version is not 2"),
        ),
        (
            v2(0x22, 0x11, 12, &[0; 12]),
            HeaderError::Malformed("unknown command"),
        ),
        (
            v2(0x21, 0x12, 12, &[0; 12]),
            HeaderError::Malformed("unsupported address family"),
        ),
        (
            v2(0x21, 0x31, 216, &[0; 216]),
            HeaderError::Malformed("unsupported address family"),
        ),
        (
            v2(0x21, 0x11, 8, &[0; 8]),
            HeaderError::Malformed("length too short for the address family"),
        ),
        (
            v2(0x21, 0x21, 12, &[0; 12]),
            HeaderError::Malformed("length too short for the address family"),
        ),
        (
            v2(0x21, 0x00, 0, &[]),
            HeaderError::Malformed("PROXY command without addresses"),
        ),
        (v2(0x21, 0x11, 600, &[]), HeaderError::TooLong),
        (b"\r\n\r\n\0\r\nQUIT!".to_vec(), HeaderError::Signature),
    ];
    assert!(!cases.is_empty());
    for (bytes, want) in cases {
        assert_eq!(
            parse(&bytes),
            Err(want),
            "{:?}",
            String::from_utf8_lossy(&bytes)
        );
    }
}

#[test]
fn v2_tlvs_inside_the_bound_are_skipped() {
    let mut h = encode(Version::V2, sa("192.0.2.10:1"), sa("198.51.100.1:25"));
    let tlv = [0x04u8, 0, 3, b'a', b'b', b'c'];
    h[14..16].copy_from_slice(&((12 + tlv.len()) as u16).to_be_bytes());
    h.extend_from_slice(&tlv);
    h.extend_from_slice(b"EHLO next\r\n");
    let p = parse(&h).unwrap().unwrap();
    assert_eq!(p.len, 28 + tlv.len());
    assert_eq!(p.addresses.unwrap().0, sa("192.0.2.10:1"));
}

/// An independent check of what a valid header looks like, for the properties.
fn looks_valid(h: &[u8]) -> bool {
    if h.starts_with(b"PROXY ") {
        h.len() <= V1_MAX && h.ends_with(b"\r\n") && !h[..h.len() - 2].contains(&b'\n')
    } else if h.starts_with(&V2_SIGNATURE) {
        h.len() >= 16
            && h.len() == 16 + u16::from_be_bytes([h[14], h[15]]) as usize
            && h[12] >> 4 == 2
    } else {
        false
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn arbitrary_bytes_never_panic_or_overread(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
        if let Ok(Some(h)) = parse(&bytes) {
            prop_assert!(h.len <= bytes.len());
            prop_assert!(h.len <= MAX_HEADER);
            prop_assert!(looks_valid(&bytes[..h.len]));
        }
    }

    #[test]
    fn signature_prefixed_noise_is_never_accepted_wrongly(
        tail in proptest::collection::vec(any::<u8>(), 0..600),
        v1 in any::<bool>(),
    ) {
        let mut bytes = if v1 { b"PROXY ".to_vec() } else { V2_SIGNATURE.to_vec() };
        bytes.extend_from_slice(&tail);
        if let Ok(Some(h)) = parse(&bytes) {
            prop_assert!(looks_valid(&bytes[..h.len]));
            // A valid header parses the same on its own, whatever follows it.
            prop_assert_eq!(parse(&bytes[..h.len]).unwrap().unwrap(), h);
        }
    }

    #[test]
    fn encoded_headers_round_trip(a in any::<[u8; 4]>(), b in any::<[u8; 16]>(), p in any::<u16>(), q in any::<u16>(), v2 in any::<bool>()) {
        let version = if v2 { Version::V2 } else { Version::V1 };
        for (src, dst) in [
            (SocketAddr::from((a, p)), SocketAddr::from(([198, 51, 100, 1], q))),
            (SocketAddr::from((Ipv6Addr::from(b), p)), SocketAddr::from((Ipv6Addr::LOCALHOST, q))),
        ] {
            let h = encode(version, src, dst);
            let parsed = parse(&h).unwrap().unwrap();
            prop_assert_eq!(parsed.len, h.len());
            let (s, d) = parsed.addresses.unwrap();
            prop_assert_eq!(s.ip().to_canonical(), src.ip().to_canonical());
            prop_assert_eq!((s.port(), d.port()), (src.port(), dst.port()));
        }
    }

    #[test]
    fn a_flipped_signature_byte_is_refused(i in 0usize..12, flip in 1u8..=255) {
        let mut h = encode(Version::V2, SocketAddr::from(([192, 0, 2, 1], 1)), SocketAddr::from(([198, 51, 100, 1], 25)));
        h[i] ^= flip;
        prop_assert!(parse(&h).is_err() || i == 0 && h[0] == b'P');
    }
}
