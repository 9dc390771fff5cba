//! `bench --postgres local|URL` (a build with feature `postgres`): the pipeline
//! with the PostgreSQL idempotency guard (`PipelineBuilder::idempotency`)
//! against the guide's way in the same pipeline (a `SELECT` then an `INSERT`
//! per event, awaited in the handler), on the same messages: an async no-op
//! handler, per-key order, 256 in flight, rounds interleaved.
//!
//! `local` starts a throwaway server with PostgreSQL's durable defaults (the
//! dev stack's `LocalPostgres`); a URL uses a server already running. Either
//! way the bench creates a database of its own there (its user needs
//! `CREATEDB`), so it never touches a `processed_events` table in use, and
//! drops it afterwards. Every pass starts from empty tables, so each of its
//! events is new to both ways.

use std::str::FromStr;

/// Which server `--postgres` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Postgres {
    /// A throwaway server the bench starts and stops.
    Local,
    /// A server already running: `postgres://` or `postgresql://` URL.
    Url(String),
}

impl FromStr for Postgres {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "local" => Ok(Postgres::Local),
            u if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
                Ok(Postgres::Url(u.to_owned()))
            }
            _ => Err("expected `local` or a postgres:// URL".to_owned()),
        }
    }
}

/// The figures of this family.
#[derive(Debug, serde::Serialize)]
pub struct GuardFigures {
    /// `local (durable defaults)` or the server's host:port (never its
    /// credentials).
    pub guard_postgres: String,
    pub guard_events: u64,
    /// The guide's `SELECT` + `INSERT` in the handler, events per second.
    pub guide_pipeline_eps: f64,
    /// `PipelineBuilder::idempotency(guard)` with the guard's defaults.
    pub guard_pipeline_eps: f64,
    pub guard_over_guide: f64,
    pub guide_pipeline_rounds: Vec<f64>,
    pub guard_pipeline_rounds: Vec<f64>,
    /// Statements the guard ran per event (claims and marks batched).
    pub guard_statements_per_event: f64,
}

impl std::fmt::Display for GuardFigures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "guard / guide:         {:>10.1}x ({:.0} / {:.0} events/s, {} events, 256 in flight, \
             PostgreSQL {}; {:.3} statements per event)",
            self.guard_over_guide,
            self.guard_pipeline_eps,
            self.guide_pipeline_eps,
            self.guard_events,
            self.guard_postgres,
            self.guard_statements_per_event
        )
    }
}

#[cfg(feature = "postgres")]
pub(super) use run::run;

#[cfg(feature = "postgres")]
mod run {
    use std::str::FromStr;
    use std::time::Duration;

    use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
    use xzepr_consumer::decode::CloudEventMessage;
    use xzepr_consumer::devstack::postgres::{LocalPostgres, DURABLE};
    use xzepr_consumer::dispatch::Ordering;
    use xzepr_consumer::handler::WorkInfo;
    use xzepr_consumer::idempotency::IdempotencyGuard;
    use xzepr_consumer::pipeline::Pipeline;

    use super::{GuardFigures, Postgres};
    use crate::baseline::anyhow_like::Result;
    use crate::bench::{config, median, stop, time_until_finished, windowed};

    /// Handlers in flight: the guard batches what this many callers claim.
    const IN_FLIGHT: usize = 256;
    /// Connections of the pool both ways share.
    const POOL: u32 = 32;
    /// Interleaved rounds (medians reported).
    const ROUNDS: usize = 3;
    /// Retention of the guard's rows: longer than any run.
    const RETENTION: Duration = Duration::from_secs(86_400);

    const GUIDE_TABLE: &str = "\
CREATE TABLE guide_processed_events (
    event_id     TEXT PRIMARY KEY,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX ON guide_processed_events (processed_at);";

