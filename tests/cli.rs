//! The compiled `switchyard` binary: `check` exit codes, examples, signals and draining.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[test]
fn check_exits_zero_on_a_good_file_and_one_with_every_problem() {
    let good = temp_config(
        "good",
        "[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\npool = \"p\"\n[pools.p]\nbackends = [\"127.0.0.1:1\"]\n",
    );
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = temp_config(
        "bad",
        "[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\npool = \"nope\"\n[pools.p]\nbackends = []\n",
    );
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("listeners[0].pool: unknown pool `nope`"),
        "{stderr}"
    );
    assert!(stderr.contains("pools.p.backends: empty"), "{stderr}");
    assert!(stderr.contains(&*bad.to_string_lossy()), "{stderr}");

    let missing = Command::new(BIN)
        .args(["check", "--config", "/nonexistent/switchyard.toml"])
        .output()
        .expect("runs");
    assert_eq!(missing.status.code(), Some(1));
    let _ = std::fs::remove_file(good);
    let _ = std::fs::remove_file(bad);
}

#[test]
fn every_example_config_passes_check() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut checked = 0;
    for dir in [dir, PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench")] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                let out = Command::new(BIN)
                    .args(["check", "--config"])
                    .arg(&path)
                    .output()
                    .expect("runs");
                assert!(
                    out.status.success(),
                    "{} fails check:\n{}",
                    path.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
                // Not even a warning (a certificate near its end, `verify = false`): an example
                // is what people copy.
                assert!(
                    out.stderr.is_empty(),
                    "{} draws warnings:\n{}",
                    path.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 0, "no example configs found");
}

#[test]
fn version_and_help() {
    let out = Command::new(BIN).arg("--version").output().expect("runs");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    let out = Command::new(BIN).arg("--help").output().expect("runs");
    let help = String::from_utf8_lossy(&out.stdout);
    for command in ["run", "check", "demo"] {
        assert!(help.contains(command), "{help}");
    }
}

#[test]
fn an_address_in_use_is_one_clear_line_and_exit_one() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let config = temp_config(
        "in-use",
        &format!(
            "[[listeners]]\nname = \"db\"\nbind = \"{addr}\"\nprotocol = \"tcp\"\npool = \"p\"\n\n[pools.p]\nbackends = [\"127.0.0.1:9\"]\n"
        ),
    );
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .expect("runs");
    let _ = std::fs::remove_file(&config);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = format!(
        "switchyard: {}: listeners[0].bind: listener `db`: cannot bind {addr}: ",
        config.display()
    );
    assert!(stderr.contains(&line), "{stderr}");
    // The reason once, not once more as a chained source.
    assert_eq!(stderr.matches("in use").count(), 1, "{stderr}");
}

/// A running `switchyard run` process and the address its listener got.
async fn run_binary(name: &str, backend: std::net::SocketAddr, drain: &str) -> Running {
    spawn_binary(
        name,
        &format!(
            "[global]\ndrain_timeout = \"{drain}\"\n[[listeners]]\nname = \"l4\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\npool = \"p\"\n[pools.p]\nbackends = [\"{backend}\"]\n"
        ),
    )
    .await
}

fn sigterm(child: &tokio::process::Child) {
    let pid = child.id().expect("running") as libc::pid_t;
    // SAFETY: kill(2) with a pid we started and a valid signal number.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
}

#[tokio::test]
async fn sigterm_lets_an_open_connection_finish_then_exits_zero() {
    let backend = Backend::echo().await;
    let mut running = run_binary("drain", backend.addr, "30s").await;
    let mut open = TcpStream::connect(running.addr).await.expect("connect");
    open.write_all(b"before").await.expect("write");
    let mut buf = [0u8; 6];
    open.read_exact(&mut buf).await.expect("echo");

    sigterm(&running.child);
    // New connections are refused once the listener has closed.
    let addr = running.addr;
    eventually_async("listener closed", || async move {
        TcpStream::connect(addr).await.is_err()
    })
    .await;
    // The open connection still works, in both directions, until it closes.
    open.write_all(b"after!")
        .await
        .expect("write after SIGTERM");
    open.read_exact(&mut buf).await.expect("echo after SIGTERM");
    assert_eq!(&buf, b"after!");
    assert!(
        running.child.try_wait().expect("status").is_none(),
        "exited while a connection was open"
    );
    open.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).await.expect("eof");
    let status = tokio::time::timeout(PATIENCE, running.child.wait())
        .await
        .expect("exits once drained")
        .expect("status");
    assert!(status.success(), "{status}");
}

