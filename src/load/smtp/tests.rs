use super::*;

#[test]
fn reply_keys() {
    let k = |t: &str| {
        reply_key(&Reply {
            code: t[..3].parse().unwrap(),
            text: t.into(),
        })
    };
    assert_eq!(k("421 4.7.0 mx Too many connections"), "421 4.7.0");
    assert_eq!(k("554 5.7.1 mx Access denied"), "554 5.7.1");
    assert_eq!(k("421 Service not available"), "421");
    assert_eq!(k("421"), "421");
}

#[test]
fn bodies_are_whole_lines_within_the_size() {
    let b = Bodies::new(10_000);
    let m = b.get(10_000);
    assert!(m.len() + 3 <= 10_000 && m.len() + 3 > 9_900, "{}", m.len());
    assert!(m.ends_with(b"x\r\n"));
    assert!(!m.windows(3).any(|w| w == b"\n.x") && m[0] != b'.');
    assert!(b.get(0).is_empty() && b.get(80).is_empty() && b.get(81).len() == 78);
    assert_eq!(b.get(1 << 30).len(), m.len(), "capped at the largest");
}

#[test]
fn recipients_are_used_in_turn() {
    let t = Transaction {
        to: vec!["a@x".into(), "b@x".into()],
        ..Transaction::default()
    };
    let got: Vec<&str> = (0..4).map(|i| t.recipient(i)).collect();
    assert_eq!(got, ["a@x", "b@x", "a@x", "b@x"]);
    let h = headers(&t, 3);
    assert!(
        h.starts_with("From: <load@mxgate.test>\r\nTo: <b@x>\r\n"),
        "{h}"
    );
    assert!(h.ends_with("\r\n\r\n"));
}
