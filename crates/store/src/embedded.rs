//! An embedded PostgreSQL: when `DATABASE_URL` is unset the service runs its
//! own cluster from the machine's PostgreSQL binaries, under a data directory
//! of its own, and stops it on shutdown.
//!
//! PostgreSQL refuses to run as root, so when we are root the cluster runs as
//! the unprivileged `nobody` user. A data directory `nobody` cannot reach (a
//! checkout under `/root`) is swapped for one it can, derived from the
//! requested path, so the same checkout always finds the same cluster.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use nix::unistd::{Gid, Uid, User};
use tokio::process::Command;

use crate::PgError;

const DATABASE: &str = "spot_runners";
const ROLE: &str = "spot_runners";

/// Where a data directory `nobody` cannot reach is moved to, in this order:
/// the first that can be created and is reachable wins.
const FALLBACK_ROOTS: &[&str] = &["/var/lib/spot-runners"];

#[derive(Clone, Debug, Default)]
pub struct EmbeddedOptions {
    /// Turn off `fsync` (throwaway test clusters only: a crash loses data).
    pub unsafe_no_fsync: bool,
    /// Parents to move an unreachable data directory under (default
    /// `/var/lib/spot-runners`, then the system temp directory).
    pub fallback_roots: Option<Vec<PathBuf>>,
}

/// A running local cluster.
pub struct EmbeddedPostgres {
    bin: PathBuf,
    pgdata: PathBuf,
    run_as: Option<(Uid, Gid)>,
    password: String,
    port: u16,
    /// We started it (rather than finding it already running), so we stop it.
    owned: bool,
}

impl std::fmt::Debug for EmbeddedPostgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedPostgres")
            .field("pgdata", &self.pgdata)
            .field("owned", &self.owned)
            .finish_non_exhaustive()
    }
}

fn err(msg: impl Into<String>) -> PgError {
    PgError::Embedded(msg.into())
}

/// Finds a directory holding `initdb` and `pg_ctl`: `SPOT_RUNNERS_PG_BIN`,
/// then Debian's `/usr/lib/postgresql/<version>/bin` (newest first), then
/// `PATH`.
pub fn find_binaries() -> Result<PathBuf, PgError> {
    let has_both = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("SPOT_RUNNERS_PG_BIN") {
        let dir = PathBuf::from(dir);
        return if has_both(&dir) {
            Ok(dir)
        } else {
            Err(err(format!(
                "SPOT_RUNNERS_PG_BIN={} holds no initdb and pg_ctl",
                dir.display()
            )))
        };
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, d)| has_both(d))
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Ok(dir);
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|d| has_both(d))
        .ok_or_else(|| {
            err(
                "no PostgreSQL server binaries found (looked for initdb and pg_ctl in \
                 SPOT_RUNNERS_PG_BIN, /usr/lib/postgresql/*/bin and PATH): install them \
                 (Debian: apt-get install postgresql) or set DATABASE_URL to an existing database",
            )
        })
}

fn free_port() -> Result<u16, PgError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(PgError::io("finding a free port"))?;
    Ok(l.local_addr()
        .map_err(PgError::io("finding a free port"))?
        .port())
}

fn random_password() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    // Two independently seeded SipHashes: 128 random bits without another
    // dependency. The cluster only listens on loopback; this keeps other
    // local users out.
    (0..2)
        .map(|_| format!("{:016x}", RandomState::new().build_hasher().finish()))
        .collect()
}

impl EmbeddedPostgres {
    /// Starts (initialising on first use) the cluster under `root`, or adopts
    /// one already running there.
    pub async fn start(root: &Path, options: &EmbeddedOptions) -> Result<Self, PgError> {
        let bin = find_binaries()?;
        std::fs::create_dir_all(root)
            .map_err(PgError::io(format!("creating {}", root.display())))?;
        let root = std::fs::canonicalize(root)
            .map_err(PgError::io(format!("resolving {}", root.display())))?;
        let run_as = if Uid::effective().is_root() {
            let nobody = User::from_name("nobody").ok().flatten().ok_or_else(|| {
                err("running as root, and there is no `nobody` user to run PostgreSQL as")
            })?;
            Some((nobody.uid, nobody.gid))
        } else {
            None
        };
        let root = match run_as {
            Some((uid, _)) if !reachable_by_others(&root) => {
                let moved = reachable_home(&root, options)?;
                tracing::warn!(
                    requested = %root.display(),
                    data_dir = %moved.display(),
                    "PostgreSQL runs as `nobody` (uid {uid}), who cannot reach the requested data \
                     directory; using one it can reach instead (set SPOT_RUNNERS_DATA_DIR to choose)"
                );
                moved
            }
            _ => root,
        };
        let pgdata = root.join("pgdata");
        let mut pg = EmbeddedPostgres {
            bin,
            pgdata,
            run_as,
            password: String::new(),
            port: 0,
            owned: false,
        };
        let password = pg.ensure_initialised(&root).await?;
        let port = match pg.running_port() {
            Some(port) => {
                tracing::info!(pgdata = %pg.pgdata.display(), port, "using the embedded PostgreSQL that is already running");
                port
            }
            None => {
                let port = free_port()?;
                pg.pg_ctl_start(&root, port, options).await?;
                pg.owned = true;
                tracing::info!(pgdata = %pg.pgdata.display(), port, "started embedded PostgreSQL");
                port
            }
        };
        pg.password = password;
        pg.port = port;
        Ok(pg)
    }

