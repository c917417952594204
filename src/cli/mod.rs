//! The `cryptvol` command line: clap commands, a thin client of the control API (no rule is
//! implemented twice). The only part that uses `anyhow` and decides process exit codes.

mod audit;
mod client;
mod output;
mod snapshot;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

use crate::config::{Config, DEFAULT_CONTROL_SOCKET};

#[derive(Parser)]
#[command(
    name = "cryptvol",
    version,
    about = "Encrypted virtual disks over NBD, with a local key manager"
)]
struct Cli {
    /// Control socket of the daemon (default: from --config, else /run/cryptvol/control.sock)
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Daemon configuration file (TOML)
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Machine output: one JSON document on stdout
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the state dir (0700) and a random 256-bit root key (0600)
    Init {
        #[arg(long)]
        state_dir: PathBuf,
    },
    /// Run the daemon in the foreground (systemd Type=notify)
    Serve,
    /// Temp state dir, a key, a 1 GiB volume, attached and served: the newcomer's command
    Demo,
    /// Customer master keys (CMKs)
    #[command(subcommand)]
    Key(KeyCmd),
    /// Data keys (envelope encryption)
    #[command(subcommand)]
    Datakey(DatakeyCmd),
    /// Envelope encryption of files
    #[command(subcommand)]
    Envelope(EnvelopeCmd),
    /// Encrypted volumes
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// The audit log
    #[command(subcommand)]
    Audit(AuditCmd),
    /// NBD load generator
    Bench(crate::bench::BenchArgs),
    /// Writes the man pages (one per subcommand) into DIR (packaging)
    #[command(hide = true)]
    Man {
        #[arg(long)]
        out: PathBuf,
    },
    /// Writes bash, zsh and fish completions into DIR (packaging)
    #[command(hide = true)]
    Completions {
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeyCmd {
    /// create-key; prints key_id
    Create {
        #[arg(long)]
        alias: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List the customer master keys
    List,
    /// Show one key (id or alias): state, versions, deletion date
    Describe { key: String },
    /// Enable a disabled key
    Enable { key: String },
    /// Disable a key: no new wrap or unwrap (attached volumes keep running)
    Disable { key: String },
    /// New key version; old versions keep decrypting
    Rotate { key: String },
    /// Schedule the key's destruction after --pending-days
    ScheduleDeletion {
        key: String,
        #[arg(long)]
        pending_days: u32,
    },
    /// Cancel a scheduled deletion (the key comes back disabled)
    CancelDeletion { key: String },
    /// Move a file-custody key into the PKCS#11 token ([kms] custody = "pkcs11"): a
    /// non-extractable object per version, every volume under it re-wrapped, the sealed
    /// material dropped. Client-held cipher texts of the key stop decrypting unless
    /// --keep-file-material (re-encrypt them, then run again without it).
    ImportToHsm {
        key: String,
        #[arg(long)]
        keep_file_material: bool,
    },
    /// After switching to [kms] store = "rados": move this host's local key records
    /// (keys.json) into the shared records, then destroy the local store. Runs with the
    /// daemon stopped (needs --config); idempotent; an alias or key id the shared records
    /// hold differently is refused and nothing is moved.
    MigrateRecords,
}

#[derive(Args)]
struct DatakeyOpts {
    #[arg(long)]
    key: String,
    /// Length in bits
    #[arg(long, default_value_t = 512)]
    length: u32,
    /// Encryption context entry K=V (repeatable)
    #[arg(long = "context", value_parser = parse_kv)]
    context: Vec<(String, String)>,
}

#[derive(Subcommand)]
enum DatakeyCmd {
    /// create-datakey: a data key, in plain and wrapped
    Create(DatakeyOpts),
    /// create-datakey-without-plaintext: a wrapped data key only
    CreateWithoutPlaintext(DatakeyOpts),
    /// encrypt-datakey: wrap a data key (hex) under a key
    Encrypt {
        #[arg(long)]
        key: String,
        #[arg(long)]
        plain_text: String,
        #[arg(long = "context", value_parser = parse_kv)]
        context: Vec<(String, String)>,
    },
    /// decrypt-datakey: unwrap a wrapped data key
    Decrypt {
        #[arg(long)]
        cipher_text: String,
        #[arg(long = "context", value_parser = parse_kv)]
        context: Vec<(String, String)>,
    },
}

#[derive(Subcommand)]
enum EnvelopeCmd {
    /// Encrypt a file under a fresh data key wrapped by --key
    Encrypt {
        #[arg(long)]
        key: String,
        input: PathBuf,
        output: PathBuf,
    },
    /// Decrypt an envelope file
    Decrypt { input: PathBuf, output: PathBuf },
}

#[derive(Subcommand)]
enum VolumeCmd {
    /// Create an encrypted volume (a sparse file) with its own data key
    Create {
        name: String,
        #[arg(long, required_unless_present = "from_snapshot")]
        size: Option<String>,
        /// A copy of snapshot VOLUME@SNAPSHOT, with its own volume id; its data key
        /// re-wrapped under --key (default: the snapshot's key)
        #[arg(long, conflicts_with_all = ["size", "encrypt_zeroes", "store", "pool"])]
        from_snapshot: Option<String>,
        /// With --from-snapshot: cap on the copy, like 200M per second (0 = unlimited)
        #[arg(long, requires = "from_snapshot", default_value = "0")]
        max_rate: String,
        #[arg(long)]
        key: Option<String>,
        #[arg(long, default_value_t = 4096)]
        sector_size: u32,
        /// Store all-zero data encrypted too, so the backing file does not show which blocks
        /// are zero (default: thin, zero blocks stored as zeros; see docs/volume-format.md)
        #[arg(long)]
        encrypt_zeroes: bool,
        /// Where the volume lives: `file` (the state dir) or `rbd` (an image in the [ceph]
        /// cluster); default: [volumes] store
        #[arg(long)]
        store: Option<String>,
        /// The pool of an RBD volume (default: [ceph] pool)
        #[arg(long)]
        pool: Option<String>,
        /// Cap on requests per second (0 = unlimited)
        #[arg(long, default_value_t = 0)]
        iops: u64,
        /// Cap on bytes per second, like 200M (binary units; 0 = unlimited)
        #[arg(long, default_value = "0")]
        bandwidth: String,
        /// `writeback` (page cache, default) or `none` (O_DIRECT: no page cache; needs a file
        /// system with direct I/O, not tmpfs)
        #[arg(long, value_parser = ["writeback", "none"])]
        cache: Option<String>,
    },
    /// Create a volume from a raw image, encrypting it on the way in
    Import {
        name: String,
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        key: Option<String>,
        /// `file` or `rbd` (default: [volumes] store)
        #[arg(long)]
        store: Option<String>,
        /// The pool of an RBD volume (default: [ceph] pool)
        #[arg(long)]
        pool: Option<String>,
    },
    /// List the volumes and whether they are attached
    List,
    /// Show a volume's header: size, sector size, key, state
    Inspect { name: String },
    /// Unwrap the volume's key and serve it over NBD
    Attach {
        name: String,
        #[arg(long)]
        read_only: bool,
        /// RBD volume held by another host: break its lock (the cluster blocklists it, so
        /// it never writes to the volume again) and take it over
        #[arg(long)]
        takeover: bool,
    },
    /// Stop serving a volume and wipe its key from memory
    Detach {
        name: String,
        #[arg(long)]
        force: bool,
    },
    /// Grow only, while detached
    Resize {
        name: String,
        #[arg(long)]
        size: String,
    },
    /// Re-wrap the DEK under the key's newest version
    Rewrap { name: String },
    /// Re-encrypt the data online to a fresh DEK (under --key or the volume's key);
    /// crash-safe, resumes after a restart; --pause/--resume control one in progress
    Reencrypt {
        name: String,
        /// The CMK of the new DEK (default: the volume's)
        #[arg(long)]
        key: Option<String>,
        /// Cap on bytes re-encrypted per second, like 200M (0 = unlimited)
        #[arg(long)]
        max_rate: Option<String>,
        /// Wait until done (a progress bar on a TTY)
        #[arg(long)]
        wait: bool,
        #[arg(long, conflicts_with = "resume")]
        pause: bool,
        #[arg(long)]
        resume: bool,
    },
    /// Change QoS limits, online (0 = unlimited; a limit not given is kept), or the cache
    /// mode (from the next attach)
    Set {
        name: String,
        /// Requests per second
        #[arg(long)]
        iops: Option<u64>,
        /// Bytes per second, like 200M
        #[arg(long)]
        bandwidth: Option<String>,
        /// Cache mode, `writeback` or `none`; takes effect at the next attach
        #[arg(long, value_parser = ["writeback", "none"])]
        cache: Option<String>,
    },
    /// Delete a detached volume and its file
    Delete {
        name: String,
        /// Delete its snapshots too (refused otherwise while it has any)
        #[arg(long)]
        with_snapshots: bool,
    },
    /// Snapshots: point-in-time, read-only copies (attach NAME@SNAP --read-only)
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCmd),
    /// Write the decrypted raw image of NAME or NAME@SNAP into FILE (holes kept)
    Export {
        name: String,
        #[arg(long)]
        to: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Verify the keyed chain and, through the daemon, that nothing was replaced or cut;
    /// report the first broken record
    Verify {
        /// Without the daemon: the chain only, with the root key from --config
        #[arg(long)]
        offline: bool,
    },
    /// The daemon's chain head: last seq and hash, the file it appends to
    Head,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not K=V"))
}

fn ctx(kv: &[(String, String)]) -> Value {
    Value::Object(
        kv.iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect(),
    )
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            if json {
                println!("{}", json!({"error": {"error_msg": msg}}));
            }
            eprintln!("cryptvol: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// Log filter unless CRYPTVOL_LOG is set. rustls warns about peers' protocol quirks that no
/// operator can act on (libnbd/GnuTLS send an IP address as SNI: a warning per connection).
const DEFAULT_LOG: &str = "info,rustls=error";

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::prelude::*;
    // No key byte is ever logged.
    let filter =
        EnvFilter::try_from_env("CRYPTVOL_LOG").unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG));
    // Started by systemd with stderr connected to the journal: log natively, one journal
    // entry per event with its fields (`journalctl -u cryptvol VOLUME=vol1`). Field names
    // unprefixed and upper-cased: `volume` -> VOLUME=, `key_id` -> KEY_ID=, `peer_uid` ->
    // PEER_UID=, `client` -> CLIENT=.
    if stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer
                    .with_field_prefix(None)
                    .with_syslog_identifier("cryptvol".into());
                let _ = tracing_subscriber::registry()
                    .with(layer.with_filter(filter))
                    .try_init();
                return;
            }
            Err(e) => eprintln!("cryptvol: journal socket: {e}; logging to stderr"),
        }
    }
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}

