//! Settings files and environment overrides for the daemons `celer node
//! serve`, `celer vhost serve` and `celer nbd serve` (`celer meta serve` has
//! its own `meta.toml`, see celer-meta).
//!
//! A TOML file given with `--config FILE` holds the same settings as the
//! flags, with `_` for `-` (`admin_listen = "127.0.0.1:7900"`); environment
//! variables `CELER_NODE_ADMIN_LISTEN`, `CELER_VHOST_QUEUES`,
//! `CELER_NBD_EXPORT_NAME`… set one each. Precedence: flag > environment >
//! file > built-in default. An unknown key or a value of the wrong type is
//! an error naming the key, the file and the keys that exist.
//!
//! It works on the command line before clap parses it: the file's and the
//! environment's settings become flags inserted before the user's own, and
//! the command is built with `args_override_self`, so the last one wins.

use std::ffi::OsString;

use anyhow::{bail, Context, Result};
use clap::{ArgAction, Command};

/// (subcommand path, environment prefix) of the daemons this applies to.
const DAEMONS: [(&[&str], &str); 3] = [
    (&["node", "serve"], "CELER_NODE_"),
    (&["vhost", "serve"], "CELER_VHOST_"),
    (&["nbd", "serve"], "CELER_NBD_"),
];

/// Rewrites `argv` with the settings of `--config FILE` and the
/// environment, for the daemon subcommands; other commands pass unchanged.
pub fn expand(cmd: &Command, argv: Vec<OsString>) -> Result<Vec<OsString>> {
    let words: Vec<String> = argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let Some((path, prefix)) = DAEMONS
        .iter()
        .find(|(p, _)| words.len() > p.len() && words[1..=p.len()] == p[..])
        .map(|(p, e)| (*p, *e))
    else {
        return Ok(argv);
    };
    let mut sub = cmd;
    for name in path {
        sub = sub
            .find_subcommand(name)
            .with_context(|| format!("no subcommand {name}"))?;
    }
    let after = 1 + path.len();
    // The user's `--config FILE` (or `--config=FILE`), removed from argv.
    let mut user: Vec<OsString> = Vec::new();
    let mut config = None;
    let mut i = after;
    while i < argv.len() {
        let w = &words[i];
        if w == "--config" {
            let f = words
                .get(i + 1)
                .with_context(|| "--config needs a file".to_string())?;
            config = Some(f.clone());
            i += 2;
            continue;
        }
        if let Some(f) = w.strip_prefix("--config=") {
            config = Some(f.to_string());
            i += 1;
            continue;
        }
        user.push(argv[i].clone());
        i += 1;
    }
    let mut injected: Vec<OsString> = Vec::new();
    if let Some(file) = &config {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("read the settings file {file}"))?;
        let table: toml::Table =
            toml::from_str(&text).with_context(|| format!("{file} is not valid TOML"))?;
        for (key, value) in &table {
            let env_name = format!("{prefix}{}", key.to_uppercase());
            if std::env::var_os(&env_name).is_some() {
                continue; // the environment wins over the file
            }
            injected.extend(setting(sub, &path.join(" "), key, value, file)?);
        }
    }
    for arg in sub.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        let env_name = format!("{prefix}{}", long.replace('-', "_").to_uppercase());
        if let Some(v) = std::env::var_os(&env_name) {
            let value = toml::Value::String(v.to_string_lossy().into_owned());
            injected.extend(setting(
                sub,
                &path.join(" "),
                &long.replace('-', "_"),
                &value,
                &env_name,
            )?);
        }
    }
    let mut out: Vec<OsString> = argv[..after].to_vec();
    out.extend(injected);
    out.extend(user);
    Ok(out)
}