    /// The cluster's data directory (where it really lives, after any move
    /// to a place `nobody` can reach).
    pub fn pgdata(&self) -> &Path {
        &self.pgdata
    }

    /// Connection URL of the service's database (holds the password:
    /// never log it).
    pub fn url(&self) -> String {
        self.url_of(DATABASE)
    }

    /// The URL of the maintenance database, for creating others.
    pub fn admin_url(&self) -> String {
        self.url_of("postgres")
    }

    fn url_of(&self, database: &str) -> String {
        format!(
            "postgres://{ROLE}:{}@127.0.0.1:{}/{database}",
            self.password, self.port
        )
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.stdin(Stdio::null()).kill_on_drop(true);
        cmd.env("LC_ALL", "C").env_remove("PGDATA");
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid.as_raw()).gid(gid.as_raw());
        }
        cmd
    }

    fn chown(&self, path: &Path) -> Result<(), PgError> {
        if let Some((uid, gid)) = self.run_as {
            nix::unistd::chown(path, Some(uid), Some(gid))
                .map_err(|e| err(format!("chown {}: {e}", path.display())))?;
        }
        Ok(())
    }

    async fn run(&self, mut cmd: Command, what: &str) -> Result<(), PgError> {
        let out = cmd
            .output()
            .await
            .map_err(PgError::io(format!("running {what}")))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(err(format!(
                "{what} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    /// Runs `initdb` when the cluster does not exist yet; returns the role's
    /// password.
    async fn ensure_initialised(&self, root: &Path) -> Result<String, PgError> {
        let password_file = root.join("password");
        if self.pgdata.join("PG_VERSION").is_file() {
            return std::fs::read_to_string(&password_file)
                .map(|s| s.trim().to_owned())
                .map_err(PgError::io(format!("reading {}", password_file.display())));
        }
        if let Some((uid, _)) = self.run_as {
            if !reachable_by_others(root) {
                return Err(err(format!(
                    "running as root, PostgreSQL must run as `nobody` (uid {uid}), who cannot reach {}; \
                     set SPOT_RUNNERS_DATA_DIR to a directory all users can traverse \
                     (e.g. /var/lib/spot-runners) or set DATABASE_URL",
                    root.display()
                )));
            }
        }
        let password = random_password();
        write_private(&password_file, &password)?;
        let _ = std::fs::remove_dir_all(&self.pgdata);
        std::fs::create_dir_all(&self.pgdata)
            .map_err(PgError::io(format!("creating {}", self.pgdata.display())))?;
        self.chown(&self.pgdata)?;
        // initdb reads the superuser password from a file it can open.
        let pwfile = self.pgdata.with_extension("pwfile");
        write_private(&pwfile, &password)?;
        self.chown(&pwfile)?;
        let mut cmd = self.command("initdb");
        cmd.arg("-D")
            .arg(&self.pgdata)
            .args([
                "-U",
                ROLE,
                "-E",
                "UTF8",
                "--no-locale",
                "--auth=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()));
        let result = self.run(cmd, "initdb").await;
        let _ = std::fs::remove_file(&pwfile);
        result?;
        Ok(password)
    }

    /// The port of a postmaster already running on this data directory.
    fn running_port(&self) -> Option<u16> {
        let pid_file = std::fs::read_to_string(self.pgdata.join("postmaster.pid")).ok()?;
        let mut lines = pid_file.lines();
        let pid: i32 = lines.next()?.trim().parse().ok()?;
        let port: u16 = lines.nth(2)?.trim().parse().ok()?;
        // Signal 0 checks the process exists without touching it.
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
            .ok()
            .map(|_| port)
    }

    async fn pg_ctl_start(
        &self,
        root: &Path,
        port: u16,
        options: &EmbeddedOptions,
    ) -> Result<(), PgError> {
        let log = root.join("postgres.log");
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(PgError::io(format!("creating {}", log.display())))?;
        self.chown(&log)?;
        let mut server_opts = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories='' -c max_connections=200"
        );
        if options.unsafe_no_fsync {
            server_opts.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
        }
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.pgdata)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "-o", &server_opts, "start"])
            .kill_on_drop(false);
        self.run(cmd, "pg_ctl start")
            .await
            .map_err(|e| err(format!("{e} (see {})", log.display())))?;
        // Create our database on first start.
        let admin = format!(
            "postgres://{ROLE}:{}@127.0.0.1:{port}/postgres",
            std::fs::read_to_string(root.join("password"))
                .map_err(PgError::io("reading the password file"))?
                .trim()
        );
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin).await?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(DATABASE)
                .fetch_one(&mut conn)
                .await?;
        if !exists {
            sqlx::query(&format!("CREATE DATABASE {DATABASE}"))
                .execute(&mut conn)
                .await?;
        }
        sqlx::Connection::close(conn).await?;
        Ok(())
    }

    /// Stops the cluster if this process started it.
    pub async fn stop(self) -> Result<(), PgError> {
        if !self.owned {
            return Ok(());
        }
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.pgdata)
            .args(["-m", "fast", "-w", "-t", "30", "stop"]);
        self.run(cmd, "pg_ctl stop").await?;
        tracing::info!(pgdata = %self.pgdata.display(), "stopped embedded PostgreSQL");
        Ok(())
    }

    /// Forgets that we own it: it keeps running after we exit (shared test
    /// clusters). Returns the maintenance database's URL.
    pub fn detach(mut self) -> String {
        self.owned = false;
        self.admin_url()
    }
}

