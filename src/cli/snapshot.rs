//! `volume snapshot create|list|delete` and `volume export`: clients of the snapshot and
//! export routes. Export writes the image sparse: holes are seeked over, never written.

use std::io::IsTerminal;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Subcommand;
use http_body_util::BodyExt;
use serde_json::{Value, json};

use super::{client, output, size_arg};
use crate::api::export::{Decoder, Item};

#[derive(Subcommand)]
pub enum SnapshotCmd {
    /// Take a point-in-time snapshot of a volume (also while attached and written)
    Create {
        name: String,
        snapshot: String,
        /// Return once the snapshot is taken, not when its copy is complete
        #[arg(long)]
        no_wait: bool,
        /// Cap on the background copy (copy path), like 200M per second (0 = unlimited)
        #[arg(long, default_value = "0")]
        max_rate: String,
    },
    /// List snapshots (of one volume, or all)
    List { name: Option<String> },
    /// Delete snapshots NAME@SNAP
    Delete {
        #[arg(required = true)]
        snapshots: Vec<String>,
    },
}

fn snap_path(full: &str) -> Result<String> {
    let (v, s) = full
        .split_once('@')
        .ok_or_else(|| anyhow!("{full:?}: expected VOLUME@SNAPSHOT"))?;
    Ok(format!("/v1/volumes/{v}/snapshots/{s}"))
}

pub async fn snapshot(sock: &Path, j: bool, cmd: &SnapshotCmd) -> Result<()> {
    match cmd {
        SnapshotCmd::Create {
            name,
            snapshot,
            no_wait,
            max_rate,
        } => {
            let body = json!({"name": snapshot, "max_rate": size_arg(max_rate)?.to_string()});
            let mut v = client::call(
                sock,
                "POST",
                &format!("/v1/volumes/{name}/snapshots"),
                Some(body),
            )
            .await?;
            let pause = v["pause_us"].clone();
            if !no_wait && v["state"] == "creating" {
                v = wait(sock, &snap_path(&format!("{name}@{snapshot}"))?).await?;
                v["pause_us"] = pause;
            }
            if let Some(st) = v["state"].as_str()
                && st.starts_with("failed")
            {
                bail!("snapshot {name}@{snapshot}: {st}");
            }
            output::print(j, &v, output::fields);
        }
        SnapshotCmd::List { name } => {
            let path = match name {
                Some(n) => format!("/v1/volumes/{n}/snapshots"),
                None => "/v1/snapshots".into(),
            };
            let v = client::call(sock, "GET", &path, None).await?;
            output::print(j, &v, |v| table(v["snapshots"].as_array()));
        }
        SnapshotCmd::Delete { snapshots } => {
            let mut done = Vec::new();
            for s in snapshots {
                client::call(sock, "DELETE", &snap_path(s)?, None)
                    .await
                    .with_context(|| format!("deleting {s} (deleted before it: {done:?})"))?;
                done.push(s.clone());
            }
            output::print(j, &json!({"deleted": done}), |_| {
                format!("deleted {}", done.join(", "))
            });
        }
    }
    Ok(())
}

/// Polls a snapshot until it is no longer "creating", with a progress bar on a TTY.
async fn wait(sock: &Path, path: &str) -> Result<Value> {
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(100);
        b.set_style(
            indicatif::ProgressStyle::with_template("copying {bar:40} {pos}% eta {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    loop {
        let v = client::call(sock, "GET", path, None).await?;
        if let Some(b) = &bar {
            b.set_position(v["percent"].as_u64().unwrap_or(0));
        }
        if v["state"] != "creating" {
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            return Ok(v);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn table(snaps: Option<&Vec<Value>>) -> String {
    let mut out = vec![format!(
        "{:<40} {:>14} {:<8} {:<10} {:>8} {}",
        "NAME", "SIZE", "METHOD", "STATE", "PERCENT", "ATTACHED"
    )];
    for s in snaps.into_iter().flatten() {
        out.push(format!(
            "{:<40} {:>14} {:<8} {:<10} {:>8} {}",
            output::s(&s["name"]),
            output::s(&s["size"]),
            output::s(&s["method"]),
            output::s(&s["state"]),
            output::s(&s["percent"]),
            output::s(&s["attached"]),
        ));
    }
    out.join("\n")
}

/// `volume export NAME[@SNAP] --to FILE`: the image written sparse into FILE (built as
/// FILE.partial and renamed when complete: a failed export leaves no partial image).
pub async fn export(sock: &Path, j: bool, name: &str, to: &Path) -> Result<()> {
    let resp = client::get_stream(sock, &format!("/v1/volumes/{name}/export")).await?;
    let mut tmp = to.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = std::path::PathBuf::from(tmp);
    let f = std::fs::File::create(&tmp).with_context(|| tmp.display().to_string())?;
    let r = receive(resp, &f).await;
    let (size, data) = match r {
        Ok(x) => x,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    f.set_len(size)?;
    f.sync_all()?;
    std::fs::rename(&tmp, to).with_context(|| to.display().to_string())?;
    output::print(
        j,
        &json!({"volume": name, "output": to, "size": size, "data_bytes": data}),
        |_| {
            format!(
                "exported {name} ({size} bytes, {data} of data) to {}",
                to.display()
            )
        },
    );
    Ok(())
}

/// Decodes the stream into `f`; returns (image size, data bytes written).
async fn receive(
    resp: hyper::Response<hyper::body::Incoming>,
    f: &std::fs::File,
) -> Result<(u64, u64)> {
    let mut body = resp.into_body();
    let mut dec = Decoder::default();
    let (mut size, mut at, mut data) = (None, 0u64, 0u64);
    let mut bar = None;
    loop {
        while let Some(item) = dec.next_item()? {
            match item {
                Item::Size(s) => {
                    size = Some(s);
                    if std::io::stderr().is_terminal() {
                        let b = indicatif::ProgressBar::new(s);
                        b.set_style(
                            indicatif::ProgressStyle::with_template(
                                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                            )
                            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                        );
                        bar = Some(b);
                    }
                }
                Item::Data(b) => {
                    f.write_all_at(&b, at)?;
                    at = at
                        .checked_add(b.len() as u64)
                        .ok_or_else(|| anyhow!("export stream: offset overflow"))?;
                    data += b.len() as u64;
                }
                Item::Hole(n) => {
                    at = at
                        .checked_add(n)
                        .ok_or_else(|| anyhow!("export stream: offset overflow"))?;
                }
                Item::End(n) => {
                    if let Some(b) = bar {
                        b.finish_and_clear();
                    }
                    let size = size.ok_or_else(|| anyhow!("export stream: no header"))?;
                    if n != size || at != size {
                        bail!("export stream ended at {at} of {size} bytes");
                    }
                    return Ok((size, data));
                }
                Item::Error(e) => bail!("export failed in the daemon: {e}"),
            }
            if size.is_some_and(|s| at > s) {
                bail!("export stream: more data than the image size");
            }
            if let Some(b) = &bar {
                b.set_position(at);
            }
        }
        match body.frame().await {
            Some(fr) => {
                if let Ok(d) = fr?.into_data() {
                    dec.feed(&d);
                }
            }
            None => bail!("export stream cut at {at} bytes"),
        }
    }
}