/// `JOURNAL_STREAM` names (device:inode) the stream systemd connected to stderr; a process
/// that inherited the variable but whose stderr goes elsewhere (a script's `2>file`) logs to
/// stderr (systemd.exec(5)).
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    std::fs::metadata("/proc/self/fd/2").is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// The command tree for man pages and completions, without the packaging commands.
fn docs_command() -> clap::Command {
    use clap::CommandFactory;
    Cli::command()
        .mut_subcommand("man", |c| c.hide(true))
        .mut_subcommand("completions", |c| c.hide(true))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn socket_path(cli: &Cli) -> Result<PathBuf> {
    if let Some(s) = &cli.socket {
        return Ok(s.clone());
    }
    if let Some(c) = &cli.config {
        return Ok(Config::load(c)?.control_socket);
    }
    Ok(PathBuf::from(DEFAULT_CONTROL_SOCKET))
}

fn run(cli: Cli) -> Result<()> {
    match &cli.cmd {
        Cmd::Init { state_dir } => {
            let key = crate::daemon::init_state_dir(state_dir)?;
            output::print(
                cli.json,
                &json!({"state_dir": state_dir, "root_key_file": key}),
                |_| {
                    format!(
                        "initialised {} (root key {})",
                        state_dir.display(),
                        key.display()
                    )
                },
            );
            Ok(())
        }
        Cmd::Serve => {
            let path = cli
                .config
                .as_ref()
                .ok_or_else(|| anyhow!("serve needs --config FILE"))?;
            let cfg = Config::load(path)?;
            init_logging();
            runtime()?
                .block_on(crate::daemon::serve(cfg))
                .map_err(|e| anyhow!(e))
        }
        Cmd::Demo => {
            init_logging();
            runtime()?
                .block_on(crate::daemon::demo())
                .map_err(|e| anyhow!(e))
        }
        Cmd::Bench(args) => crate::bench::run(args.clone(), cli.json).map_err(|e| anyhow!(e)),
        Cmd::Key(KeyCmd::MigrateRecords) => {
            let path = cli
                .config
                .as_ref()
                .ok_or_else(|| anyhow!("key migrate-records needs --config FILE"))?;
            let cfg = Config::load(path)?;
            let v = crate::daemon::migrate::migrate_key_records(&cfg).map_err(|e| anyhow!(e))?;
            output::print(cli.json, &v, |v| {
                format!(
                    "{} key(s) moved into {}, {} already there; the local key store is removed",
                    v["added"].as_array().map_or(0, Vec::len),
                    output::s(&v["records"]),
                    v["already_present"].as_array().map_or(0, Vec::len)
                )
            });
            Ok(())
        }
        Cmd::Audit(AuditCmd::Verify { offline: true }) => {
            audit::verify_offline(cli.config.as_deref(), cli.json)
        }
        Cmd::Man { out } => {
            std::fs::create_dir_all(out).with_context(|| out.display().to_string())?;
            // cryptvol.1, cryptvol-volume.1, cryptvol-volume-create.1, ... (hidden ones not).
            clap_mangen::generate_to(docs_command(), out)
                .with_context(|| format!("man pages into {}", out.display()))
        }
        Cmd::Completions { out } => {
            use clap_complete::Shell;
            std::fs::create_dir_all(out).with_context(|| out.display().to_string())?;
            for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
                clap_complete::generate_to(shell, &mut docs_command(), "cryptvol", out)
                    .with_context(|| format!("{shell} completion into {}", out.display()))?;
            }
            Ok(())
        }
        _ => {
            let sock = socket_path(&cli)?;
            runtime()?.block_on(client_command(&cli, &sock))
        }
    }
}

