use super::*;

#[test]
fn journal_stream_is_matched_on_device_and_inode() {
    assert!(journal_stream_matches("8:12345", 8, 12345));
    assert!(!journal_stream_matches("8:12345", 8, 12346));
    assert!(!journal_stream_matches("9:12345", 8, 12345));
    assert!(!journal_stream_matches("812345", 8, 12345));
    assert!(!journal_stream_matches("", 8, 12345));
}

#[test]
fn each_level_has_its_syslog_priority() {
    assert_eq!(priority(&Level::ERROR), b"<3>");
    assert_eq!(priority(&Level::WARN), b"<4>");
    assert_eq!(priority(&Level::INFO), b"<6>");
    assert_eq!(priority(&Level::DEBUG), b"<7>");
}
