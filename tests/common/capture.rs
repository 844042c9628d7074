//! Everything a test binary logs, captured as text: a `tracing` subscriber
//! at TRACE with span events, writing into one buffer, so a test can grep
//! the log (e.g. for planted secrets, `tests/*_security.rs`).

use std::io::Write;
use std::sync::Mutex;

static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the capturing subscriber as the global default. Call once per
/// test binary (behind a `Once`).
pub fn install() {
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::FULL)
        .with_ansi(false)
        .with_writer(|| Capture)
        .init();
}

/// The log so far.
pub fn log_text() -> String {
    String::from_utf8_lossy(&LOG.lock().unwrap()).into_owned()
}
