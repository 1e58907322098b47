use super::*;

#[test]
fn the_process_families_describe_this_very_process() {
    let mut text = String::new();
    render(&mut text);
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing in {text}"))
            .parse()
            .unwrap()
    };
    let before = std::fs::read_dir("/proc/self/fd").unwrap().count() as f64;
    // Other tests in this process open and close descriptors at the same time.
    assert!(value("process_open_fds") >= 3.0, "{text}");
    assert!((value("process_open_fds") - before).abs() < 64.0, "{text}");
    assert!(value("process_max_fds") >= value("process_open_fds"));
    assert!(value("process_resident_memory_bytes") > 1024.0 * 1024.0);
    assert!(value("process_virtual_memory_bytes") >= value("process_resident_memory_bytes"));
    assert!(value("process_threads") >= 1.0);
    assert!(value("process_cpu_seconds_total") >= 0.0);
    let now = crate::metrics::unix_now();
    let start = value("process_start_time_seconds");
    assert!(start <= now && start > now - 86_400.0, "{start} vs {now}");
    assert_eq!(text.matches("# TYPE process_").count(), 7, "{text}");
}

#[test]
fn a_command_name_with_spaces_does_not_shift_the_fields() {
    // State is field index 2: "R", "S" or similar, whatever the command name holds.
    let state = self_stat_field(2).unwrap();
    assert!(
        state.len() == 1 && state.chars().all(|c| c.is_ascii_uppercase()),
        "{state}"
    );
}
