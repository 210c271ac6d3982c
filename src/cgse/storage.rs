//! Housekeeping storage: where each housekeeping record goes.
//!
//! The embedded default is a local CSV file written exactly as the CGSE Storage Manager writes its daily
//! files (`<data>/daily/YYYYMMDD/YYYYMMDD_<SITE_ID>_<ORIGIN>.csv`, `,` delimiter, `|` quote character,
//! CRLF line ends, a header when the file is created), so a lab's tools read both alike.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::codec::float_repr;
use crate::util::{yyyymmdd, BoxFuture};

/// One housekeeping value.
#[derive(Debug, Clone, PartialEq)]
pub enum HkValue {
    /// A string.
    Str(String),
    /// An integer.
    Int(i64),
    /// A float, written as Python's `repr`.
    Float(f64),
    /// Python's `None`: an empty CSV field.
    None,
}

impl HkValue {
    /// The text Python's `csv` module writes for the value (`str(v)`, `None` → empty).
    pub fn csv_text(&self) -> String {
        match self {
            HkValue::Str(s) => s.clone(),
            HkValue::Int(i) => i.to_string(),
            HkValue::Float(f) => float_repr(*f),
            HkValue::None => String::new(),
        }
    }
}

/// One record: ordered (column, value) pairs, `timestamp` first.
#[derive(Debug, Clone, PartialEq)]
pub struct HkRecord {
    /// When the record was taken (it picks the daily file).
    pub when: SystemTime,
    /// The (column, value) pairs.
    pub fields: Vec<(String, HkValue)>,
}

impl HkRecord {
    /// The column names, in order.
    pub fn columns(&self) -> Vec<String> {
        self.fields.iter().map(|(k, _)| k.clone()).collect()
    }
}

/// Why a sink did not store a record or could not register.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Stored nowhere: the Storage Manager did not take the record (`reason`) and the local file failed too.
    #[error("housekeeping record lost: not stored by the Storage Manager ({reason}) nor in the local file: {source}")]
    Lost {
        /// Why the Storage Manager did not store it.
        reason: String,
        /// Why the local file did not either.
        #[source]
        source: std::io::Error,
    },
    /// The daily CSV file could not be written (the embedded default, no Storage Manager involved).
    #[error("cannot write the daily CSV file: {0}")]
    Local(#[from] std::io::Error),
    /// The Storage Manager did not accept the registration; records go to the local file meanwhile.
    #[error("{reason}; housekeeping goes to the local CSV files under {} until the Storage Manager is back", .fallback.display())]
    NotRegistered {
        /// What the Storage Manager (or the attempt to reach it) said.
        reason: String,
        /// The folder of the daily files written meanwhile.
        fallback: PathBuf,
    },
    /// Several records failed at once (records in doubt settled together).
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Several(Vec<SinkError>),
}

/// Where housekeeping records go. Implementations never block the caller for long: a dead peer costs a
/// bounded timeout in the housekeeping task, never anything on the request path.
pub trait HousekeepingSink: Send + Sync {
    /// (Re-)register with the storage backend (`register_to_storage`): what the backend said, or why not.
    fn register(&self, columns: Vec<String>) -> BoxFuture<'_, Result<String, SinkError>>;
    /// Store one record.
    fn save(&self, record: HkRecord) -> BoxFuture<'_, Result<(), SinkError>>;
    /// Unregister at shutdown.
    fn shutdown(&self) -> BoxFuture<'_, ()>;
    /// Where records currently go, for logs and status.
    fn describe(&self) -> String;
}

/// Quote a field as `csv.writer(quotechar="|", quoting=QUOTE_MINIMAL)` does.
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '|', '\r', '\n']) {
        format!("|{}|", s.replace('|', "||"))
    } else {
        s.to_owned()
    }
}

/// One CSV line with its CRLF.
pub fn csv_line(fields: impl IntoIterator<Item = String>) -> String {
    let cols: Vec<String> = fields.into_iter().map(|f| csv_field(&f)).collect();
    format!("{}\r\n", cols.join(","))
}

/// The Storage Manager's daily file for `origin` at `when`.
pub fn daily_file(data_location: &Path, site_id: &str, origin: &str, when: SystemTime) -> PathBuf {
    let day = yyyymmdd(when);
    data_location
        .join("daily")
        .join(&day)
        .join(format!("{day}_{site_id}_{origin}.csv"))
}

/// Appends records to the daily CSV file itself: the embedded default when no Storage Manager runs.
///
/// Clones share the columns in force. The blocking file work runs on tokio's blocking pool through
/// [`LocalCsv::append_async`] and [`LocalCsv::contains_async`], never on a runtime thread.
#[derive(Clone)]
pub struct LocalCsv {
    data_location: PathBuf,
    site_id: String,
    origin: String,
    columns: Arc<Mutex<Option<Vec<String>>>>,
}

impl LocalCsv {
    /// Writes `<data_location>/daily/…/YYYYMMDD_<site_id>_<origin>.csv`; no columns in force yet.
    pub fn new(data_location: PathBuf, site_id: String, origin: String) -> LocalCsv {
        LocalCsv {
            data_location,
            site_id,
            origin,
            columns: Arc::new(Mutex::new(None)),
        }
    }

    /// The data storage location the daily files are under.
    pub fn data_location(&self) -> &Path {
        &self.data_location
    }

