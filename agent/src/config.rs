//! `--config.file`: every flag of `sockscope run` in a TOML file.
//!
//! A key is the flag's name without the leading `--`: `"web.listen-address" = ":9844"`.
//! TOML dotted keys and tables spell the same key (`[web]` then `listen-address = ":9844"`),
//! so the two forms may be mixed; a key given twice is an error of the TOML itself. Values
//! are TOML strings or integers as the flag takes them, an array for a list flag
//! (`"watch.ports" = [80, 443]`), and a boolean for a collector (`"collector.netstat" =
//! false`). An unknown key, or a value the flag would refuse, fails the whole file with the
//! key's name.
//!
//! Precedence: a flag given on the command line wins over the file, the file over the
//! default. On SIGHUP the file is read again and merged with the same command line.
//!
//! [`parse`] is pure (text in, settings or an error out) so that it can be fuzzed.

use std::{
    collections::{BTreeMap, HashSet},
    ffi::OsString,
    path::{Path, PathBuf},
};

use clap::{ArgAction, Args, FromArgMatches, parser::ValueSource};

use crate::cli::{COLLECTORS, RunArgs};

/// The flag that names the file; it cannot appear in the file itself.
const CONFIG_FILE_KEY: &str = "config.file";

/// What is wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Not TOML.
    #[error("not valid TOML: {0}")]
    Syntax(String),
    /// A key that is no flag of `sockscope run`.
    #[error("unknown key `{key}`: {hint}")]
    UnknownKey {
        /// The key, dotted.
        key: String,
        /// What to write instead.
        hint: String,
    },
    /// A value the flag refuses.
    #[error("key `{key}`: {message}")]
    Value {
        /// The key, dotted.
        key: String,
        /// Why.
        message: String,
    },
}

/// The settings of a file: per key, the command-line arguments it stands for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileSettings {
    settings: BTreeMap<String, Vec<OsString>>,
}

impl FileSettings {
    /// The keys the file sets.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.settings.keys().map(String::as_str)
    }
}

/// `sockscope run`'s flags as a command of their own.
fn run_command() -> clap::Command {
    RunArgs::augment_args(clap::Command::new("run").no_binary_name(true))
}

/// How a flag takes its value.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// `--collector.<name>` / `--no-collector.<name>`: a boolean in the file.
    Collector,
    /// A flag with one value.
    Single,
    /// A flag with a comma-separated list.
    List,
    /// A flag given once per value (`--filter`, `--iface`): an array in the file.
    Repeated,
}

/// The file's keys: every long flag of `run` but the config file itself, with its shape.
fn keys() -> BTreeMap<String, Shape> {
    let mut keys = BTreeMap::new();
    for arg in run_command().get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if long == CONFIG_FILE_KEY || long.starts_with("no-collector.") {
            continue;
        }
        let shape = if long.starts_with("collector.") {
            Shape::Collector
        } else if arg.get_value_delimiter().is_some() {
            Shape::List
        } else if matches!(arg.get_action(), ArgAction::Append) {
            Shape::Repeated
        } else if matches!(arg.get_action(), ArgAction::Set) {
            Shape::Single
        } else {
            continue;
        };
        keys.insert(long.to_string(), shape);
    }
    keys
}

/// Parses and validates a config file's text: every key is a flag of `sockscope run` and
/// every value one the flag accepts. Pure: reads no file and touches nothing.
pub fn parse(text: &str) -> Result<FileSettings, ConfigError> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Syntax(e.to_string().trim().to_string()))?;
    let root = toml::Value::Table(table);
    let mut flat = Vec::new();
    flatten("", &root, &mut flat);
    let known = keys();
    let mut settings = BTreeMap::new();
    for (key, value) in flat {
        let shape = known
            .get(&key)
            .copied()
            .ok_or_else(|| unknown(&key, &known))?;
        let args = to_args(&key, shape, value)?;
        // The flag itself says whether the value is good (ranges, addresses, choices).
        let matches = run_command()
            .try_get_matches_from(&args)
            .map_err(|e| value_error(&key, &e))?;
        RunArgs::from_arg_matches(&matches).map_err(|e| value_error(&key, &e))?;
        settings.insert(key, args);
    }
    Ok(FileSettings { settings })
}

