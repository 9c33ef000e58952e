//! SIGHUP: read `--config.file` again and apply, in place, what can change while running.
//!
//! The running settings and the new ones are compared as named items ([`NamedDiff`]); each
//! changed key is applied by the arm that knows it, or reported as needing a restart (and
//! the running value stays). Nothing that did not change is touched: the programs stay
//! attached and every counter goes on. A file that does not parse or validate changes
//! nothing. A new kind of reloadable item (filters, say) is one more named set diffed the
//! same way and one more arm in [`Live::apply`].

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use aya::maps::{Array, MapData};

use crate::{
    config::{Loaded, NamedDiff},
    metrics::{Metrics, budget::Limits},
    probes::ports,
};

/// What a reload can change in the running agent.
pub struct Live {
    /// The `WATCH_PORTS` bitmap, when the programs are loaded (with the bitmap in use).
    pub watch: Option<Array<MapData, u64>>,
    /// The budgets.
    pub limits: Arc<Limits>,
    /// The collectors, to switch them on and off.
    pub metrics: Arc<Metrics>,
    /// `--listeners.refresh-interval`, read by the upkeep task before each sleep.
    pub refresh_seconds: Arc<AtomicU64>,
    /// The settings in force, per key.
    running: BTreeMap<String, String>,
    /// The last configuration read (for its command line).
    loaded: Loaded,
    /// The named socket filters, replaced when their settings change.
    filters: Option<Arc<crate::filters::LiveFilters>>,
}

/// What one reload did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Keys applied: `(key, running value, new value)`.
    pub applied: Vec<(String, String, String)>,
    /// Keys that changed in the file but take effect only after a restart, likewise.
    pub restart: Vec<(String, String, String)>,
}

impl Live {
    /// The reload state of an agent started with `loaded`.
    pub fn new(
        loaded: Loaded,
        watch: Option<Array<MapData, u64>>,
        limits: Arc<Limits>,
        metrics: Arc<Metrics>,
        refresh_seconds: Arc<AtomicU64>,
    ) -> Self {
        Self {
            watch,
            limits,
            metrics,
            refresh_seconds,
            running: loaded.values.clone(),
            loaded,
            filters: None,
        }
    }

    /// Lets reloads replace the named socket filters.
    pub fn with_filters(mut self, filters: Option<Arc<crate::filters::LiveFilters>>) -> Self {
        self.filters = filters;
        self
    }

    /// Handles one SIGHUP: reads the file again and applies it, logging what happened.
    pub fn reload(&mut self) {
        let Some(path) = self.loaded.config_file().map(|p| p.display().to_string()) else {
            tracing::warn!(
                "SIGHUP: no --config.file was given, so there is nothing to reload; the running configuration stays"
            );
            return;
        };
        let new = match self.loaded.reload() {
            Ok(new) => new,
            Err(e) => {
                tracing::error!("reload failed, the running configuration stays: {e}");
                return;
            }
        };
        new.log_shadowed();
        let outcome = self.apply(&new);
        for (key, old, new) in &outcome.restart {
            tracing::warn!(
                "reload of {path}: {key} changed ({old:?} → {new:?}) but takes effect only after a restart; {old:?} stays in force"
            );
        }
        if outcome.applied.is_empty() {
            tracing::info!("reloaded {path}: nothing to change");
        } else {
            let applied: Vec<String> = outcome
                .applied
                .iter()
                .map(|(k, old, new)| format!("{k} {old:?} → {new:?}"))
                .collect();
            tracing::info!("reloaded {path}: applied {}", applied.join(", "));
        }
        self.loaded = new;
    }

