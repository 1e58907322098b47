//! The man pages (roff) and shell completions, generated from the very flags of [`super::Cli`],
//! and mxgate.toml(5) from the config reference.

use super::Cli;

/// Writes the man page of the whole command, or of one subcommand (`mxgate-run(1)`), to `out`.
pub fn write_man(subcommand: Option<&str>, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    use clap::CommandFactory;
    let top = Cli::command();
    let cmd = match subcommand {
        None => top,
        Some(name) => {
            let sub = top.find_subcommand(name).cloned().ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no subcommand {name:?}"),
                )
            })?;
            let full: &'static str = Box::leak(format!("mxgate-{name}").into_boxed_str());
            sub.name(full)
        }
    };
    clap_mangen::Man::new(cmd).render(out)
}

/// Writes mxgate.toml(5): every key of the config file, from the reference the docs are
/// generated from ([`crate::reference`]), so the page cannot drift from what `mxgate check`
/// accepts.
pub fn write_config_man(out: &mut dyn std::io::Write) -> std::io::Result<()> {
    out.write_all(crate::reference::config_man().as_bytes())
}

/// Writes completions for `shell` to `out`.
pub fn write_completions(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    use clap::CommandFactory;
    clap_complete::generate(shell, &mut Cli::command(), "mxgate", out);
}
