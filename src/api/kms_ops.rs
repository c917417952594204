//! `POST /v1/kms/<operation>`: the cloud KMS operations, mapped one to one onto `Kms` calls.

use serde_json::{Value, json};

use super::{ApiError, num_field, str_field};
use crate::kms::{Caller, EncryptionContext, Kms};

fn key_id(b: &Value) -> Result<&str, ApiError> {
    str_field(b, "key_id")?.ok_or_else(|| ApiError::bad("key_id is required"))
}

fn hex_field(b: &Value, key: &str) -> Result<Vec<u8>, ApiError> {
    let s = str_field(b, key)?.ok_or_else(|| ApiError::bad(format!("{key} is required")))?;
    hex::decode(s).map_err(|_| ApiError::bad(format!("{key} must be hex")))
}

fn context(b: &Value) -> Result<EncryptionContext, ApiError> {
    match b.get("encryption_context") {
        None | Some(Value::Null) => Ok(EncryptionContext::new()),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                other => Ok((k.clone(), other.to_string())),
            })
            .collect(),
        Some(Value::String(s)) => serde_json::from_str::<EncryptionContext>(s)
            .map_err(|_| ApiError::bad("encryption_context must be an object of strings")),
        Some(_) => Err(ApiError::bad("encryption_context must be an object")),
    }
}

/// The audit log's name for an API operation (None: no such operation).
fn audit_name(op: &str) -> Option<&'static str> {
    Some(match op {
        "create-key" => "createKey",
        "describe-key" => "describeKey",
        "list-keys" => "listKeys",
        "enable-key" => "enableKey",
        "disable-key" => "disableKey",
        "rotate-key" => "rotateKey",
        "schedule-key-deletion" => "scheduleKeyDeletion",
        "cancel-key-deletion" => "cancelKeyDeletion",
        "create-datakey" => "createDataKey",
        "create-datakey-without-plaintext" => "createDataKeyWithoutPlaintext",
        "encrypt-datakey" => "encryptDatakey",
        "decrypt-datakey" => "decryptDatakey",
        "encrypt-data" => "encryptData",
        "decrypt-data" => "decryptData",
        "gen-random" => "genRandom",
        _ => return None,
    })
}

/// Why a call failed: its request was refused before the key manager saw it (not audited
/// yet), or the key manager refused it (audited by `Kms`).
enum Failure {
    Request(ApiError),
    Kms(ApiError),
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Failure {
        Failure::Request(e)
    }
}

impl From<crate::kms::KmsError> for Failure {
    fn from(e: crate::kms::KmsError) -> Failure {
        Failure::Kms(e.into())
    }
}

/// Runs one KMS operation. Every call of a known operation leaves an audit record: the key
/// manager writes it, or, for a request refused here (a missing or malformed field), this.
pub fn dispatch(kms: &Kms, c: &Caller, op: &str, b: &Value) -> Result<Value, ApiError> {
    match run(kms, c, op, b) {
        Ok(v) => Ok(v),
        Err(Failure::Kms(e)) => Err(e),
        Err(Failure::Request(e)) => {
            if let Some(name) = audit_name(op) {
                let key = b.get("key_id").and_then(Value::as_str);
                let s = crate::kms::audit::Subject {
                    key_id: key.map(|k| &k[..k.len().min(256)]),
                    ..Default::default()
                };
                if let Err(ae) = kms.audit_event(c, name, s, &e.code) {
                    tracing::error!(error = %ae, "audit log append failed");
                }
            }
            Err(e)
        }
    }
}

