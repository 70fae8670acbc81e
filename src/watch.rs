//! `run --watch`: reloads the configuration when its file changes.
//!
//! Editors and deployment tools replace a file by writing another and renaming it over the
//! first, which a watch on the file itself would lose; so the directory is watched (and, when
//! the file is a symbolic link, the directory of its target too). Events come in bursts (one
//! save can be a create, a write, a close and a rename), so the watcher waits until the
//! directory has been quiet for [`DEBOUNCE`] and then reads the file: if its bytes are those it
//! saw last, nothing happens, otherwise the server reloads it. A file that is missing is waited
//! for; one that is half written fails validation, and the reload changes nothing, until the
//! next change brings a file that validates.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tracing::{debug, info, warn};

use crate::server::ServerHandle;
use crate::sys::{Inotify, InotifyEvent};

/// How long the directory must be quiet before the file is read: one save is one reload.
pub const DEBOUNCE: Duration = Duration::from_millis(150);

/// The longest a stream of events can put a reload off.
pub const MAX_DELAY: Duration = Duration::from_secs(1);

/// What happens in a directory that can change the file at a path in it: entries created,
/// written, renamed in or out, deleted. The directory's own removal ends the watch
/// (`IN_IGNORED`, which is always reported).
const MASK: u32 = libc::IN_CLOSE_WRITE
    | libc::IN_MOVED_TO
    | libc::IN_MOVED_FROM
    | libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_ONLYDIR;

/// Why the configuration file cannot be watched.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The kernel refused an inotify instance or a watch on the directory.
    #[error("cannot watch {}: {source}", dir.display())]
    Watch {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What the watcher last read from the file.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Content(Vec<u8>),
    Missing,
    /// Unreadable for another reason: the next change is read again whatever it is.
    Unknown,
}

/// A watch on the configuration file's directory, ready to run.
pub struct Watcher {
    inotify: AsyncFd<Inotify>,
    /// Live watch descriptors; the watcher ends when none is left.
    watches: Vec<i32>,
    path: PathBuf,
    last: Seen,
}

impl Watcher {
    /// Watches the directory of `path` (and of its target, if it is a symbolic link). Must be
    /// called within the Tokio runtime. The file as it is now is taken as the one loaded, so
    /// call this before loading it: a change in between is then seen as a change.
    pub fn new(path: &Path) -> Result<Watcher, WatchError> {
        let dir = parent(path);
        let error = |dir: &Path| {
            let dir = dir.to_path_buf();
            move |source| WatchError::Watch { dir, source }
        };
        let inotify = Inotify::new().map_err(error(&dir))?;
        let mut watches = vec![inotify.add_watch(&dir, MASK).map_err(error(&dir))?];
        if let Ok(target) = std::fs::canonicalize(path) {
            let target_dir = parent(&target);
            if std::fs::canonicalize(&dir).is_ok_and(|d| d != target_dir) {
                let wd = inotify
                    .add_watch(&target_dir, MASK)
                    .map_err(error(&target_dir))?;
                watches.push(wd);
            }
        }
        let inotify = inotify.into_async().map_err(error(&dir))?;
        Ok(Watcher {
            inotify,
            watches,
            path: path.to_path_buf(),
            last: read(path),
        })
    }

    /// Reloads through `handle` after each change, until the server shuts down.
    pub async fn run(mut self, handle: ServerHandle) {
        let shutdown = handle.shutdown_token();
        info!(file = %self.path.display(), "watching the configuration file");
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                more = self.wait_for_events() => if !more { return },
            }
            // Let the burst end: each event restarts the quiet period, up to MAX_DELAY.
            let give_up = tokio::time::Instant::now() + MAX_DELAY;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(DEBOUNCE) => break,
                    _ = tokio::time::sleep_until(give_up) => break,
                    more = self.wait_for_events() => if !more { return },
                }
            }
            self.check(&handle).await;
        }
    }

    /// Waits for at least one event. Returns false when no watch is left.
    async fn wait_for_events(&mut self) -> bool {
        loop {
            let events = match self.inotify.readable().await {
                Ok(mut guard) => match guard.try_io(|fd| fd.get_ref().read_events()) {
                    Ok(Ok(events)) => events,
                    Ok(Err(error)) => {
                        warn!(%error, "reading file events failed; --watch stops");
                        return false;
                    }
                    Err(_would_block) => continue,
                },
                Err(error) => {
                    warn!(%error, "waiting for file events failed; --watch stops");
                    return false;
                }
            };
            self.forget_removed(&events);
            if self.watches.is_empty() {
                warn!(file = %self.path.display(), "the configuration's directory is gone; --watch stops");
                return false;
            }
            if !events.is_empty() {
                return true;
            }
        }
    }

    fn forget_removed(&mut self, events: &[InotifyEvent]) {
        for event in events {
            if event.mask & libc::IN_IGNORED != 0 {
                self.watches.retain(|&wd| wd != event.wd);
            }
        }
    }

    /// Reads the file and reloads it if it differs from what was seen last.
    async fn check(&mut self, handle: &ServerHandle) {
        let path = self.path.clone();
        let now = tokio::task::spawn_blocking(move || read(&path))
            .await
            .unwrap_or(Seen::Unknown);
        if now == self.last && now != Seen::Unknown {
            debug!("configuration file unchanged");
            return;
        }
        match &now {
            Seen::Missing => warn!(
                file = %self.path.display(),
                "the configuration file is gone; the running configuration stays until it is back"
            ),
            Seen::Unknown => {}
            Seen::Content(_) => {
                info!(file = %self.path.display(), "configuration file changed: reloading");
                // The outcome (applied, or refused with the reason) is logged by the reload.
                let _ = handle.reload_file().await;
            }
        }
        self.last = now;
    }
}

fn read(path: &Path) -> Seen {
    match crate::config::read_file(path) {
        Ok(bytes) => Seen::Content(bytes),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Seen::Missing,
        Err(error) => {
            warn!(file = %path.display(), %error, "cannot read the configuration file");
            Seen::Unknown
        }
    }
}

/// The directory holding `path` (`.` for a bare file name).
fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