async fn kms(sock: &Path, op: &str, body: Value) -> Result<Value> {
    client::call(sock, "POST", &format!("/v1/kms/{op}"), Some(body)).await
}

async fn client_command(cli: &Cli, sock: &Path) -> Result<()> {
    let j = cli.json;
    match &cli.cmd {
        Cmd::Key(k) => {
            let v = match k {
                KeyCmd::Create { alias, description } => {
                    kms(
                        sock,
                        "create-key",
                        json!({"key_alias": alias, "key_description": description}),
                    )
                    .await?
                }
                KeyCmd::List => kms(sock, "list-keys", json!({})).await?,
                KeyCmd::MigrateRecords => unreachable!("handled in run"),
                KeyCmd::Describe { key } => {
                    kms(sock, "describe-key", json!({"key_id": key})).await?
                }
                KeyCmd::Enable { key } => kms(sock, "enable-key", json!({"key_id": key})).await?,
                KeyCmd::Disable { key } => kms(sock, "disable-key", json!({"key_id": key})).await?,
                KeyCmd::Rotate { key } => kms(sock, "rotate-key", json!({"key_id": key})).await?,
                KeyCmd::ScheduleDeletion { key, pending_days } => {
                    kms(
                        sock,
                        "schedule-key-deletion",
                        json!({"key_id": key, "pending_days": pending_days.to_string()}),
                    )
                    .await?
                }
                KeyCmd::CancelDeletion { key } => {
                    kms(sock, "cancel-key-deletion", json!({"key_id": key})).await?
                }
                KeyCmd::ImportToHsm {
                    key,
                    keep_file_material,
                } => {
                    kms(
                        sock,
                        "import-key-to-hsm",
                        json!({"key_id": key, "keep_file_material": keep_file_material}),
                    )
                    .await?
                }
            };
            match k {
                KeyCmd::Create { .. } => {
                    output::print(j, &v, |v| output::s(&v["key_info"]["key_id"]))
                }
                KeyCmd::List => {
                    output::print(j, &v, |v| output::key_table(v["key_details"].as_array()))
                }
                _ if v.get("key_info").is_some() => {
                    output::print(j, &v, |v| output::fields(&v["key_info"]))
                }
                _ => output::print(j, &v, output::fields),
            }
        }
        Cmd::Datakey(d) => {
            let v = match d {
                DatakeyCmd::Create(o) => {
                    kms(sock, "create-datakey", json!({"key_id": o.key, "datakey_length": o.length.to_string(), "encryption_context": ctx(&o.context)})).await?
                }
                DatakeyCmd::CreateWithoutPlaintext(o) => {
                    kms(sock, "create-datakey-without-plaintext", json!({"key_id": o.key, "datakey_length": o.length.to_string(), "encryption_context": ctx(&o.context)})).await?
                }
                DatakeyCmd::Encrypt { key, plain_text, context } => {
                    kms(sock, "encrypt-datakey", json!({"key_id": key, "plain_text": plain_text, "encryption_context": ctx(context)})).await?
                }
                DatakeyCmd::Decrypt { cipher_text, context } => {
                    kms(sock, "decrypt-datakey", json!({"cipher_text": cipher_text, "encryption_context": ctx(context)})).await?
                }
            };
            output::print(j, &v, output::fields);
        }
        Cmd::Envelope(e) => envelope(sock, j, e).await?,
        Cmd::Volume(v) => volume(sock, j, v).await?,
        Cmd::Audit(AuditCmd::Verify { .. }) => audit::verify(sock, j).await?,
        Cmd::Audit(AuditCmd::Head) => audit::head(sock, j).await?,
        Cmd::Init { .. }
        | Cmd::Serve
        | Cmd::Demo
        | Cmd::Bench(_)
        | Cmd::Man { .. }
        | Cmd::Completions { .. } => unreachable!("handled in run"),
    }
    Ok(())
}