fn run(kms: &Kms, c: &Caller, op: &str, b: &Value) -> Result<Value, Failure> {
    Ok(match op {
        "create-key" => {
            let alias =
                str_field(b, "key_alias")?.ok_or_else(|| ApiError::bad("key_alias is required"))?;
            let desc = str_field(b, "key_description")?.unwrap_or("");
            json!({"key_info": kms.create_key(c, alias, desc)?})
        }
        "describe-key" => json!({"key_info": kms.describe_key(c, key_id(b)?)?}),
        "list-keys" => {
            let keys = kms.list_keys(c)?;
            json!({
                "keys": keys.iter().map(|k| k.key_id.clone()).collect::<Vec<_>>(),
                "key_details": keys,
                "total": keys.len().to_string(),
            })
        }
        "enable-key" => json!({"key_info": kms.enable_key(c, key_id(b)?)?}),
        "disable-key" => json!({"key_info": kms.disable_key(c, key_id(b)?)?}),
        "rotate-key" => json!({"key_info": kms.rotate_key(c, key_id(b)?)?}),
        "schedule-key-deletion" => {
            let days = num_field(b, "pending_days")?
                .ok_or_else(|| ApiError::bad("pending_days is required"))?;
            let days =
                u32::try_from(days).map_err(|_| ApiError::bad("pending_days out of range"))?;
            let m = kms.schedule_key_deletion(c, key_id(b)?, days)?;
            json!({"key_id": m.key_id, "key_state": m.key_state, "delete_date": m.delete_date})
        }
        "cancel-key-deletion" => {
            let m = kms.cancel_key_deletion(c, key_id(b)?)?;
            json!({"key_id": m.key_id, "key_state": m.key_state})
        }
        "create-datakey" => {
            let bits = num_field(b, "datakey_length")?.unwrap_or(512);
            let bits =
                u32::try_from(bits).map_err(|_| ApiError::bad("datakey_length out of range"))?;
            let (plain, wrapped) = kms.create_datakey(c, key_id(b)?, bits, &context(b)?)?;
            let kid = crate::kms::wrap::parse(&wrapped)?.key_id.to_string();
            json!({"key_id": kid, "plain_text": hex::encode(plain.expose()), "cipher_text": hex::encode(wrapped)})
        }
        "create-datakey-without-plaintext" => {
            let bits = num_field(b, "datakey_length")?.unwrap_or(512);
            let bits =
                u32::try_from(bits).map_err(|_| ApiError::bad("datakey_length out of range"))?;
            let wrapped =
                kms.create_datakey_without_plaintext(c, key_id(b)?, bits, &context(b)?)?;
            let kid = crate::kms::wrap::parse(&wrapped)?.key_id.to_string();
            json!({"key_id": kid, "cipher_text": hex::encode(wrapped)})
        }
        "encrypt-datakey" => {
            let plain = zeroize::Zeroizing::new(hex_field(b, "plain_text")?);
            let wrapped = kms.encrypt_datakey(c, key_id(b)?, &plain, &context(b)?)?;
            let kid = crate::kms::wrap::parse(&wrapped)?.key_id.to_string();
            json!({"key_id": kid, "cipher_text": hex::encode(wrapped), "datakey_length": (plain.len() * 8).to_string()})
        }
        "decrypt-datakey" => {
            let (kid, ver, plain) =
                kms.decrypt_datakey(c, &hex_field(b, "cipher_text")?, &context(b)?)?;
            json!({
                "key_id": kid,
                "key_version": ver.to_string(),
                "data_key": hex::encode(plain.expose()),
                "datakey_length": (plain.len() * 8).to_string(),
            })
        }
        "encrypt-data" => {
            let plain = zeroize::Zeroizing::new(hex_field(b, "plain_text")?);
            let blob = kms.encrypt_data(c, key_id(b)?, &plain, &context(b)?)?;
            json!({"key_id": crate::kms::wrap::parse(&blob)?.key_id.to_string(), "cipher_text": hex::encode(blob)})
        }
        "decrypt-data" => {
            let plain = kms.decrypt_data(c, &hex_field(b, "cipher_text")?, &context(b)?)?;
            json!({"plain_text": hex::encode(plain.expose())})
        }
        "gen-random" => {
            let n = num_field(b, "random_data_length")?.unwrap_or(256);
            if n == 0 || n % 8 != 0 {
                return Err(ApiError::bad(
                    "random_data_length is in bits, a positive multiple of 8",
                )
                .into());
            }
            json!({"random_data": hex::encode(kms.gen_random(c, (n / 8) as usize)?)})
        }
        _ => {
            return Err(ApiError {
                status: 404,
                code: "KMS.0404".into(),
                msg: format!("unknown operation {op:?}"),
            }
            .into());
        }
    })
}