/// `a.b.c` for nested tables; a dotted key and a table path come out the same.
fn flatten<'a>(prefix: &str, value: &'a toml::Value, out: &mut Vec<(String, &'a toml::Value)>) {
    match value {
        toml::Value::Table(table) => {
            for (k, v) in table {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        _ => out.push((prefix.to_string(), value)),
    }
}

fn unknown(key: &str, known: &BTreeMap<String, Shape>) -> ConfigError {
    let hint = if key == CONFIG_FILE_KEY {
        "a config file cannot name another; give --config.file on the command line".to_string()
    } else if let Some(name) = key.strip_prefix("no-collector.") {
        format!("write `\"collector.{name}\" = false`")
    } else if key.starts_with("collector.") {
        let names: Vec<_> = COLLECTORS.iter().map(|(n, _)| *n).collect();
        format!("the collectors are {}", names.join(", "))
    } else {
        let names: Vec<_> = known.keys().map(String::as_str).collect();
        format!(
            "not a flag of `sockscope run`; the keys are {}",
            names.join(", ")
        )
    };
    ConfigError::UnknownKey {
        key: key.to_string(),
        hint,
    }
}

fn to_args(key: &str, shape: Shape, value: &toml::Value) -> Result<Vec<OsString>, ConfigError> {
    let bad = |expected: &str| ConfigError::Value {
        key: key.to_string(),
        message: format!("expected {expected}, found a TOML {}", value.type_str()),
    };
    let scalar = |v: &toml::Value| match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        _ => None,
    };
    let args = match shape {
        Shape::Collector => {
            let on = value.as_bool().ok_or_else(|| bad("true or false"))?;
            let name = &key["collector.".len()..];
            vec![if on {
                format!("--collector.{name}")
            } else {
                format!("--no-collector.{name}")
            }]
        }
        Shape::Single => {
            let v = scalar(value).ok_or_else(|| bad("a string or an integer"))?;
            // One argument: a value that starts with `-` stays a value.
            vec![format!("--{key}={v}")]
        }
        Shape::List => {
            let items = match value {
                toml::Value::Array(items) => items
                    .iter()
                    .map(|i| scalar(i).ok_or_else(|| bad("an array of strings or integers")))
                    .collect::<Result<Vec<_>, _>>()?,
                other => vec![scalar(other).ok_or_else(|| bad("an array"))?],
            };
            if items.is_empty() {
                Vec::new()
            } else {
                vec![format!("--{key}={}", items.join(","))]
            }
        }
        Shape::Repeated => match value {
            toml::Value::Array(items) => items
                .iter()
                .map(|i| {
                    scalar(i)
                        .map(|v| format!("--{key}={v}"))
                        .ok_or_else(|| bad("an array of strings or integers"))
                })
                .collect::<Result<Vec<_>, _>>()?,
            other => vec![format!(
                "--{key}={}",
                scalar(other).ok_or_else(|| bad("a string or an array of strings"))?
            )],
        },
    };
    Ok(args.into_iter().map(OsString::from).collect())
}

/// The first line of clap's message, without its `error: ` and in terms of the file.
fn value_error(key: &str, e: &clap::Error) -> ConfigError {
    let rendered = e.render().to_string();
    let line = rendered.lines().next().unwrap_or("invalid value").trim();
    ConfigError::Value {
        key: key.to_string(),
        message: line.strip_prefix("error: ").unwrap_or(line).to_string(),
    }
}

/// The keys the command line sets itself (flags after `sockscope run`).
fn explicit_keys(cli_args: &[OsString]) -> Result<HashSet<String>, ConfigError> {
    let matches = run_command()
        .try_get_matches_from(cli_args)
        .map_err(|e| value_error("command line", &e))?;
    let mut keys = HashSet::new();
    for arg in run_command().get_arguments() {
        if matches.value_source(arg.get_id().as_str()) != Some(ValueSource::CommandLine) {
            continue;
        }
        if let Some(long) = arg.get_long() {
            keys.insert(
                long.strip_prefix("no-")
                    .filter(|l| l.starts_with("collector."))
                    .unwrap_or(long)
                    .to_string(),
            );
        }
    }
    Ok(keys)
}

/// The effective configuration of `sockscope run`: command line over file over defaults.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The options.
    pub args: RunArgs,
    /// Every setting as text, per key (defaults included), to compare two configurations.
    pub values: BTreeMap<String, String>,
    /// Where each key's value came from.
    pub origins: BTreeMap<String, Origin>,
    /// Keys the file sets that the command line sets too (the command line wins).
    pub shadowed: Vec<String>,
    /// The command line's own arguments (after `run`), kept for reloads.
    cli_args: Vec<OsString>,
}

