use super::*;
use tokio::io::BufReader;

#[test]
fn the_enhanced_code_is_the_word_after_the_code() {
    assert_eq!(enhanced_code(b"421 4.3.2 busy\r\n"), Some(&b"4.3.2"[..]));
    assert_eq!(enhanced_code(b"421-4.3.2\r\n"), Some(&b"4.3.2"[..]));
    assert_eq!(enhanced_code(b"421 4.7.0 go away"), Some(&b"4.7.0"[..]));
    assert_eq!(enhanced_code(b"554 5.7.1"), Some(&b"5.7.1"[..]));
    assert_eq!(enhanced_code(b"421 Too busy"), None);
    assert_eq!(enhanced_code(b"421 4.3"), None);
    assert_eq!(enhanced_code(b"421 4.3.2.1 x"), None);
    assert_eq!(enhanced_code(b"421"), None);
}

#[tokio::test]
async fn every_line_is_kept_when_asked() {
    let mut r = BufReader::new(&b"250-mx\r\n250-STARTTLS\r\n250 SIZE\r\n"[..]);
    let (reply, lines) = read_reply_lines(&mut r, Duration::from_secs(1))
        .await
        .ok()
        .unwrap();
    assert_eq!(reply.text, "250 SIZE");
    assert_eq!(lines, ["250-mx", "250-STARTTLS", "250 SIZE"]);
}

#[tokio::test]
async fn multi_line_replies_are_read_whole() {
    let mut r = BufReader::new(&b"220-first\r\n220-second\r\n220 last\r\nnext"[..]);
    let reply = read_reply(&mut r, Duration::from_secs(1))
        .await
        .ok()
        .unwrap();
    assert_eq!((reply.code, reply.text.as_str()), (220, "220 last"));
    let mut bad = BufReader::new(&b"22x oops\r\n"[..]);
    assert!(read_reply(&mut bad, Duration::from_secs(1)).await.is_err());
}
