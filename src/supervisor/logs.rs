//! Output capture: per-process FIFOs drained asynchronously into size-rotated files and a ring buffer.
//!
//! Each process id owns two named pipes, `<state_dir>/fifo/<name>.stdout` and `.stderr`. The child gets them
//! as stdout/stderr opened read-write, so it never sees EPIPE even while no supervisor is reading, and a
//! restarted supervisor re-opens the same FIFOs and goes on reading what an adopted child writes (anonymous
//! pipes would die with the old supervisor). The pipe buffer is raised (default 1 MiB) to ride out that gap.
//!
//! A reader task per stream never waits for the disk: it splits lines into the ring buffer (for `log_tail`)
//! and hands chunks to a writer task through a bounded queue. When the queue is full, or the disk fails,
//! bytes are dropped and counted, so a child can never block on a full pipe because of a slow or broken disk.
//! Files are `<log_dir>/<name>.stdout.log` and `<name>.stderr.log`, rotated to `.1` … `.<backups>` when a
//! write would pass `max_bytes`.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::error::SupervisorError;

/// Log capture settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogConfig {
    /// Rotate a log file before it grows past this size (0: never rotate).
    pub max_bytes: u64,
    /// Rotated files kept (`.1` newest); 0 truncates instead.
    pub backups: u32,
    /// Lines kept in memory per process for `log_tail`.
    pub tail_lines: usize,
    /// Longer lines are split.
    pub max_line_bytes: usize,
    /// Requested pipe buffer size (`F_SETPIPE_SZ`, best effort).
    pub pipe_bytes: usize,
    /// Chunks queued between reader and writer before bytes are dropped.
    pub queue_chunks: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            max_bytes: 10 * 1024 * 1024,
            backups: 5,
            tail_lines: 1000,
            max_line_bytes: 16 * 1024,
            pipe_bytes: 1024 * 1024,
            queue_chunks: 1024,
        }
    }
}

/// A file-name-safe form of a process id (`Storage Manager` → `Storage_Manager`).
pub fn file_stem(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect::<String>()
        .trim_start_matches('.')
        .to_owned()
}

/// The last lines of a process's output (stdout and stderr interleaved in arrival order).
#[derive(Debug, Default)]
pub(crate) struct Ring {
    lines: VecDeque<String>,
    cap: usize,
}