    /// The guide's sketch: is it there? if not, work (nothing), then insert.
    async fn guide_process(pool: &PgPool, event_id: &str) -> std::result::Result<(), String> {
        let seen: bool = sqlx::query_scalar(
            "SELECT EXISTS(SELECT 1 FROM guide_processed_events WHERE event_id = $1)",
        )
        .bind(event_id)
        .fetch_one(pool)
        .await
        .map_err(|e| e.to_string())?;
        if !seen {
            sqlx::query(
                "INSERT INTO guide_processed_events (event_id) VALUES ($1) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(event_id)
            .execute(pool)
            .await
            .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// A database of the bench's own on a server; dropped by [`Scratch::drop_all`].
    struct Scratch {
        admin: PgPool,
        name: String,
        pool: PgPool,
        /// Keeps a local server running while the pools use it.
        _local: Option<LocalPostgres>,
        label: String,
    }

    async fn scratch(target: &Postgres) -> Result<Scratch> {
        let (local, url, label) = match target {
            Postgres::Local => {
                let server = LocalPostgres::start(DURABLE)?;
                let url = server.url("postgres");
                (Some(server), url, "local (durable defaults)".to_owned())
            }
            Postgres::Url(url) => {
                let o = PgConnectOptions::from_str(url)?;
                let label = format!("{}:{}", o.get_host(), o.get_port());
                (None, url.clone(), label)
            }
        };
        let options = PgConnectOptions::from_str(&url)?;
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        let name = format!("xzepr_bench_{}", std::process::id());
        // One statement per call: neither may run inside a transaction, which a
        // multi-statement string implicitly is.
        for statement in [
            format!("DROP DATABASE IF EXISTS {name}"),
            format!("CREATE DATABASE {name}"),
        ] {
            sqlx::raw_sql(&statement).execute(&admin).await?;
        }
        let pool = PgPoolOptions::new()
            .max_connections(POOL)
            .connect_with(options.database(&name))
            .await?;
        sqlx::raw_sql(GUIDE_TABLE).execute(&pool).await?;
        IdempotencyGuard::migrate(&pool).await?;
        Ok(Scratch {
            admin,
            name,
            pool,
            _local: local,
            label,
        })
    }

    impl Scratch {
        async fn empty(&self) -> Result<()> {
            sqlx::raw_sql("TRUNCATE processed_events, guide_processed_events")
                .execute(&self.pool)
                .await?;
            Ok(())
        }

        async fn drop_all(self) -> Result<()> {
            self.pool.close().await;
            sqlx::raw_sql(&format!("DROP DATABASE {} WITH (FORCE)", self.name))
                .execute(&self.admin)
                .await?;
            Ok(())
        }
    }

    /// One pass over `topic`'s `events` from empty tables: `(events, secs)`,
    /// and the guard's statements when it ran.
    fn pass(
        rt: &tokio::runtime::Runtime,
        (brokers, topic, group): (&str, &str, &str),
        events: u64,
        db: &Scratch,
        guard: bool,
    ) -> Result<((u64, f64), u64)> {
        rt.block_on(db.empty())?;
        let mut builder = Pipeline::builder(config(brokers, topic, group))
            .ordering(Ordering::PerKey)
            .max_in_flight(IN_FLIGHT)
            .runtime(rt.handle().clone());
        let g = guard.then(|| {
            let _entered = rt.enter();
            IdempotencyGuard::new(db.pool.clone(), RETENTION)
        });
        if let Some(g) = &g {
            builder = builder.idempotency(g.clone());
        }
        let pool = db.pool.clone();
        let running = builder.start_async(move |m: CloudEventMessage, _: WorkInfo| {
            let pool = pool.clone();
            async move {
                if !guard {
                    guide_process(&pool, &m.id).await?;
                }
                Ok::<_, String>(serde_json::Value::Null)
            }
        })?;
        let timed = time_until_finished(&running, events);
        stop(running)?;
        let statements = g.map_or(0, |g| g.metrics().statements_total);
        Ok((timed?, statements))
    }

    /// Both ways over `topic` (`events` generated events) on `target`.
    pub(crate) fn run(
        rt: &tokio::runtime::Runtime,
        (brokers, topic, events): (&str, &str, u64),
        target: &Postgres,
        group: &dyn Fn(&str) -> String,
    ) -> Result<GuardFigures> {
        let db = rt.block_on(scratch(target))?;
        let (mut guide, mut guarded) = (Vec::new(), Vec::new());
        let (mut statements, mut guarded_events) = (0u64, 0u64);
        let mut measure = || -> Result<()> {
            for round in 0..ROUNDS {
                for guard in [round % 2 == 1, round % 2 == 0] {
                    let rate = windowed(|_| {
                        let name = group(if guard { "guard" } else { "guide" });
                        let (timed, s) = pass(rt, (brokers, topic, &name), events, &db, guard)?;
                        if guard {
                            statements += s;
                            guarded_events += events;
                        }
                        Ok(timed)
                    })?;
                    if guard {
                        guarded.push(rate);
                    } else {
                        guide.push(rate);
                    }
                }
            }
            Ok(())
        };
        let measured = measure();
        let label = db.label.clone();
        rt.block_on(db.drop_all())?;
        measured?;
        let (guide_pipeline_eps, guard_pipeline_eps) =
            (median(guide.clone()), median(guarded.clone()));
        Ok(GuardFigures {
            guard_postgres: label,
            guard_events: events,
            guide_pipeline_eps,
            guard_pipeline_eps,
            guard_over_guide: guard_pipeline_eps / guide_pipeline_eps,
            guide_pipeline_rounds: guide,
            guard_pipeline_rounds: guarded,
            guard_statements_per_event: statements as f64 / guarded_events.max(1) as f64,
        })
    }
}
