//! Log lines under systemd. When stderr is the journal's stream (systemd sets `JOURNAL_STREAM`
//! to its device and inode), each line starts with the `<N>` syslog priority that journald
//! reads off stderr (sd-daemon(3)), so `journalctl -p warning` shows mxgate's warnings and
//! errors. A terminal or a file gets the lines unchanged.

use std::io::Write;
use std::os::fd::AsFd;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// The `<N>` prefix for a level: syslog's err, warning, info and debug.
pub fn priority(level: &Level) -> &'static [u8] {
    match *level {
        Level::ERROR => b"<3>",
        Level::WARN => b"<4>",
        Level::INFO => b"<6>",
        Level::DEBUG | Level::TRACE => b"<7>",
    }
}

/// Whether stderr is the stream `JOURNAL_STREAM` names (`DEVICE:INODE`). Only then is a
/// prefix read as a priority; anywhere else it would be noise.
pub fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stat) = rustix::fs::fstat(std::io::stderr().as_fd()) else {
        return false;
    };
    journal_stream_matches(&stream.to_string_lossy(), stat.st_dev, stat.st_ino)
}

/// `JOURNAL_STREAM`'s `DEVICE:INODE` against a descriptor's.
pub fn journal_stream_matches(stream: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = stream.split_once(':') else {
        return false;
    };
    d.parse() == Ok(dev) && i.parse() == Ok(ino)
}

/// stderr, with each event's priority in front when `priorities` is on.
#[derive(Clone, Copy)]
pub struct Stderr {
    pub priorities: bool,
}

/// One event's writer: the prefix goes out with the event's first write. The formatter
/// writes a whole line at a time, so each line gets exactly one prefix.
pub struct LineWriter {
    prefix: Option<&'static [u8]>,
    out: std::io::Stderr,
}

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.prefix.take() {
            Some(p) => {
                let mut line = Vec::with_capacity(p.len() + buf.len());
                line.extend_from_slice(p);
                line.extend_from_slice(buf);
                self.out.write_all(&line)?;
                Ok(buf.len())
            }
            None => self.out.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        LineWriter {
            prefix: None,
            out: std::io::stderr(),
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> LineWriter {
        LineWriter {
            prefix: self.priorities.then(|| priority(meta.level())),
            out: std::io::stderr(),
        }
    }
}

/// Installs the tracing subscriber. `RUST_LOG` overrides the default level (info).
pub fn init_logging(format: crate::config::LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a person at a terminal: journald and files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let writer = Stderr {
        priorities: stderr_is_journal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    let _ = match format {
        crate::config::LogFormat::Text => builder.try_init(),
        crate::config::LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

#[cfg(test)]
mod tests;