impl Ring {
    fn push(&mut self, line: String) {
        if self.cap == 0 {
            return;
        }
        while self.lines.len() >= self.cap {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    pub(crate) fn tail(&self, n: usize) -> Vec<String> {
        let skip = self.lines.len().saturating_sub(n);
        self.lines.iter().skip(skip).cloned().collect()
    }
}

/// The capture of one process id; lives as long as its definition.
pub(crate) struct LogSink {
    pub stdout_fifo: PathBuf,
    pub stderr_fifo: PathBuf,
    pub stdout_log: PathBuf,
    pub stderr_log: PathBuf,
    ring: Arc<Mutex<Ring>>,
    dropped: Arc<AtomicU64>,
    cancel: CancellationToken,
}

impl LogSink {
    /// Creates (or re-opens) the FIFOs and starts the reader and writer tasks. Must run inside a runtime.
    pub(crate) fn open(stem: &str, fifo_dir: &Path, log_dir: &Path, cfg: &LogConfig) -> Result<Self, SupervisorError> {
        let sink = LogSink {
            stdout_fifo: fifo_dir.join(format!("{stem}.stdout")),
            stderr_fifo: fifo_dir.join(format!("{stem}.stderr")),
            stdout_log: log_dir.join(format!("{stem}.stdout.log")),
            stderr_log: log_dir.join(format!("{stem}.stderr.log")),
            ring: Arc::new(Mutex::new(Ring {
                lines: VecDeque::new(),
                cap: cfg.tail_lines,
            })),
            dropped: Arc::new(AtomicU64::new(0)),
            cancel: CancellationToken::new(),
        };
        for (fifo, log) in [
            (&sink.stdout_fifo, &sink.stdout_log),
            (&sink.stderr_fifo, &sink.stderr_log),
        ] {
            ensure_fifo(fifo)?;
            // Read-write: the FIFO never reports EOF, and opening does not wait for a writer.
            let rx = pipe::OpenOptions::new()
                .read_write(true)
                .open_receiver(fifo)
                .map_err(|e| SupervisorError::io(format!("opening {}", fifo.display()), e))?;
            if let Ok(size) = i32::try_from(cfg.pipe_bytes) {
                if let Err(e) = nix::fcntl::fcntl(&rx, nix::fcntl::FcntlArg::F_SETPIPE_SZ(size)) {
                    tracing::debug!(fifo = %fifo.display(), error = %e, "cannot enlarge the pipe buffer");
                }
            }
            let (tx, queue) = mpsc::channel::<Vec<u8>>(cfg.queue_chunks.max(1));
            tokio::spawn(read_stream(
                rx,
                tx,
                sink.ring.clone(),
                sink.dropped.clone(),
                cfg.max_line_bytes.max(1),
                sink.cancel.clone(),
            ));
            tokio::spawn(write_stream(queue, log.clone(), cfg.clone(), sink.dropped.clone()));
        }
        Ok(sink)
    }

    /// The child's stdout and stderr: the FIFOs opened read-write (blocking), so writes never fail with EPIPE.
    pub(crate) fn child_stdio(&self) -> io::Result<(File, File)> {
        let open = |p: &Path| OpenOptions::new().read(true).write(true).open(p);
        Ok((open(&self.stdout_fifo)?, open(&self.stderr_fifo)?))
    }

    pub(crate) fn tail(&self, n: usize) -> Vec<String> {
        self.ring.lock().unwrap_or_else(PoisonError::into_inner).tail(n)
    }

    /// Bytes of output that could not be written to the log files.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Stops the tasks; `remove` also deletes the FIFOs (definition removed, not a supervisor restart).
    pub(crate) fn close(&self, remove: bool) {
        self.cancel.cancel();
        if remove {
            let _ = std::fs::remove_file(&self.stdout_fifo);
            let _ = std::fs::remove_file(&self.stderr_fifo);
        }
    }
}

impl Drop for LogSink {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Makes `path` a FIFO, keeping an existing one (an adopted child may still be writing into it).
fn ensure_fifo(path: &Path) -> Result<(), SupervisorError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_fifo() => return Ok(()),
        Ok(_) => std::fs::remove_file(path)
            .map_err(|e| SupervisorError::io(format!("removing non-FIFO {}", path.display()), e))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(SupervisorError::io(format!("inspecting {}", path.display()), e)),
    }
    nix::unistd::mkfifo(path, Mode::S_IRUSR | Mode::S_IWUSR)
        .map_err(|e| SupervisorError::io(format!("mkfifo {}", path.display()), io::Error::from(e)))
}

async fn read_stream(
    mut rx: pipe::Receiver,
    tx: mpsc::Sender<Vec<u8>>,
    ring: Arc<Mutex<Ring>>,
    dropped: Arc<AtomicU64>,
    max_line: usize,
    cancel: CancellationToken,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut partial: Vec<u8> = Vec::new();
    loop {
        let n = tokio::select! {
            _ = cancel.cancelled() => break,
            r = rx.read(&mut buf) => match r {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted || e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "log pipe read failed; capture stopped");
                    break;
                }
            },
        };
        let chunk = &buf[..n];
        if let Err(e) = tx.try_send(chunk.to_vec()) {
            let lost = match e {
                mpsc::error::TrySendError::Full(v) | mpsc::error::TrySendError::Closed(v) => v.len(),
            };
            dropped.fetch_add(lost as u64, Ordering::Relaxed);
        }
        let mut lines = Vec::new();
        for &b in chunk {
            if b == b'\n' {
                lines.push(take_line(&mut partial));
            } else {
                partial.push(b);
                if partial.len() >= max_line {
                    lines.push(take_line(&mut partial));
                }
            }
        }
        if !lines.is_empty() {
            let mut ring = ring.lock().unwrap_or_else(PoisonError::into_inner);
            for l in lines {
                ring.push(l);
            }
        }
    }
}

fn take_line(partial: &mut Vec<u8>) -> String {
    let mut line = String::from_utf8_lossy(partial).into_owned();
    partial.clear();
    if line.ends_with('\r') {
        line.pop();
    }
    line
}