async fn envelope(sock: &Path, j: bool, e: &EnvelopeCmd) -> Result<()> {
    use crate::kms::envelope;
    let purpose = json!({envelope::CONTEXT_KEY: envelope::CONTEXT_VALUE});
    match e {
        EnvelopeCmd::Encrypt {
            key,
            input,
            output: out,
        } => {
            let v = kms(
                sock,
                "create-datakey",
                json!({"key_id": key, "datakey_length": "256", "encryption_context": purpose}),
            )
            .await?;
            let dek = zeroize::Zeroizing::new(hex::decode(output::s(&v["plain_text"]))?);
            let wrapped = hex::decode(output::s(&v["cipher_text"]))?;
            let r = std::io::BufReader::new(
                std::fs::File::open(input).with_context(|| input.display().to_string())?,
            );
            let w = std::io::BufWriter::new(
                std::fs::File::create(out).with_context(|| out.display().to_string())?,
            );
            let n = envelope::encrypt(&dek, &wrapped, r, w)?;
            output::print(
                j,
                &json!({"bytes": n, "key_id": v["key_id"], "output": out}),
                |_| format!("encrypted {n} bytes into {}", out.display()),
            );
        }
        EnvelopeCmd::Decrypt { input, output: out } => {
            let mut r = std::io::BufReader::new(
                std::fs::File::open(input).with_context(|| input.display().to_string())?,
            );
            let (header, wrapped) = envelope::read_header(&mut r)?;
            let v = kms(
                sock,
                "decrypt-datakey",
                json!({"cipher_text": hex::encode(&wrapped), "encryption_context": purpose}),
            )
            .await?;
            let dek = zeroize::Zeroizing::new(hex::decode(output::s(&v["data_key"]))?);
            // Decrypt into a temp file and rename: a tampered input leaves no partial output.
            let tmp = out.with_extension("partial");
            let w = std::io::BufWriter::new(
                std::fs::File::create(&tmp).with_context(|| tmp.display().to_string())?,
            );
            match envelope::decrypt(&dek, &header, r, w) {
                Ok(n) => {
                    std::fs::rename(&tmp, out)?;
                    output::print(j, &json!({"bytes": n, "output": out}), |_| {
                        format!("decrypted {n} bytes into {}", out.display())
                    });
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e.into());
                }
            }
        }
    }
    Ok(())
}