    /// Applies the keys of `new` that differ from the running ones.
    pub fn apply(&mut self, new: &Loaded) -> Outcome {
        let diff = NamedDiff::of(&self.running, &new.values);
        let mut outcome = Outcome::default();
        // Every key exists in both (one per flag); `added`/`removed` appear only between
        // two versions of the agent, and need a restart like any unknown key.
        for key in diff.changed.iter().chain(&diff.added).chain(&diff.removed) {
            let old = self.running.get(key).cloned().unwrap_or_default();
            let value = new.values.get(key).cloned().unwrap_or_default();
            let applied = match self.apply_key(key, new) {
                Ok(applied) => applied,
                Err(e) => {
                    tracing::error!("reload: applying {key}: {e:#}; {old:?} stays in force");
                    continue;
                }
            };
            if applied {
                self.running.insert(key.clone(), value.clone());
                outcome.applied.push((key.clone(), old, value));
            } else {
                outcome.restart.push((key.clone(), old, value));
            }
        }
        outcome
    }

    /// Applies one changed key; false when it can only change with a restart.
    fn apply_key(&mut self, key: &str, new: &Loaded) -> anyhow::Result<bool> {
        let args = &new.args;
        match key {
            "watch.ports" => {
                if let Some(watch) = self.watch.as_mut() {
                    ports::set_watch_ports(watch, &args.watch_ports)?;
                }
                Ok(true)
            }
            "limit.series-per-metric" => {
                self.limits.set_series_per_metric(args.series_limit);
                Ok(true)
            }
            // One set: whichever of them changed, the filters are rebuilt from all three;
            // an unchanged filter keeps its counts.
            "filter" | "iface" | "filter.mode" => match &self.filters {
                Some(filters) => {
                    filters
                        .replace(&args.filters)
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    Ok(true)
                }
                None => Ok(false),
            },
            "listeners.refresh-interval" => {
                self.refresh_seconds
                    .store(args.refresh_seconds, Ordering::Relaxed);
                Ok(true)
            }
            _ => match key.strip_prefix("collector.") {
                Some(name) => {
                    let on = args.collectors.enabled(name);
                    // A collector that was off at start has nothing loaded to switch on.
                    Ok(self.metrics.set_enabled(name, on) || !on)
                }
                // The listen address, the log level, the probe paths and modes.
                None => Ok(false),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{merge, parse};

    fn loaded(text: &str) -> Loaded {
        merge(&parse(text).expect("valid"), Vec::new()).expect("merges")
    }

    fn keys(items: &[(String, String, String)]) -> Vec<&str> {
        items.iter().map(|(k, _, _)| k.as_str()).collect()
    }

    #[test]
    fn live_keys_apply_others_need_a_restart() {
        let metrics = Arc::new(Metrics::new(Vec::new()).expect("registry"));
        let limits = Arc::new(Limits::new(2000));
        let refresh = Arc::new(AtomicU64::new(30));
        let mut live = Live::new(
            loaded(""),
            None,
            Arc::clone(&limits),
            metrics,
            Arc::clone(&refresh),
        );
        let outcome = live.apply(&loaded(
            r#"
            "limit.series-per-metric" = 7
            "listeners.refresh-interval" = 5
            "web.listen-address" = ":9999"
            "collector.netstat" = false
            "#,
        ));
        assert_eq!(
            keys(&outcome.applied),
            vec![
                "collector.netstat",
                "limit.series-per-metric",
                "listeners.refresh-interval"
            ]
        );
        assert_eq!(keys(&outcome.restart), vec!["web.listen-address"]);
        assert_eq!(limits.series_per_metric(), 7);
        assert_eq!(refresh.load(Ordering::Relaxed), 5);
        // Switching on a collector that was not registered at start needs a restart; the
        // address is still reported against the running value.
        let outcome = live.apply(&loaded(
            r#"
            "limit.series-per-metric" = 7
            "listeners.refresh-interval" = 5
            "web.listen-address" = ":9999"
            "#,
        ));
        assert_eq!(keys(&outcome.applied), Vec::<&str>::new());
        assert_eq!(
            keys(&outcome.restart),
            vec!["collector.netstat", "web.listen-address"]
        );
        assert_eq!(outcome.restart[1].1, ":9844", "the running value");
    }
}