fn write_private(path: &Path, contents: &str) -> Result<(), PgError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(PgError::io(format!("writing {}", path.display())))?;
    f.write_all(contents.as_bytes())
        .map_err(PgError::io(format!("writing {}", path.display())))
}

/// A home for the cluster of `requested` that other users can reach: under
/// the first fallback root that can be made reachable, named after the
/// requested path (its last component, for people, and a digest of the
/// whole, so two checkouts never share a cluster).
fn reachable_home(requested: &Path, options: &EmbeddedOptions) -> Result<PathBuf, PgError> {
    use sha2::Digest;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    let digest = sha2::Sha256::digest(requested.as_os_str().as_bytes());
    let tail: String = requested
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let name = format!("{}-{}", tail.trim_matches('_'), hex::encode(&digest[..8]));
    let roots = options.fallback_roots.clone().unwrap_or_else(|| {
        FALLBACK_ROOTS
            .iter()
            .map(PathBuf::from)
            .chain([std::env::temp_dir().join("spot-runners")])
            .collect()
    });
    let mut tried = Vec::new();
    for base in roots {
        let dir = base.join(&name);
        let made = std::fs::create_dir_all(&dir).and_then(|()| {
            for d in [&base, &dir] {
                let mut perms = std::fs::metadata(d)?.permissions();
                perms.set_mode(perms.mode() | 0o711);
                std::fs::set_permissions(d, perms)?;
            }
            Ok(())
        });
        match made {
            Ok(()) if reachable_by_others(&dir) => return Ok(dir),
            Ok(()) => tried.push(format!(
                "{} (a parent is closed to other users)",
                dir.display()
            )),
            Err(e) => tried.push(format!("{} ({e})", dir.display())),
        }
    }
    Err(err(format!(
        "running as root, PostgreSQL must run as `nobody`, who cannot reach {}, and no \
         fallback could be used: {}; set SPOT_RUNNERS_DATA_DIR to a directory all users can \
         traverse (e.g. /var/lib/spot-runners) or set DATABASE_URL",
        requested.display(),
        tried.join(", ")
    )))
}

/// Every ancestor of `dir` lets other users through (o+x), and `dir` itself
/// is not hidden either.
fn reachable_by_others(dir: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    dir.ancestors().all(|d| {
        std::fs::metadata(d)
            .map(|m| m.permissions().mode() & 0o001 != 0)
            .unwrap_or(false)
    })
}
