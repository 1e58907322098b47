use super::super::super::Settings;

fn cluster(table: &str) -> Result<super::ClusterConfig, String> {
    Settings::from_toml(&format!(
        "backend = \"127.0.0.1:25\"\nhostname = \"mx.t\"\n[cluster]\ninstance = \"a\"\n{table}"
    ))
    .unwrap()
    .validate(None)
    .map(|c| c.cluster.expect("a cluster"))
    .map_err(|e| e.to_string())
}

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("mxgate-pw-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn the_password_comes_from_its_file_and_never_twice() {
    let d = dir("file");
    let file = d.join("redis-password");
    std::fs::write(&file, "p@ss w/rd\n").unwrap();
    let c = cluster(&format!(
        "redis = \"redis://127.0.0.1:6379/0\"\npassword_file = {:?}\n",
        file.display().to_string()
    ))
    .unwrap();
    assert_eq!(c.redis, "redis://:p%40ss%20w%2Frd@127.0.0.1:6379/0");
    let unix = cluster(&format!(
        "redis = \"unix:///run/redis.sock?db=1\"\npassword_file = {:?}\n",
        file.display().to_string()
    ))
    .unwrap();
    assert_eq!(
        unix.redis,
        "unix:///run/redis.sock?db=1&pass=p%40ss%20w%2Frd"
    );
    let twice = cluster(&format!(
        "redis = \"redis://:old@127.0.0.1:6379/0\"\npassword_file = {:?}\n",
        file.display().to_string()
    ))
    .unwrap_err();
    assert!(
        twice.contains("key `cluster.password_file`: the redis URL has a password already"),
        "{twice}"
    );
    std::fs::write(&file, "\n").unwrap();
    let empty = cluster(&format!(
        "redis = \"redis://127.0.0.1:6379/0\"\npassword_file = {:?}\n",
        file.display().to_string()
    ))
    .unwrap_err();
    assert!(empty.contains("the first line is empty"), "{empty}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_bare_name_is_a_systemd_credential() {
    let d = dir("cred");
    std::fs::write(d.join("redis"), "from-systemd").unwrap();
    let table = "redis = \"redis://127.0.0.1:6379/0\"\npassword_file = \"redis\"\n";
    // The only test that sets or reads this variable.
    std::env::remove_var("CREDENTIALS_DIRECTORY");
    let unset = cluster(table).unwrap_err();
    assert!(
        unset.contains("CREDENTIALS_DIRECTORY is not set"),
        "{unset}"
    );
    std::env::set_var("CREDENTIALS_DIRECTORY", &d);
    let c = cluster(table).unwrap();
    std::env::remove_var("CREDENTIALS_DIRECTORY");
    assert_eq!(c.redis, "redis://:from-systemd@127.0.0.1:6379/0");
    std::fs::remove_dir_all(&d).unwrap();
}
