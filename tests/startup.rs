//! How a server starts: kept in a test binary of its own because it watches the server through
//! a tracing subscriber, and tracing decides once per call site (and per process) whether any
//! subscriber wants its events. Another test hitting a call site for the first time while this
//! one installs its subscriber can leave that call site silenced for good, so this test must
//! not share its process with tests that start servers.

mod common;

use common::{Backend, PATIENCE};

/// A connection may be served as soon as a server's first accept loop runs, on another thread
/// than the one still starting the rest: every task the server keeps for its whole life must
/// be running by then, or a count of tasks taken after a first connection (the baselines of
/// the resource tests in tests/tcp.rs) misses the ones that start later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_own_tasks_run_before_its_first_listener_accepts() {
    use std::future::Future;
    use tracing::instrument::WithSubscriber;

    let backend = Backend::echo().await;
    let config = format!(
        r#"
[[listeners]]
name = "first"
bind = "127.0.0.1:0"
protocol = "tcp"
pool = "p"

[[listeners]]
name = "second"
bind = "127.0.0.1:0"
protocol = "tcp"
pool = "p"

[pools.p]
backends = ["{}"]
"#,
        backend.addr
    );
    let config = switchyard::Config::from_toml(&config, std::path::Path::new("test.toml"))
        .expect("test config is valid");
    let server = switchyard::Server::bind(config).expect("binds");
    let shutdown = server.shutdown_token();
    // The server is held as it starts listener `second`, its first one's loop running.
    let (reached_tx, reached) = tokio::sync::oneshot::channel();
    let (release, released) = std::sync::mpsc::channel();
    let hold = HoldAtListener {
        name: "second",
        reached: std::sync::Mutex::new(Some(reached_tx)),
        release: std::sync::Mutex::new(released),
    };
    let (waiting_tx, waiting) = tokio::sync::oneshot::channel();
    let mut waiting_tx = Some(waiting_tx);
    let mut run = Box::pin(server.run().with_subscriber(hold));
    let task = tokio::spawn(std::future::poll_fn(move |cx| {
        let poll = run.as_mut().poll(cx);
        // Its first wait is for the shutdown: everything has started.
        if poll.is_pending()
            && let Some(tx) = waiting_tx.take()
        {
            let _ = tx.send(());
        }
        poll
    }));
    tokio::time::timeout(PATIENCE, reached)
        .await
        .expect("the second listener starts in time")
        .expect("held");
    let metrics = tokio::runtime::Handle::current().metrics();
    let when_the_first_accepts = metrics.num_alive_tasks();
    release.send(()).expect("still held");
    tokio::time::timeout(PATIENCE, waiting)
        .await
        .expect("started in time")
        .expect("run waits");
    // Since then, only the second listener's accept loop.
    assert_eq!(metrics.num_alive_tasks(), when_the_first_accepts + 1);
    shutdown.cancel();
    tokio::time::timeout(PATIENCE, task)
        .await
        .expect("stopped in time")
        .expect("server task");
}

/// Holds the thread that logs listener `name`'s start ("listening") until `release` says so,
/// after telling `reached`.
struct HoldAtListener {
    name: &'static str,
    reached: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl tracing::Subscriber for HoldAtListener {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = EventFields::default();
        event.record(&mut fields);
        let starts = fields.0.iter().any(|f| f == "message=listening")
            && fields
                .0
                .iter()
                .any(|f| *f == format!("listener={}", self.name));
        if !starts {
            return;
        }
        let reached = self
            .reached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(reached) = reached {
            let _ = reached.send(());
            let release = self.release.lock().unwrap_or_else(|p| p.into_inner());
            let _ = release.recv_timeout(PATIENCE);
        }
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

/// An event's fields as `name=value`.
#[derive(Default)]
struct EventFields(Vec<String>);

impl tracing::field::Visit for EventFields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push(format!("{}={value:?}", field.name()));
    }
}
