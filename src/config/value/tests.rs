use super::*;

#[test]
fn durations_parse_and_print_back() {
    for (text, d) in [
        ("500ms", Duration::from_millis(500)),
        ("5s", Duration::from_secs(5)),
        ("10m", Duration::from_secs(600)),
        ("2h", Duration::from_secs(7200)),
    ] {
        let parsed: Dur = text.parse().unwrap();
        assert_eq!(parsed.0, d);
        assert_eq!(parsed.to_string(), text);
    }
    for bad in ["", "5", "s", "5x", "-5s", "5.5s", "99999999999999999999s"] {
        assert!(bad.parse::<Dur>().is_err(), "{bad:?} must be rejected");
    }
    // Zero needs no unit (`queue_timeout = "0"`); any other number does.
    for zero in ["0", "00", "0s", "0ms"] {
        assert_eq!(zero.parse::<Dur>().unwrap().0, Duration::ZERO, "{zero}");
    }
    assert_eq!(Dur(Duration::ZERO).to_string(), "0s");
}

#[test]
fn reply_text_rules() {
    assert!("421 4.3.2 busy".parse::<ReplyText>().is_ok());
    assert!("554 5.7.1 no".parse::<ReplyText>().is_ok());
    for bad in [
        "250 ok",
        "421",
        "421-multi",
        "4x1 no",
        "421 a\r\n250 b",
        "421 caf\u{e9}",
    ] {
        assert!(
            bad.parse::<ReplyText>().is_err(),
            "{bad:?} must be rejected"
        );
    }
    assert!(format!("421 {}", "x".repeat(600))
        .parse::<ReplyText>()
        .is_err());
}

#[test]
fn sizes() {
    assert_eq!("1MiB".parse::<ByteSize>().unwrap().0, 1 << 20);
    assert_eq!("64KiB".parse::<ByteSize>().unwrap().0, 65536);
    assert_eq!("4096".parse::<ByteSize>().unwrap().0, 4096);
    assert_eq!(ByteSize(1 << 20).to_string(), "1MiB");
    for bad in ["", "1GiB", "x", "1.5MiB"] {
        assert!(bad.parse::<ByteSize>().is_err(), "{bad:?} must be rejected");
    }
}

#[test]
fn cidrs_and_rates() {
    assert_eq!(
        "192.0.2.0/24".parse::<Cidr>().unwrap().to_string(),
        "192.0.2.0/24"
    );
    assert_eq!(
        "192.0.2.7".parse::<Cidr>().unwrap().to_string(),
        "192.0.2.7/32"
    );
    assert_eq!(
        "2001:db8::/32".parse::<Cidr>().unwrap().to_string(),
        "2001:db8::/32"
    );
    let e = "192.0.2.5/24".parse::<Cidr>().unwrap_err();
    assert!(e.contains("did you mean 192.0.2.0/24"), "{e}");
    assert!("192.0.2.0/33".parse::<Cidr>().is_err());
    let r: Rate = "30/min".parse().unwrap();
    assert_eq!((r.count, r.per), (30, Duration::from_secs(60)));
    assert_eq!(r.to_string(), "30/min");
    for bad in ["0/s", "30", "30/day", "x/s", "-1/s"] {
        assert!(bad.parse::<Rate>().is_err(), "{bad:?} must be rejected");
    }
}

#[test]
fn backend_specs() {
    let b: BackendSpec = "127.0.0.1:2525,weight=3,max_connections=30,backup"
        .parse()
        .unwrap();
    assert_eq!((b.weight, b.max_connections, b.backup), (3, Some(30), true));
    assert_eq!(
        b.to_string(),
        "127.0.0.1:2525,weight=3,max_connections=30,backup"
    );
    assert_eq!(
        "127.0.0.1:25".parse::<BackendSpec>().unwrap().to_string(),
        "127.0.0.1:25"
    );
    for bad in [
        "127.0.0.1:25,weight=0",
        "127.0.0.1:25,heavy",
        "nowhere",
        "127.0.0.1:25,max_connections=x",
    ] {
        assert!(bad.parse::<BackendSpec>().is_err(), "{bad:?}");
    }
}

#[test]
fn host_names() {
    assert!(validate_hostname("mx.example.com").is_ok());
    assert!(validate_hostname("localhost").is_ok());
    for bad in ["", "a b", "-a.com", "a..b", "x_y.com"] {
        assert!(validate_hostname(bad).is_err(), "{bad:?} must be rejected");
    }
}

#[test]
fn a_backend_under_invalid_is_refused_with_what_to_do() {
    for placeholder in [
        "exchange.example.invalid:2526",
        "EXCHANGE.EXAMPLE.INVALID:25",
        "mail.invalid.:25",
        "invalid:25",
    ] {
        let e = placeholder.parse::<HostPort>().unwrap_err();
        assert!(
            e.contains("set backend to your mail server's HOST:PORT"),
            "{placeholder}: {e}"
        );
    }
    // Loopback and literal backends, as in the tests and the sink examples, stay valid.
    for fine in ["127.0.0.1:2526", "[::1]:2526", "localhost:2526"] {
        assert!(fine.parse::<HostPort>().is_ok(), "{fine}");
    }
}