/// Where a setting came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Not set: the default.
    Default,
    /// The config file.
    File,
    /// The command line (wins over the file).
    CommandLine,
}

/// Why the configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The command line itself is invalid (the caller normally parsed it already).
    #[error("command line: {0}")]
    CommandLine(ConfigError),
    /// The file could not be read.
    #[error("config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is invalid.
    #[error("config file {path}: {source}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: ConfigError,
    },
}

impl Loaded {
    /// The configuration from the command line's arguments (after `run`) and the file
    /// they name, if any.
    pub fn load(cli_args: Vec<OsString>) -> Result<Self, LoadError> {
        let cli = run_command()
            .try_get_matches_from(&cli_args)
            .and_then(|m| RunArgs::from_arg_matches(&m))
            .map_err(|e| LoadError::CommandLine(value_error("command line", &e)))?;
        let (file, path) = match cli.config_file {
            Some(path) => {
                let text = std::fs::read_to_string(&path).map_err(|source| LoadError::Read {
                    path: path.clone(),
                    source,
                })?;
                let file = parse(&text).map_err(|source| LoadError::Invalid {
                    path: path.clone(),
                    source,
                })?;
                (file, Some(path))
            }
            None => (FileSettings::default(), None),
        };
        merge(&file, cli_args).map_err(|source| LoadError::Invalid {
            path: path.unwrap_or_default(),
            source,
        })
    }

    /// The file named by `--config.file`, if any.
    pub fn config_file(&self) -> Option<&Path> {
        self.args.config_file.as_deref()
    }

    /// Says which keys of the file the command line overrides.
    pub fn log_shadowed(&self) {
        if let (Some(path), false) = (self.config_file(), self.shadowed.is_empty()) {
            tracing::info!(
                "{}: {} also given on the command line, which wins",
                path.display(),
                self.shadowed.join(", ")
            );
        }
    }

    /// Reads the file again, with the same command line.
    pub fn reload(&self) -> Result<Self, LoadError> {
        Self::load(self.cli_args.clone())
    }
}

/// Merges the file's settings under the command line's arguments (after `run`). Pure.
pub fn merge(file: &FileSettings, cli_args: Vec<OsString>) -> Result<Loaded, ConfigError> {
    let explicit = explicit_keys(&cli_args)?;
    let mut argv: Vec<OsString> = Vec::new();
    let mut origins = BTreeMap::new();
    let mut shadowed = Vec::new();
    for (key, args) in &file.settings {
        if explicit.contains(key) {
            shadowed.push(key.clone());
            continue;
        }
        argv.extend(args.iter().cloned());
        origins.insert(key.clone(), Origin::File);
    }
    argv.extend(cli_args.iter().cloned());
    let matches = run_command()
        .try_get_matches_from(&argv)
        .map_err(|e| value_error("merged", &e))?;
    let args = RunArgs::from_arg_matches(&matches).map_err(|e| value_error("merged", &e))?;
    let mut values = BTreeMap::new();
    for arg in run_command().get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if long.starts_with("no-collector.") || long.starts_with("collector.") {
            continue;
        }
        let raw: Vec<String> = matches
            .get_raw(arg.get_id().as_str())
            .map(|vs| vs.map(|v| v.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        values.insert(long.to_string(), raw.join(","));
    }
    for (name, _) in COLLECTORS {
        values.insert(
            format!("collector.{name}"),
            args.collectors.enabled(name).to_string(),
        );
    }
    for key in values.keys() {
        if explicit.contains(key) {
            origins.insert(key.clone(), Origin::CommandLine);
        } else {
            origins.entry(key.clone()).or_insert(Origin::Default);
        }
    }
    Ok(Loaded {
        args,
        values,
        origins,
        shadowed,
        cli_args,
    })
}

/// The command line's arguments of `sockscope run`: everything after the program name,
/// without the `run` subcommand when it is there.
pub fn run_cli_args(mut argv: Vec<OsString>) -> Vec<OsString> {
    if !argv.is_empty() {
        argv.remove(0);
    }
    if argv.first().is_some_and(|a| a == "run") {
        argv.remove(0);
    }
    argv
}

/// How two configurations differ: a list of named items compared old against new. Any
/// named set (settings, collectors, filters) is diffed the same way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamedDiff {
    /// In the new one only.
    pub added: Vec<String>,
    /// In the old one only.
    pub removed: Vec<String>,
    /// In both, with another value.
    pub changed: Vec<String>,
}

