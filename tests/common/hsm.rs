//! A SoftHSM2 token in a temp dir (its own `SOFTHSM2_CONF`), and `pkcs11-tool` (OpenSC) to
//! look at it from outside. Tests skip with a message when SoftHSM2 is absent, unless
//! `CRYPTVOL_REQUIRE_HSM` is set (CI), where its absence fails them.

use std::path::PathBuf;
use std::process::{Command, Output};

pub const PIN: &str = "4711-cv";
const MODULES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
];

pub struct Token {
    pub dir: tempfile::TempDir,
    pub conf: PathBuf,
    pub module: PathBuf,
    pub label: String,
    pub pin_file: PathBuf,
}

/// A fresh initialised token labelled `label` (user PIN [`PIN`]), or `None` (after printing
/// why) when SoftHSM2 or OpenSC is not installed and `CRYPTVOL_REQUIRE_HSM` is unset.
pub fn token(label: &str) -> Option<Token> {
    let module = MODULES.iter().map(PathBuf::from).find(|p| p.exists());
    let tools = super::have("softhsm2-util") && super::have("pkcs11-tool");
    let Some(module) = module.filter(|_| tools) else {
        assert!(
            std::env::var_os("CRYPTVOL_REQUIRE_HSM").is_none(),
            "CRYPTVOL_REQUIRE_HSM is set but softhsm2 / opensc (pkcs11-tool) is not installed"
        );
        eprintln!("SKIPPED: softhsm2 or opensc not installed (apt-get install softhsm2 opensc)");
        return None;
    };
    let dir = tempfile::Builder::new()
        .prefix("cvhsm")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::create_dir(dir.path().join("tokens")).unwrap();
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}/tokens\nobjectstore.backend = file\nlog.level = ERROR\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let o = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", &conf)
        .args(["--init-token", "--free", "--label", label, "--pin", PIN])
        .args(["--so-pin", "so-secret"])
        .output()
        .unwrap();
    assert!(o.status.success(), "init-token: {o:?}");
    let pin_file = dir.path().join("pin");
    std::fs::write(&pin_file, format!("{PIN}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    Some(Token {
        dir,
        conf,
        module,
        label: label.to_owned(),
        pin_file,
    })
}

impl Token {
    /// The `[kms]` table for custody in this token.
    pub fn config(&self) -> String {
        format!(
            "[kms]\ncustody = \"pkcs11\"\nmodule = \"{}\"\ntoken_label = \"{}\"\npin_file = \"{}\"\n",
            self.module.display(),
            self.label,
            self.pin_file.display()
        )
    }

    /// A wrapper for `Env::start_via`: the daemon sees this token's `SOFTHSM2_CONF`.
    pub fn wrapper(&self) -> Vec<String> {
        vec![
            "env".into(),
            format!("SOFTHSM2_CONF={}", self.conf.display()),
        ]
    }

    /// `pkcs11-tool` logged in to this token.
    pub fn tool(&self, args: &[&str]) -> Output {
        Command::new("pkcs11-tool")
            .env("SOFTHSM2_CONF", &self.conf)
            .arg("--module")
            .arg(&self.module)
            .args(["--token-label", &self.label, "--login", "--pin", PIN])
            .args(args)
            .output()
            .unwrap()
    }

    /// The secret-key objects as `pkcs11-tool --list-objects` prints them.
    pub fn secret_keys(&self) -> String {
        let o = self.tool(&["--list-objects", "--type", "secrkey"]);
        assert!(o.status.success(), "pkcs11-tool: {o:?}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// The `pkcs11-tool` block describing the object whose label is `prefix/...`, if any
    /// (asserts there is at most one).
    pub fn object(&self, prefix: &str) -> Option<String> {
        let all = self.secret_keys();
        let found: Vec<&str> = all
            .split("Secret Key Object")
            .filter(|b| {
                b.lines().any(|l| {
                    field(l, "label:").is_some_and(|x| x.starts_with(&format!("{prefix}/")))
                })
            })
            .collect();
        assert!(found.len() <= 1, "several objects for {prefix}: {all}");
        found.first().map(|b| b.to_string())
    }
}

fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.trim().strip_prefix(name).map(str::trim)
}

/// The hex `CKA_ID` in a `pkcs11-tool` object block.
pub fn id_of(block: &str) -> String {
    block
        .lines()
        .find_map(|l| field(l, "ID:"))
        .expect("object has an ID")
        .to_owned()
}
