//! Human output (tables, `key: value` lines) and `--json` (the API's document as is).

use serde_json::Value;

pub fn print(json: bool, v: &Value, human: impl FnOnce(&Value) -> String) {
    if json {
        println!("{v}");
    } else {
        println!("{}", human(v));
    }
}

/// A JSON value as plain text (strings without quotes).
pub fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

pub fn fields(v: &Value) -> String {
    match v.as_object() {
        Some(m) => {
            let w = m.keys().map(String::len).max().unwrap_or(0);
            m.iter()
                .map(|(k, x)| format!("{k:<w$}  {}", s(x)))
                .collect::<Vec<_>>()
                .join("\n")
        }
        None => s(v),
    }
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = vec![line(header.iter().map(|h| h.to_string()).collect())];
    out.extend(rows.into_iter().map(line));
    out.join("\n")
}

pub fn key_table(keys: Option<&Vec<Value>>) -> String {
    let rows = keys
        .into_iter()
        .flatten()
        .map(|k| {
            vec![
                s(&k["key_id"]),
                s(&k["key_alias"]),
                s(&k["key_state"]),
                s(&k["key_version"]),
                s(&k["key_description"]),
            ]
        })
        .collect();
    table(
        &["KEY_ID", "ALIAS", "STATE", "VERSION", "DESCRIPTION"],
        rows,
    )
}

pub fn volume_table(vols: Option<&Vec<Value>>) -> String {
    let rows = vols
        .into_iter()
        .flatten()
        .map(|v| {
            let att = match (v["attached"].as_bool(), v["read_only"].as_bool()) {
                (Some(true), Some(true)) => "attached (ro)",
                (Some(true), _) => "attached",
                _ => "detached",
            };
            vec![
                s(&v["name"]),
                s(&v["size"]),
                s(&v["sector_size"]),
                s(&v["key_id"]),
                s(&v["store"]),
                att.into(),
                if v["holder"].is_string() {
                    s(&v["holder"])
                } else {
                    "-".into()
                },
                qos(&v["qos"]),
                s(&v["status"]),
            ]
        })
        .collect();
    table(
        &[
            "NAME", "SIZE", "SECTOR", "KEY_ID", "STORE", "STATE", "HOLDER", "QOS", "STATUS",
        ],
        rows,
    )
}

/// A volume's QoS limits for the table: `1000 iops, 209715200 B/s`, or `-` when unlimited.
fn qos(q: &Value) -> String {
    let n = |k: &str| q[k].as_u64().unwrap_or(0);
    let mut parts = Vec::new();
    if n("iops") > 0 {
        parts.push(format!("{} iops", n("iops")));
    }
    if n("bandwidth") > 0 {
        parts.push(format!("{} B/s", n("bandwidth")));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}