fn size_arg(s: &str) -> Result<u64> {
    crate::daemon::parse_size(s)
        .ok_or_else(|| anyhow!("size {s:?}: use bytes or a suffix K, M, G, T"))
}

async fn volume(sock: &Path, j: bool, v: &VolumeCmd) -> Result<()> {
    let path = |name: &str, action: &str| format!("/v1/volumes/{name}/{action}");
    let info = match v {
        VolumeCmd::Create { name, from_snapshot: Some(from), key, max_rate, .. } => {
            client::call(sock, "POST", "/v1/volumes", Some(json!({"name": name, "from_snapshot": from, "key_id": key, "max_rate": size_arg(max_rate)?.to_string()}))).await?
        }
        VolumeCmd::Create { name, size, key, sector_size, encrypt_zeroes, store, pool, iops, bandwidth, cache, .. } => {
            let size = size.as_deref().ok_or_else(|| anyhow!("--size is required"))?;
            client::call(sock, "POST", "/v1/volumes", Some(json!({"name": name, "size": size_arg(size)?.to_string(), "key_id": key, "sector_size": sector_size.to_string(), "encrypt_zeroes": encrypt_zeroes, "store": store, "pool": pool, "iops": iops.to_string(), "bandwidth": size_arg(bandwidth)?.to_string(), "cache": cache}))).await?
        }
        VolumeCmd::Import { name, from, key, store, pool } => {
            import(sock, name, from, key.as_deref(), [("store", store), ("pool", pool)]).await?
        }
        VolumeCmd::List => {
            let l = client::call(sock, "GET", "/v1/volumes", None).await?;
            output::print(j, &l, |l| output::volume_table(l["volumes"].as_array()));
            return Ok(());
        }
        VolumeCmd::Inspect { name } => client::call(sock, "GET", &format!("/v1/volumes/{name}"), None).await?,
        VolumeCmd::Attach { name, read_only, takeover } => {
            client::call(sock, "POST", &path(name, "attach"), Some(json!({"read_only": read_only, "takeover": takeover}))).await?
        }
        VolumeCmd::Detach { name, force } => {
            client::call(sock, "POST", &path(name, "detach"), Some(json!({"force": force}))).await?
        }
        VolumeCmd::Resize { name, size } => {
            client::call(sock, "POST", &path(name, "resize"), Some(json!({"size": size_arg(size)?.to_string()}))).await?
        }
        VolumeCmd::Rewrap { name } => client::call(sock, "POST", &path(name, "rewrap"), Some(json!({}))).await?,
        VolumeCmd::Reencrypt { name, key, max_rate, wait, pause, resume } => {
            let rate = max_rate.as_deref().map(size_arg).transpose()?.map(|r| r.to_string());
            let body = json!({"key": key, "max_rate": rate, "pause": pause, "resume": resume});
            let info = client::call(sock, "POST", &path(name, "reencrypt"), Some(body)).await?;
            if *wait { reencrypt_wait(sock, name).await? } else { info }
        }
        VolumeCmd::Set { name, iops, bandwidth, cache } => {
            let bandwidth = bandwidth.as_deref().map(size_arg).transpose()?.map(|b| b.to_string());
            let body = json!({"iops": iops.map(|i| i.to_string()), "bandwidth": bandwidth, "cache": cache});
            client::call(sock, "POST", &path(name, "set"), Some(body)).await?
        }
        VolumeCmd::Snapshot(cmd) => return snapshot::snapshot(sock, j, cmd).await,
        VolumeCmd::Export { name, to } => return snapshot::export(sock, j, name, to).await,
        VolumeCmd::Delete { name, with_snapshots } => {
            let q = if *with_snapshots { "?with_snapshots=true" } else { "" };
            let r = client::call(sock, "DELETE", &format!("/v1/volumes/{name}{q}"), None).await?;
            output::print(j, &r, |_| format!("deleted {name}"));
            return Ok(());
        }
    };
    output::print(j, &info, output::fields);
    Ok(())
}

