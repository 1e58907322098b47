use super::*;

#[tokio::test(start_paused = true)]
async fn a_full_cluster_lets_one_ask_per_interval_and_a_freed_slot_one_at_once() {
    let pace = Pace::default();
    assert!(pace.may_ask() && pace.may_ask(), "room: everyone asks");
    assert_eq!(pace.next(), None);
    pace.refused();
    assert!(!pace.may_ask());
    tokio::time::advance(ASK_EVERY).await;
    assert!(pace.may_ask());
    assert!(!pace.may_ask(), "one per interval");
    pace.freed();
    assert!(pace.may_ask());
    assert!(!pace.may_ask());
    // Admitted with others waiting: the next asks at once, still one at a time.
    assert!(pace.admitted(3));
    assert!(pace.may_ask());
    assert!(!pace.may_ask());
    // Admitted with nobody left: room again.
    assert!(pace.admitted(0));
    assert!(pace.may_ask() && pace.may_ask());
    assert!(!pace.admitted(0), "nothing to tell while not full");
}

#[tokio::test(start_paused = true)]
async fn a_session_that_ends_while_an_ask_is_out_lets_the_next_ask_at_once() {
    let pace = Pace::default();
    pace.refused();
    tokio::time::advance(ASK_EVERY).await;
    assert!(pace.may_ask());
    // A session here ends, then the ask that was out comes back refused.
    pace.freed();
    pace.refused();
    assert!(pace.may_ask(), "the freed slot is asked for at once");
    // Refused with no session ended meanwhile: one interval.
    pace.refused();
    assert!(!pace.may_ask());
    tokio::time::advance(ASK_EVERY).await;
    assert!(pace.may_ask());
}