/// Appends queued chunks to `path`, rotating by size. Errors drop the chunk (counted) and re-open next time.
async fn write_stream(mut queue: mpsc::Receiver<Vec<u8>>, path: PathBuf, cfg: LogConfig, dropped: Arc<AtomicU64>) {
    let mut file: Option<(tokio::fs::File, u64)> = None;
    let mut errors: u64 = 0;
    while let Some(first) = queue.recv().await {
        let mut batch = first;
        while batch.len() < 256 * 1024 {
            match queue.try_recv() {
                Ok(more) => batch.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if let Err(e) = write_batch(&mut file, &path, &cfg, &batch).await {
            errors += 1;
            if errors == 1 || errors.is_power_of_two() {
                tracing::warn!(path = %path.display(), error = %e, errors, "log write failed; output dropped");
            }
            dropped.fetch_add(batch.len() as u64, Ordering::Relaxed);
            file = None;
        }
    }
}

async fn write_batch(
    file: &mut Option<(tokio::fs::File, u64)>,
    path: &Path,
    cfg: &LogConfig,
    mut data: &[u8],
) -> io::Result<()> {
    while !data.is_empty() {
        let (f, size) = match file {
            Some(open) => open,
            None => {
                let f = open_log(path, false).await?;
                let size = f.metadata().await?.len();
                file.insert((f, size))
            }
        };
        let room = if cfg.max_bytes == 0 {
            u64::MAX
        } else {
            cfg.max_bytes.saturating_sub(*size)
        };
        let take = if (data.len() as u64) <= room {
            data.len()
        } else {
            // Cut at the last newline that fits; rotate first if none does and the file is not empty.
            let room = usize::try_from(room).unwrap_or(usize::MAX).min(data.len());
            match data[..room].iter().rposition(|b| *b == b'\n') {
                Some(i) => i + 1,
                None if *size > 0 => 0,
                None => room.max(1),
            }
        };
        if take > 0 {
            f.write_all(&data[..take]).await?;
            f.flush().await?;
            *size += take as u64;
            data = &data[take..];
        }
        if !data.is_empty() {
            *file = None;
            rotate(path, cfg.backups).await?;
        }
    }
    Ok(())
}

/// Opens a log file for appending (or truncates it) without following a symlink (`O_NOFOLLOW`), and only
/// when it is a regular file owned by us: a link or a file planted in a shared log directory cannot make the
/// daemon write elsewhere. New files are created mode 0640.
pub(crate) async fn open_log(path: &Path, truncate: bool) -> io::Result<tokio::fs::File> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || open_owned_file(&path, truncate))
        .await
        .map_err(io::Error::other)?
        .map(tokio::fs::File::from_std)
}

/// The blocking part of `open_log`; also used for the housekeeping CSV files.
pub fn open_owned_file(path: &Path, truncate: bool) -> io::Result<File> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let mut opts = OpenOptions::new();
    opts.create(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC);
    if truncate {
        opts.write(true).truncate(true);
    } else {
        opts.append(true);
    }
    let f = opts.open(path)?;
    let m = f.metadata()?;
    if !m.file_type().is_file() {
        return Err(io::Error::other(format!(
            "{} is not a regular file; not written",
            path.display()
        )));
    }
    let me = nix::unistd::geteuid().as_raw();
    if m.uid() != me {
        return Err(io::Error::other(format!(
            "{} belongs to uid {}, not to us ({me}); not written",
            path.display(),
            m.uid()
        )));
    }
    Ok(f)
}

/// `name.log` → `name.log.1` → … → `name.log.<backups>` (the oldest is overwritten); 0 backups truncates.
async fn rotate(path: &Path, backups: u32) -> io::Result<()> {
    let numbered = |i: u32| {
        let mut s = path.as_os_str().to_owned();
        s.push(format!(".{i}"));
        PathBuf::from(s)
    };
    if backups == 0 {
        open_log(path, true).await?;
        return Ok(());
    }
    for i in (1..backups).rev() {
        match tokio::fs::rename(numbered(i), numbered(i + 1)).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    tokio::fs::rename(path, numbered(1)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems_are_file_safe() {
        assert_eq!(file_stem("Storage Manager"), "Storage_Manager");
        assert_eq!(file_stem("../x/y"), "_x_y");
        assert_eq!(file_stem("DUMMY_01"), "DUMMY_01");
    }

    #[test]
    fn ring_keeps_last_lines() {
        let mut r = Ring {
            lines: VecDeque::new(),
            cap: 3,
        };
        for i in 0..5 {
            r.push(i.to_string());
        }
        assert_eq!(r.tail(10), ["2", "3", "4"]);
        assert_eq!(r.tail(1), ["4"]);
    }
}
