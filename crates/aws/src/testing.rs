//! Test support: one real moto server per test process, started from
//! `MOTO_SERVER`, `PATH` or the workspace's `.venv`, with the AWS SDK's
//! environment pointed at it. Used by this crate's and the server's tests.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Kept for the life of the test process. Nothing here is ever dropped
/// (statics are not), so the server is stopped by the closing pipe instead:
/// see [`spawn`].
pub struct Moto {
    pub endpoint: String,
    /// Every request moto received, one JSON object a line (moto's
    /// recorder): what the SDK really sent, for what moto does not model.
    recording: PathBuf,
    _child: Mutex<Child>,
    _lifeline: Mutex<ChildStdin>,
}

static MOTO: OnceLock<Result<Moto, String>> = OnceLock::new();

/// The shared server; every test calls this before touching AWS config.
/// The environment is written only inside this initialiser, which every
/// other test waits on, so no thread reads it while it changes.
pub fn moto() -> &'static Moto {
    MOTO.get_or_init(|| {
        let moto = start_moto()?;
        std::env::set_var("AWS_REGION", "us-east-1");
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_ENDPOINT_URL", &moto.endpoint);
        // Either would send requests somewhere other than this moto.
        std::env::remove_var("AWS_ENDPOINT_URL_EC2");
        std::env::remove_var("AWS_PROFILE");
        std::env::remove_var("AWS_SESSION_TOKEN");
        Ok(moto)
    })
    .as_ref()
    .unwrap_or_else(|err| panic!("{err}"))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn find_moto() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("MOTO_SERVER").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("MOTO_SERVER={} is not a file", path.display()))
        };
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("moto_server"))
                .find(|candidate| candidate.is_file())
        })
        .unwrap_or_default();
    let venv = workspace_root().join(".venv/bin/moto_server");
    on_path
        .or_else(|| venv.is_file().then_some(venv))
        .ok_or_else(|| {
            "moto_server not found: set MOTO_SERVER, put moto_server on PATH, or \
         install it with `python3 -m venv .venv && .venv/bin/pip install 'moto[server]'` \
         in the workspace root"
                .to_owned()
        })
}

fn start_moto() -> Result<Moto, String> {
    let binary = find_moto()?;
    let mut last_error = String::new();
    // The port is free when picked but could be taken before moto binds it;
    // moto then exits and another port is tried.
    for _ in 0..3 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map_err(|e| format!("no free loopback port: {e}"))?
            .port();
        let log = std::env::temp_dir().join(format!("spot-runners-moto-{port}.log"));
        let recording =
            std::env::temp_dir().join(format!("spot-runners-moto-{port}.requests.jsonl"));
        let _ = std::fs::remove_file(&recording);
        let (mut child, lifeline) = spawn(&binary, port, &log, &recording)?;
        match wait_until_ready(&mut child, port) {
            Ok(()) => {
                return Ok(Moto {
                    endpoint: format!("http://127.0.0.1:{port}"),
                    recording,
                    _child: Mutex::new(child),
                    _lifeline: Mutex::new(lifeline),
                })
            }
            Err(err) => {
                let output = std::fs::read_to_string(&log).unwrap_or_default();
                last_error = format!(
                    "{} (port {port}): {err}\n--- {} ---\n{output}",
                    binary.display(),
                    log.display()
                );
                drop(lifeline);
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
    Err(format!("moto_server did not start: {last_error}"))
}

/// Runs moto under a small shell that kills it once our end of its stdin
/// pipe closes, which happens however this process ends (even SIGKILL).
/// The shell itself exits with moto, so an early death is visible.
fn spawn(
    binary: &Path,
    port: u16,
    log: &Path,
    recording: &Path,
) -> Result<(Child, ChildStdin), String> {
    let script = r#"exec 3<&0 </dev/null
"$0" -H 127.0.0.1 -p "$1" >"$2" 2>&1 &
pid=$!
{ read -r _ <&3; kill "$pid" 2>/dev/null; } &
wait "$pid""#;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(binary)
        .arg(port.to_string())
        .arg(log)
        .env("MOTO_ENABLE_RECORDING", "true")
        .env("MOTO_RECORDER_FILEPATH", recording)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run sh for {}: {e}", binary.display()))?;
    let lifeline = child.stdin.take().ok_or("moto_server has no stdin pipe")?;
    Ok((child, lifeline))
}

fn wait_until_ready(child: &mut Child, port: u16) -> Result<(), String> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited early with {status}"));
        }
        if answers_as_moto(port) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("no answer within {STARTUP_TIMEOUT:?}"));
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// `/moto-api/` is moto's dashboard: a 200 there means this port is moto,
/// not some other process that grabbed it.
fn answers_as_moto(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let request = format!("GET /moto-api/ HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && &head[9..12] == b"200"
}

/// The form fields of every EC2 query-protocol request moto has received
/// for `action` (e.g. `RunInstances`), in arrival order, decoded.
pub fn recorded_requests(action: &str) -> Vec<std::collections::BTreeMap<String, String>> {
    use base64::prelude::{Engine as _, BASE64_STANDARD};
    let text = std::fs::read_to_string(&moto().recording).unwrap_or_default();
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|entry| {
            let body = entry["body"].as_str()?;
            let body = if entry["body_encoded"] == true {
                String::from_utf8(BASE64_STANDARD.decode(body).ok()?).ok()?
            } else {
                body.to_owned()
            };
            let fields: std::collections::BTreeMap<String, String> =
                form_urlencoded::parse(body.as_bytes())
                    .into_owned()
                    .collect();
            (fields.get("Action").map(String::as_str) == Some(action)).then_some(fields)
        })
        .collect()
}

/// A parameter as moto holds it, read behind the adapter's back (tests of
/// the server cannot build the SSM SDK themselves).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MotoParameter {
    /// Decrypted.
    pub value: String,
    pub secure: bool,
    pub tags: std::collections::BTreeMap<String, String>,
}

/// `None` when moto has no parameter of that name.
pub async fn moto_parameter(name: &str) -> Option<MotoParameter> {
    moto();
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await;
    let ssm = aws_sdk_ssm::Client::new(&config);
    let got = ssm
        .get_parameter()
        .name(name)
        .with_decryption(true)
        .send()
        .await
        .ok()?;
    let p = got.parameter()?;
    let tags = ssm
        .list_tags_for_resource()
        .resource_type(aws_sdk_ssm::types::ResourceTypeForTagging::Parameter)
        .resource_id(name)
        .send()
        .await
        .expect("ListTagsForResource on moto");
    Some(MotoParameter {
        value: p.value().unwrap_or_default().to_owned(),
        secure: p.r#type() == Some(&aws_sdk_ssm::types::ParameterType::SecureString),
        tags: tags
            .tag_list()
            .iter()
            .map(|t| (t.key().to_owned(), t.value().to_owned()))
            .collect(),
    })
}