/// Standard error can break under a running process (its reader gone: a pipe's end closed, a
/// journal restarted). Log lines are then lost, but serving and SIGTERM must go on as before.
#[tokio::test]
async fn a_broken_standard_error_neither_stops_serving_nor_the_shutdown() {
    let backend = Backend::echo().await;
    let config = temp_config("broken-stderr", &single_tcp_pool(&[backend.addr], "", ""));
    let mut child = tokio::process::Command::new(BIN)
        .args(["run", "--threads", "1", "--log-level", "debug", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starts");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let addr = listening_addr(&mut lines).await;
    // The reader goes: every log line from now on fails to be written.
    drop(lines);
    for _ in 0..3 {
        let mut client = TcpStream::connect(addr).await.expect("connect");
        client.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        tokio::time::timeout(PATIENCE, client.read_exact(&mut buf))
            .await
            .expect("echo in time")
            .expect("echo");
        assert_eq!(&buf, b"ping");
    }
    sigterm(&child);
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("exits after SIGTERM")
        .expect("status");
    let _ = std::fs::remove_file(&config);
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn the_drain_deadline_closes_what_is_left_and_exits_zero() {
    let backend = Backend::echo().await;
    let mut running = run_binary("deadline", backend.addr, "300ms").await;
    let mut open = TcpStream::connect(running.addr).await.expect("connect");
    open.write_all(b"x").await.expect("write");
    let mut one = [0u8; 1];
    open.read_exact(&mut one).await.expect("echo");
    sigterm(&running.child);
    let status = tokio::time::timeout(PATIENCE, running.child.wait())
        .await
        .expect("exits at the deadline")
        .expect("status");
    assert!(status.success(), "{status}");
    let n = tokio::time::timeout(PATIENCE, open.read(&mut one))
        .await
        .expect("closed");
    assert!(matches!(n, Ok(0) | Err(_)));
}

#[tokio::test]
async fn running_out_of_descriptors_backs_off_and_recovers() {
    let backend = Backend::echo().await;
    let config = temp_config("emfile", &single_tcp_pool(&[backend.addr], "", ""));
    // A hard limit of 48 descriptors: a few connections exhaust it.
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n 48 && exec {BIN} run --threads 1 --config {}",
            config.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starts");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let addr = listening_addr(&mut lines).await;
    let (saw_tx, saw_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut saw_tx = Some(saw_tx);
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("backing off")
                && let Some(tx) = saw_tx.take()
            {
                let _ = tx.send(());
            }
        }
    });

    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(
            TcpStream::connect(addr)
                .await
                .expect("the kernel queues the connection"),
        );
    }
    tokio::time::timeout(PATIENCE, saw_rx)
        .await
        .expect("accept backs off")
        .expect("log line");
    drop(held);
    // Once descriptors are free again, service resumes.
    let addr_copy = addr;
    eventually_async("served again", || async move {
        let Ok(mut s) = TcpStream::connect(addr_copy).await else {
            return false;
        };
        if s.write_all(b"ok").await.is_err() {
            return false;
        }
        let mut two = [0u8; 2];
        matches!(
            tokio::time::timeout(PATIENCE, s.read_exact(&mut two)).await,
            Ok(Ok(_))
        ) && &two == b"ok"
    })
    .await;
    assert!(
        child.try_wait().expect("status").is_none(),
        "the proxy died"
    );
    let _ = child.start_kill();
    let _ = std::fs::remove_file(config);
}

#[tokio::test]
async fn the_demo_routes_like_the_seed_table() {
    let mut child = tokio::process::Command::new(BIN)
        .args(["demo", "--any-port", "--log-level", "warn"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let (mut http, mut tcp) = (None, None);
    tokio::time::timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.expect("read") {
            if let Some(rest) = line.strip_prefix("Layer 7, http-demo on ") {
                http = rest
                    .split(':')
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(":")
                    .parse()
                    .ok();
            }
            if let Some(rest) = line.trim().strip_prefix("curl -s telnet://") {
                tcp = rest.split_whitespace().next().and_then(|a| a.parse().ok());
            }
            if line.starts_with("Press Ctrl-C") {
                break;
            }
        }
    })
    .await
    .expect("help printed");
    let http: std::net::SocketAddr = http.expect("http address printed");
    let mut client = HttpClient::connect(http).await;
    for (path, extra, expected) in [
        ("/", "", "hello from web-1\n"),
        ("/", "", "hello from web-2\n"),
        ("/api/users", "", "hello from api-1\n"),
        ("/static/a.css", "", "hello from static-1\n"),
        ("/", "X-API-Version: v2\r\n", "hello from v2-1\n"),
    ] {
        assert_eq!(client.get(path, extra).await.text(), expected, "{path}");
    }
    client
        .send(b"GET / HTTP/1.1\r\nHost: admin.example.com\r\n\r\n")
        .await;
    assert_eq!(
        client.reply().await.expect("reply").text(),
        "hello from admin-1\n"
    );
    let tcp: std::net::SocketAddr = tcp.expect("tcp address printed");
    assert_eq!(first_line(tcp).await, "hello from tcp-backend-1");
    let _ = child.start_kill();
}