impl NamedDiff {
    /// Compares two sets of named items.
    pub fn of<T: PartialEq>(old: &BTreeMap<String, T>, new: &BTreeMap<String, T>) -> Self {
        let mut diff = Self::default();
        for (name, value) in new {
            match old.get(name) {
                None => diff.added.push(name.clone()),
                Some(v) if v != value => diff.changed.push(name.clone()),
                Some(_) => {}
            }
        }
        diff.removed = old
            .keys()
            .filter(|k| !new.contains_key(*k))
            .cloned()
            .collect();
        diff
    }

    /// Whether nothing differs.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn flat_and_nested_keys_are_the_same() {
        let flat = parse(
            r#"
            "web.listen-address" = "127.0.0.1:9900"
            "watch.ports" = [80, 443]
            "collector.netstat" = false
            "limit.series-per-metric" = 10
            "#,
        )
        .expect("valid");
        let nested = parse(
            r#"
            watch.ports = [80, 443]
            [web]
            listen-address = "127.0.0.1:9900"
            [collector]
            netstat = false
            [limit]
            series-per-metric = 10
            "#,
        )
        .expect("valid");
        assert_eq!(flat, nested);
        let loaded = merge(&flat, Vec::new()).expect("merges");
        assert_eq!(loaded.args.watch_ports, vec![80, 443]);
        assert_eq!(loaded.args.series_limit, 10);
        assert!(!loaded.args.collectors.enabled("netstat"));
        assert!(loaded.args.collectors.enabled("resets"));
        assert_eq!(loaded.values["web.listen-address"], "127.0.0.1:9900");
        assert_eq!(loaded.origins["watch.ports"], Origin::File);
        assert_eq!(loaded.origins["log.level"], Origin::Default);
    }

    #[test]
    fn command_line_wins_over_file_over_defaults() {
        let file = parse(
            r#"
            "watch.ports" = [80]
            "limit.series-per-metric" = 5
            "log.level" = "debug"
            "collector.resets" = false
            "#,
        )
        .expect("valid");
        let loaded = merge(
            &file,
            os(&[
                "--watch.ports",
                "22",
                "--collector.resets",
                "--log.level=warn",
            ]),
        )
        .expect("merges");
        assert_eq!(
            loaded.args.watch_ports,
            vec![22],
            "not appended to the file's"
        );
        assert_eq!(loaded.args.log_level, "warn");
        assert!(loaded.args.collectors.enabled("resets"));
        assert_eq!(loaded.args.series_limit, 5, "from the file");
        assert_eq!(loaded.args.refresh_seconds, 30, "the default");
        assert_eq!(loaded.origins["watch.ports"], Origin::CommandLine);
        assert_eq!(loaded.origins["collector.resets"], Origin::CommandLine);
        assert_eq!(loaded.origins["limit.series-per-metric"], Origin::File);
        assert_eq!(
            loaded.shadowed,
            vec!["collector.resets", "log.level", "watch.ports"]
        );
        // And off on the command line over on in the file.
        let file = parse(r#""collector.listen" = true"#).expect("valid");
        let loaded = merge(&file, os(&["--no-collector.listen"])).expect("merges");
        assert!(!loaded.args.collectors.enabled("listen"));
    }

    #[test]
    fn every_flag_of_run_is_a_key() {
        let keys = keys();
        for flag in [
            "web.listen-address",
            "log.level",
            "watch.ports",
            "limit.series-per-metric",
            "listeners.refresh-interval",
            "path.tracefs",
            "path.cgroup2",
            "probe.mode",
        ] {
            assert!(keys.contains_key(flag), "{flag}");
        }
        for (name, _) in COLLECTORS {
            assert!(keys.contains_key(&format!("collector.{name}")));
        }
        assert!(!keys.contains_key("config.file"));
    }

    #[test]
    fn errors_name_the_key() {
        for (text, needle) in [
            (
                "\"web.listen-adress\" = \":1\"",
                "unknown key `web.listen-adress`",
            ),
            (
                "[web]\nlisten-adress = \":1\"",
                "unknown key `web.listen-adress`",
            ),
            ("\"config.file\" = \"x\"", "cannot name another"),
            (
                "\"no-collector.resets\" = true",
                "\"collector.resets\" = false",
            ),
            ("\"collector.nope\" = true", "the collectors are"),
            ("\"watch.ports\" = [80, 70000]", "key `watch.ports`"),
            ("\"watch.ports\" = [80, 1.5]", "key `watch.ports`: expected"),
            (
                "\"web.listen-address\" = \"nonsense\"",
                "key `web.listen-address`",
            ),
            ("\"log.level\" = \"loud\"", "key `log.level`"),
            (
                "\"listeners.refresh-interval\" = 0",
                "key `listeners.refresh-interval`",
            ),
            ("\"collector.resets\" = \"no\"", "expected true or false"),
            ("\"web.listen-address\" = [\":1\"]", "expected a string"),
            ("x = ", "not valid TOML"),
        ] {
            let err = parse(text).expect_err(text).to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn empty_file_is_the_defaults() {
        let loaded = merge(&parse("").expect("valid"), Vec::new()).expect("merges");
        assert_eq!(loaded.values["web.listen-address"], ":9844");
        assert_eq!(loaded.values["watch.ports"], "");
        assert_eq!(loaded.values["collector.listen"], "true");
    }

    /// What the fuzz target asserts, on inputs of every shape the grammar allows.
    #[test]
    fn accepted_files_always_merge() {
        let inputs = [
            "",
            "[web]\n[web.x]\n",
            "\"watch.ports\" = []",
            "\"watch.ports\" = \"80,443\"",
            "\"watch.ports\" = [\"80\", 443]",
            "\"watch.ports\" = [[80]]",
            "\"watch.ports\" = 80",
            "collector = { resets = false, listen = true }",
            "collector = 1",
            "\"limit.series-per-metric\" = -1",
            "\"limit.series-per-metric\" = 9223372036854775807",
            "\"path.tracefs\" = \"\"",
            "\"probe.mode\" = \"auto\"\n\"log.level\" = \"trace\"",
            "\"web.listen-address\" = \":0\"",
            "\"web.listen-address\" = \"--help\"",
            "\"log.level\" = \"--version\"",
            "a.b.c.d.e = 1",
            "\"\" = 1",
            "[[x]]",
            "x = 1979-05-27T07:32:00Z",
            "\u{0}",
        ];
        for text in inputs {
            if let Ok(settings) = parse(text) {
                merge(&settings, Vec::new()).unwrap_or_else(|e| panic!("{text}: {e}"));
            }
        }
        assert_eq!(
            parse("\"web.listen-address\" = \"--help\"")
                .map(|s| merge(&s, Vec::new()).map(|l| l.values["web.listen-address"].clone())),
            Err(ConfigError::Value {
                key: "web.listen-address".into(),
                message: "invalid value '--help' for '--web.listen-address <ADDR>': `--help` is not a listen address; use host:port (127.0.0.1:9844, [::1]:9844) or :port".into()
            }),
            "a value that looks like a flag is a value"
        );
    }

    #[test]
    fn diff_of_named_items() {
        let old: BTreeMap<String, i32> = [("a".into(), 1), ("b".into(), 2), ("c".into(), 3)].into();
        let new: BTreeMap<String, i32> = [("a".into(), 1), ("b".into(), 9), ("d".into(), 4)].into();
        let diff = NamedDiff::of(&old, &new);
        assert_eq!(diff.added, vec!["d"]);
        assert_eq!(diff.removed, vec!["c"]);
        assert_eq!(diff.changed, vec!["b"]);
        assert!(NamedDiff::of(&old, &old).is_empty());
    }

    #[test]
    fn run_cli_args_drop_program_and_subcommand() {
        assert_eq!(
            run_cli_args(os(&["sockscope", "run", "--log.level", "info"])),
            os(&["--log.level", "info"])
        );
        assert_eq!(run_cli_args(os(&["sockscope", "-h"])), os(&["-h"]));
    }
}
