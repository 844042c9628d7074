//! Starting a nats-server child process of a test's own.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Spawns `cmd` (a nats-server with its arguments, listening on `port`) and
/// waits for its "Server is ready" log line; panics with the server's log if
/// it exits first or is not ready within 30 s.
pub async fn start_and_wait_ready(mut cmd: Command, port: u16) -> Child {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
    let stderr = child.stderr.take().unwrap();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut ready = Some(ready_tx);
        let mut seen = Vec::new();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains("Server is ready") {
                if let Some(tx) = ready.take() {
                    let _ = tx.send(Ok(()));
                }
            } else if ready.is_some() {
                seen.push(line);
            }
        }
        if let Some(tx) = ready.take() {
            let _ = tx.send(Err(seen.join("\n")));
        }
    });
    match tokio::time::timeout(Duration::from_secs(30), ready_rx).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(log))) => panic!("nats-server on port {port} exited before it was ready:\n{log}"),
        other => panic!("nats-server on port {port} not ready: {other:?}"),
    }
    child
}