/// Polls a re-encryption until it is done (a progress bar on a TTY); fails if it is paused.
async fn reencrypt_wait(sock: &Path, name: &str) -> Result<Value> {
    use std::io::IsTerminal;
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(100);
        b.set_style(
            indicatif::ProgressStyle::with_template("re-encrypting {bar:40} {pos}% {elapsed}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    loop {
        let info = client::call(sock, "GET", &format!("/v1/volumes/{name}"), None).await?;
        let r = &info["reencrypt"];
        if let Some(b) = &bar {
            b.set_position(r["percent"].as_u64().unwrap_or(100));
        }
        match r["state"].as_str() {
            Some("running") => {}
            Some("paused") => bail!("volume {name}: the re-encryption is paused"),
            _ => {
                if let Some(b) = bar {
                    b.finish_and_clear();
                }
                return Ok(info);
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Streams an image to the daemon, with a progress bar on a TTY.
async fn import(
    sock: &Path,
    name: &str,
    from: &Path,
    key: Option<&str>,
    place: [(&str, &Option<String>); 2],
) -> Result<Value> {
    use std::io::{IsTerminal, Read};
    let mut f = std::fs::File::open(from).with_context(|| from.display().to_string())?;
    let size = f.metadata()?.len();
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(size);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(b)
    } else {
        None
    };
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let b2 = bar.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if let Some(b) = &b2 {
                        b.inc(n as u64);
                    }
                    if tx
                        .blocking_send(Ok(bytes::Bytes::copy_from_slice(&buf[..n])))
                        .is_err()
                    {
                        break;
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    break;
                }
            }
        }
    });
    let mut q = format!("/v1/volumes/{name}/import?size={size}");
    if let Some(k) = key {
        q.push_str(&format!("&key_id={k}"));
    }
    for (k, v) in place {
        if let Some(v) = v {
            q.push_str(&format!("&{k}={v}"));
        }
    }
    let r = client::call_stream(sock, &q, rx).await;
    let _ = reader.join();
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    r
}