#[test]
fn completions_are_printed_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .expect("runs");
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains("switchyard"), "{shell}: {script}");
        assert!(script.contains("config"), "{shell}: {script}");
    }
    let out = Command::new(BIN)
        .args(["completions", "tcsh"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
}

/// Runs `check` on `path` with `env` set (and nothing removed), returning the exit code and
/// stderr.
fn check_with_env(path: &std::path::Path, env: &[(&str, &std::ffi::OsStr)]) -> (i32, String) {
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(path)
        .envs(env.iter().map(|(k, v)| (*k, *v)))
        .output()
        .expect("runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_names_each_file_that_cannot_be_a_configuration() {
    // A directory, an empty file and a file that is not UTF-8: exit 1, with what is wrong.
    let dir = std::env::temp_dir().join(format!("switchyard-test-{}-dir", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let (code, stderr) = check_with_env(&dir, &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("cannot read"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    let empty = temp_config("empty", "");
    let (code, stderr) = check_with_env(&empty, &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("no listeners"), "{stderr}");

    // The second line holds a Latin-1 `é` (0xE9): its position is named, line 2, column 12.
    let latin1 = temp_config("latin1", "");
    std::fs::write(
        &latin1,
        b"[[listeners]]\nname = \"caf\xe9\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\npool = \"p\"\n",
    )
    .expect("write");
    let (code, stderr) = check_with_env(&latin1, &[]);
    assert_eq!(code, 1, "{stderr}");
    let want = format!("{}:2:12: ", latin1.display());
    assert!(stderr.starts_with(&want), "{stderr}");
    assert!(
        stderr.contains("not UTF-8") && stderr.contains("0xE9"),
        "{stderr}"
    );
    for path in [empty, latin1] {
        let _ = std::fs::remove_file(path);
    }
    let _ = std::fs::remove_dir(dir);
}

#[test]
fn check_reports_every_environment_variable_mistake_at_its_key() {
    let config = temp_config(
        "env-mistakes",
        concat!(
            "[[listeners]]\nname = \"a\"\n",
            // Two unset variables in one value: both are named.
            "bind = \"${SY_TEST_UNSET_HOST}:${SY_TEST_UNSET_PORT}\"\n",
            "protocol = \"tcp\"\npool = \"p\"\n[pools.p]\nbackends = [\n",
            "  \"${}\",\n",
            "  \"${1BAD}:1\",\n",
            // The shell's `${VAR-default}` is not what the file takes: `:-` is.
            "  \"${SY_TEST_UNSET_X-127.0.0.1:1}\",\n",
            // Defaults do not nest.
            "  \"${SY_TEST_UNSET_X:-${SY_TEST_UNSET_Y}}\",\n",
            // Set, but not UTF-8.
            "  \"${SY_TEST_LATIN1}:1\",\n",
            "  \"${SY_TEST_OPEN\",\n",
            "]\n",
        ),
    );
    let latin1 = <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"caf\xe9");
    let (code, stderr) = check_with_env(&config, &[("SY_TEST_LATIN1", latin1)]);
    assert_eq!(code, 1, "{stderr}");
    let file = config.display().to_string();
    let lines: Vec<&str> = stderr.lines().collect();
    let expect = |key: &str, needles: &[&str]| {
        let prefix = format!("{file}: {key}: ");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&prefix) && needles.iter().all(|n| l.contains(n))),
            "no line for {key} with {needles:?}:\n{stderr}"
        );
    };
    expect("listeners[0].bind", &["`SY_TEST_UNSET_HOST` is not set"]);
    expect("listeners[0].bind", &["`SY_TEST_UNSET_PORT` is not set"]);
    expect("pools.p.backends[0]", &["`${}` names no variable"]);
    expect("pools.p.backends[1]", &["`1BAD` is not a variable name"]);
    expect(
        "pools.p.backends[2]",
        &[
            "`SY_TEST_UNSET_X-127.0.0.1:1` is not a variable name",
            "`${SY_TEST_UNSET_X:-127.0.0.1:1}`",
        ],
    );
    expect("pools.p.backends[3]", &["a default cannot hold `${`"]);
    expect(
        "pools.p.backends[4]",
        &["`SY_TEST_LATIN1` is set, but its value is not UTF-8"],
    );
    expect("pools.p.backends[5]", &["`${` without a closing `}`"]);
    assert_eq!(lines.len(), 8, "one line per mistake:\n{stderr}");
    let _ = std::fs::remove_file(config);
}

#[test]
fn check_of_an_endless_file_stops_at_a_limit_instead_of_filling_memory() {
    // A device that never ends (a mistyped path, a tool's output given as the file).
    let started = std::time::Instant::now();
    let (code, stderr) = check_with_env(std::path::Path::new("/dev/zero"), &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.starts_with("/dev/zero: cannot read: ") && stderr.contains("MiB"),
        "{stderr}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

/// `switchyard run` on `path`, expected to fail before serving: its exit code and standard
/// error. One that starts serving instead is killed, and the test fails.
fn run_expecting_failure(path: &std::path::Path) -> (i32, String) {
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if child.try_wait().expect("status").is_some() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`run` started serving a configuration it should refuse");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_refuses_an_access_log_that_run_cannot_open_at_its_key() {
    let dir = temp_dir_for("check-access-log");
    let missing = dir.join("no-such-dir").join("access.log");
    let fresh = dir.join("fresh.log");
    let _ = std::fs::remove_file(&fresh);
    let config = temp_config(
        "access-log-dir",
        &format!(
            "[[listeners]]\nname = \"ok\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\npool = \"p\"\naccess_log = {{ path = \"{}\" }}\n\
             [[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ndefault_pool = \"p\"\naccess_log = {{ path = \"{}\" }}\n\
             [[listeners]]\nname = \"dir\"\nbind = \"127.0.0.1:0\"\nprotocol = \"udp\"\npool = \"p\"\naccess_log = {{ path = \"{}\" }}\n\
             [pools.p]\nbackends = [\"127.0.0.1:9\"]\n",
            fresh.display(),
            missing.display(),
            dir.display()
        ),
    );
    let (code, stderr) = check_with_env(&config, &[]);
    assert_eq!(code, 1, "{stderr}");
    let file = config.display().to_string();
    let web = format!("{file}: listeners[1].access_log.path: ");
    let udp = format!("{file}: listeners[2].access_log.path: ");
    assert!(
        stderr.contains(&web) && stderr.contains(&*missing.to_string_lossy()),
        "{stderr}"
    );
    assert!(stderr.contains("does not exist"), "{stderr}");
    assert!(stderr.contains(&udp), "{stderr}");
    assert_eq!(stderr.lines().count(), 2, "{stderr}");
    // Checking leaves nothing behind: the log that could be created is not.
    assert!(!fresh.exists(), "check created {}", fresh.display());

    // `run` refuses the same file, at the same key.
    let (code, stderr) = run_expecting_failure(&config);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(&web), "{stderr}");
    let _ = std::fs::remove_file(config);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn check_warns_of_a_bind_address_this_machine_does_not_have_which_run_refuses() {
    // 192.0.2.0/24 is set aside for documentation: no machine has it.
    let config = temp_config(
        "foreign-bind",
        "[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\npool = \"p\"\n\
         [[listeners]]\nname = \"b\"\nbind = \"192.0.2.1:0\"\nprotocol = \"udp\"\npool = \"p\"\n\
         [pools.p]\nbackends = [\"127.0.0.1:9\"]\n\
         [admin]\nbind = \"192.0.2.1:0\"\ntoken = \"0123456789abcdef0123\"\n",
    );
    // A warning only: the file may be meant for another machine.
    let (code, stderr) = check_with_env(&config, &[]);
    assert_eq!(code, 0, "{stderr}");
    let file = config.display().to_string();
    for key in ["listeners[1].bind", "admin.bind"] {
        let line = format!("{file}: {key}: warning: ");
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with(&line) && l.contains("192.0.2.1")),
            "{stderr}"
        );
    }
    assert_eq!(stderr.lines().count(), 2, "{stderr}");

    let (code, stderr) = run_expecting_failure(&config);
    assert_eq!(code, 1, "{stderr}");
    // A start stops at the first socket it cannot bind.
    assert!(
        ["listeners[1].bind", "admin.bind"]
            .iter()
            .any(|key| stderr.contains(&format!("{file}: {key}: "))),
        "{stderr}"
    );
    let _ = std::fs::remove_file(config);
}