    /// The columns in force: those of the registration, else the record's own.
    fn columns_for(&self, record: &HkRecord) -> Vec<String> {
        let mut c = self.columns.lock().unwrap_or_else(|e| e.into_inner());
        c.get_or_insert_with(|| record.columns()).clone()
    }

    /// Use these columns from now on (what a registration does).
    pub fn set_columns(&self, columns: Vec<String>) {
        *self.columns.lock().unwrap_or_else(|e| e.into_inner()) = Some(columns);
    }

    /// The daily file of the record and its row, CRLF included, exactly as the Storage Manager writes it.
    pub fn row(&self, record: &HkRecord) -> (PathBuf, String) {
        let path = daily_file(&self.data_location, &self.site_id, &self.origin, record.when);
        let values = self.columns_for(record).into_iter().map(|c| {
            record
                .fields
                .iter()
                .find(|(k, _)| *k == c)
                .map(|(_, v)| v.csv_text())
                .unwrap_or_default()
        });
        (path, csv_line(values))
    }

    /// [`LocalCsv::append`] on the blocking pool.
    pub async fn append_async(&self, record: HkRecord) -> std::io::Result<PathBuf> {
        let csv = self.clone();
        tokio::task::spawn_blocking(move || csv.append(&record))
            .await
            .map_err(std::io::Error::other)?
    }

    /// [`LocalCsv::contains`] on the blocking pool.
    pub async fn contains_async(&self, record: HkRecord) -> std::io::Result<bool> {
        let csv = self.clone();
        tokio::task::spawn_blocking(move || csv.contains(&record))
            .await
            .map_err(std::io::Error::other)?
    }

    /// Whether the record's row is already in its daily file (written by us or by the Storage Manager).
    pub fn contains(&self, record: &HkRecord) -> std::io::Result<bool> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let (path, row) = self.row(record);
        // Never through a symlink, never from a FIFO or device (a read would block the housekeeping task).
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path);
        let mut f = match opened {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        if !f.metadata()?.file_type().is_file() {
            return Err(std::io::Error::other(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes)?;
        Ok(bytes
            .split_inclusive(|b| *b == b'\n')
            .any(|line| line == row.as_bytes()))
    }

    /// Append one record (creating the folder, and the header for a new or empty file). Columns are those
    /// of the registration, like the Storage Manager: missing values are empty, extra ones are dropped.
    pub fn append(&self, record: &HkRecord) -> std::io::Result<PathBuf> {
        let (path, row) = self.row(record);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
            // The day folder must be a real folder, not a link planted to redirect the file.
            if std::fs::symlink_metadata(dir)?.file_type().is_symlink() {
                return Err(std::io::Error::other(format!(
                    "{} is a symlink; not written",
                    dir.display()
                )));
            }
        }
        let columns = self.columns_for(record);
        // O_NOFOLLOW, a regular file we own: a planted link or file is refused, not written through.
        let mut f = crate::supervisor::logs::open_owned_file(&path, false)?;
        // Empty counts as new: a Storage Manager killed right after registering leaves an empty file.
        let new_file = f.metadata()?.len() == 0;
        let mut text = String::new();
        if new_file {
            text.push_str(&csv_line(columns));
        }
        text.push_str(&row);
        f.write_all(text.as_bytes())?;
        Ok(path)
    }
}

impl HousekeepingSink for LocalCsv {
    fn register(&self, columns: Vec<String>) -> BoxFuture<'_, Result<String, SinkError>> {
        Box::pin(async move {
            self.set_columns(columns);
            Ok(format!(
                "Housekeeping of {} goes to the local CSV files under {}",
                self.origin,
                self.data_location.display()
            ))
        })
    }

    fn save(&self, record: HkRecord) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            self.append_async(record).await?;
            Ok(())
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    fn describe(&self) -> String {
        format!("local CSV files under {}", self.data_location.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn quoting_like_python_csv() {
        assert_eq!(csv_field("a,b"), "|a,b|");
        assert_eq!(csv_field("x|y"), "|x||y|");
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(
            csv_line(["timestamp".to_owned(), "random".to_owned()]),
            "timestamp,random\r\n"
        );
    }

    #[test]
    fn appends_in_storage_manager_format() {
        let dir = std::env::temp_dir().join(format!("procman-csv-{}", uuid::Uuid::new_v4()));
        let csv = LocalCsv::new(dir.clone(), "LAB42".into(), "PM".into());
        let when = UNIX_EPOCH + Duration::from_millis(1_795_691_412_459);
        let rec = |v: HkValue| HkRecord {
            when,
            fields: vec![
                ("timestamp".into(), HkValue::Str(crate::util::format_datetime(when))),
                ("random".into(), v),
            ],
        };
        let path = csv.append(&rec(HkValue::Int(13))).unwrap();
        csv.append(&rec(HkValue::Str("a,b".into()))).unwrap();
        csv.append(&rec(HkValue::None)).unwrap();
        assert!(csv.contains(&rec(HkValue::Int(13))).unwrap());
        assert!(!csv.contains(&rec(HkValue::Int(14))).unwrap());
        assert_eq!(path, dir.join("daily/20261126/20261126_LAB42_PM.csv"));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "timestamp,random\r\n2026-11-26T11:10:12.459+0000,13\r\n2026-11-26T11:10:12.459+0000,|a,b|\r\n2026-11-26T11:10:12.459+0000,\r\n"
        );
        std::fs::remove_dir_all(dir).ok();
    }
}
