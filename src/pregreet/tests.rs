use super::*;

fn whole(r: Rewrite) -> Vec<u8> {
    match r {
        Rewrite::Whole(v) => v,
        other => panic!("not rewritten: {other:?}"),
    }
}

#[test]
fn a_one_line_greeting_becomes_the_final_line() {
    assert_eq!(
        whole(rewrite(b"220 backend.test ESMTP ready\r\n")),
        b"220 backend.test ESMTP ready\r\n"
    );
}

#[test]
fn a_multi_line_greeting_keeps_one_code_and_its_own_last_line() {
    let got = whole(rewrite(
        b"220-backend.test first\r\n220-second\r\n220 backend.test last\r\n",
    ));
    assert_eq!(
        got,
        b"220-backend.test first\r\n220-second\r\n220 backend.test last\r\n"
    );
    // Any 2xx becomes 220: the teaser's code is the reply's.
    let got = whole(rewrite(b"250-odd\r\n221 end\r\n"));
    assert_eq!(got, b"220-odd\r\n220 end\r\n");
    // A bare code as the last line, and bytes behind the greeting, kept as they are.
    assert_eq!(
        whole(rewrite(b"220-a\r\n220\r\nextra")),
        b"220-a\r\n220\r\nextra"
    );
    // LF alone ends a line too.
    assert_eq!(whole(rewrite(b"220-a\n220 b\n")), b"220-a\n220 b\n");
}

#[test]
fn a_greeting_cut_short_asks_for_more_and_no_smtp_is_not_rewritten() {
    assert_eq!(rewrite(b""), Rewrite::More);
    assert_eq!(rewrite(b"22"), Rewrite::More);
    assert_eq!(rewrite(b"55"), Rewrite::More);
    assert_eq!(rewrite(b"220-first\r\n220 la"), Rewrite::More);
    assert_eq!(rewrite(b"554-first\r\n554 la"), Rewrite::More);
    assert_eq!(rewrite(b"220-ok\r\n554 no\r\n"), Rewrite::Not);
    assert_eq!(rewrite(b"554-no\r\n220 ok\r\n"), Rewrite::Not);
    assert_eq!(rewrite(b"354 go on\r\n"), Rewrite::Not);
    assert_eq!(rewrite(b"SSH-2.0-OpenSSH\r\n"), Rewrite::Not);
    assert_eq!(rewrite(&vec![b'2'; MAX_GREETING]), Rewrite::Not);
}

#[test]
fn a_refusal_is_kept_whole_under_its_first_code() {
    assert_eq!(
        rewrite(b"554 5.7.1 go away\r\n"),
        Rewrite::Refused(b"554 5.7.1 go away\r\n".to_vec())
    );
    // A multi-line one stays one reply: its first line's code on every line, and nothing
    // after its last line.
    assert_eq!(
        rewrite(b"554-5.7.1 first\r\n550-second\r\n554 5.7.1 last\r\nmore"),
        Rewrite::Refused(b"554-5.7.1 first\r\n554-second\r\n554 5.7.1 last\r\n".to_vec())
    );
    assert_eq!(
        rewrite(b"452 4.3.1 full\r\n"),
        Rewrite::Refused(b"452 4.3.1 full\r\n".to_vec())
    );
}

#[test]
fn the_texts_are_exact() {
    assert_eq!(teaser("mx.t"), b"220-mx.t ESMTP\r\n");
    assert_eq!(completion("mx.t"), b"220 mx.t ESMTP\r\n");
    assert_eq!(DROP_LINE, "521 5.5.1 Protocol error");
    assert_eq!(ENFORCE_LINE, b"550 5.5.1 Protocol error\r\n");
    assert_eq!(BYE_LINE, b"221 2.0.0 Bye\r\n");
}