/// The flags for one setting, checked against the subcommand's arguments.
fn setting(
    sub: &Command,
    name: &str,
    key: &str,
    value: &toml::Value,
    origin: &str,
) -> Result<Vec<OsString>> {
    let long = key.replace('_', "-");
    let Some(arg) = sub
        .get_arguments()
        .find(|a| a.get_long() == Some(long.as_str()))
    else {
        let known: Vec<String> = sub
            .get_arguments()
            .filter_map(|a| a.get_long())
            .filter(|l| *l != "config" && *l != "help")
            .map(|l| l.replace('-', "_"))
            .collect();
        bail!(
            "{origin}: unknown setting `{key}` for `celer {name}`; known settings: {}",
            known.join(", ")
        );
    };
    let flag = format!("--{long}");
    let scalar = |v: &toml::Value| -> Result<String> {
        Ok(match v {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(n) => n.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => bail!("{origin}: `{key}` must be a string, number or boolean, not {other:?}"),
        })
    };
    Ok(match (arg.get_action(), value) {
        (ArgAction::SetTrue, toml::Value::Boolean(true)) => vec![flag.into()],
        (ArgAction::SetTrue, toml::Value::Boolean(false)) => vec![],
        (ArgAction::SetTrue, toml::Value::String(s)) if s == "true" || s == "1" => {
            vec![flag.into()]
        }
        (ArgAction::SetTrue, toml::Value::String(s))
            if s == "false" || s == "0" || s.is_empty() =>
        {
            vec![]
        }
        (ArgAction::SetTrue, v) => bail!("{origin}: `{key}` is a switch: true or false, not {v:?}"),
        (_, toml::Value::Array(items)) => {
            let parts: Result<Vec<String>> = items.iter().map(scalar).collect();
            vec![flag.into(), parts?.join(",").into()]
        }
        (_, v) => vec![flag.into(), scalar(v)?.into()],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, Command};

    fn cmd() -> Command {
        Command::new("celer").subcommand(
            Command::new("node").subcommand(
                Command::new("serve")
                    .arg(Arg::new("listen").long("listen"))
                    .arg(Arg::new("admin_listen").long("admin-listen"))
                    .arg(
                        Arg::new("verbose")
                            .long("verbose")
                            .action(ArgAction::SetTrue),
                    )
                    .arg(Arg::new("cpus").long("cpus").value_delimiter(','))
                    .arg(Arg::new("config").long("config")),
            ),
        )
    }

    fn argv(words: &[&str]) -> Vec<OsString> {
        words.iter().map(OsString::from).collect()
    }

    #[test]
    fn file_then_environment_then_flags() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("node.toml");
        std::fs::write(
            &f,
            "listen = \"1.1.1.1:1\"\nadmin_listen = \"2.2.2.2:2\"\nverbose = true\ncpus = [0, 1]\n",
        )
        .expect("write");
        let out = expand(
            &cmd(),
            argv(&[
                "celer",
                "node",
                "serve",
                "--config",
                f.to_str().expect("utf8"),
                "--listen",
                "3.3.3.3:3",
            ]),
        )
        .expect("expands");
        let words: Vec<String> = out
            .iter()
            .map(|w| w.to_string_lossy().into_owned())
            .collect();
        // File settings first, the user's flag last (it wins).
        assert_eq!(words[..3], ["celer", "node", "serve"]);
        assert!(words.contains(&"--verbose".to_string()));
        assert!(words.windows(2).any(|w| w == ["--cpus", "0,1"]));
        assert_eq!(words[words.len() - 2..], ["--listen", "3.3.3.3:3"]);
        let m = cmd().args_override_self(true).get_matches_from(&out);
        let serve = m
            .subcommand_matches("node")
            .and_then(|m| m.subcommand_matches("serve"))
            .expect("serve");
        assert_eq!(
            serve.get_one::<String>("listen").map(String::as_str),
            Some("3.3.3.3:3")
        );
        assert_eq!(
            serve.get_one::<String>("admin_listen").map(String::as_str),
            Some("2.2.2.2:2")
        );
    }

    #[test]
    fn a_typo_names_the_key_and_the_known_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("node.toml");
        std::fs::write(&f, "lisen = \"1.1.1.1:1\"\n").expect("write");
        let e = expand(
            &cmd(),
            argv(&[
                "celer",
                "node",
                "serve",
                "--config",
                f.to_str().expect("utf8"),
            ]),
        )
        .expect_err("typo");
        let msg = format!("{e:#}");
        assert!(msg.contains("unknown setting `lisen`"), "{msg}");
        assert!(msg.contains("admin_listen"), "{msg}");
        std::fs::write(&f, "verbose = 3\n").expect("write");
        let e = expand(
            &cmd(),
            argv(&[
                "celer",
                "node",
                "serve",
                "--config",
                f.to_str().expect("utf8"),
            ]),
        )
        .expect_err("bad type");
        assert!(format!("{e:#}").contains("is a switch"));
        std::fs::write(&f, "listen = \n").expect("write");
        assert!(expand(
            &cmd(),
            argv(&[
                "celer",
                "node",
                "serve",
                "--config",
                f.to_str().expect("utf8")
            ])
        )
        .is_err());
    }

    #[test]
    fn other_commands_pass_unchanged() {
        let a = argv(&["celer", "volume", "list", "--config", "x"]);
        assert_eq!(expand(&cmd(), a.clone()).expect("unchanged"), a);
    }
}
