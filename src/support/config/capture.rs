//! Capture mode: whether states we did not issue are kept, which ones, and where they go
//! (`CAPTURE_MODE`, `CAPTURE_STATES`, `CAPTURE_STATE_KEY_SECRET`, `CAPTURE_MAX_PENDING`,
//! `FNO_*`).

use url::Url;

use super::{ConfigError, CredentialConfig, Settings, validate_secret_name};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaptureMode {
    /// States we did not issue are rejected.
    Off,
    /// States we did not issue are kept as capture records in the store.
    Store,
    /// Kept in the store and delivered to Finance & Operations.
    Fno(Box<FnoConfig>),
}

/// Which foreign states capture mode keeps, and how many may wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturePolicy {
    /// `CAPTURE_STATES=any` keeps every state; otherwise only registered or signed ones.
    pub any_state: bool,
    /// The secret (by name) Dynamics signs states with (`dcx1.` states), if it does.
    pub state_key_secret: Option<String>,
    /// Captures not yet delivered to F&O past which new ones are refused.
    pub max_pending: usize,
}

/// Where captures go in Finance & Operations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FnoConfig {
    /// The environment URL, `https://env.operations.dynamics.com`.
    pub url: Url,
    /// `/api/services/{group}/{service}/{operation}` or `/data/{Entity}`.
    pub path: String,
    pub data_area: Option<String>,
    /// An F&O-specific credential; `None` uses the app's.
    pub credential: Option<CredentialConfig>,
}

impl CaptureMode {
    pub(super) fn from_settings(s: &Settings) -> Result<CaptureMode, ConfigError> {
        #[derive(Clone, Copy)]
        enum Mode {
            Off,
            Store,
            Fno,
        }
        match s.choice("CAPTURE_MODE", &[("store", Mode::Store), ("fno", Mode::Fno), ("off", Mode::Off)])? {
            Mode::Off => Ok(CaptureMode::Off),
            Mode::Store => Ok(CaptureMode::Store),
            Mode::Fno => {
                let url = s
                    .url("FNO_URL")?
                    .ok_or_else(|| ConfigError::new("FNO_URL", "is required with CAPTURE_MODE=fno"))?;
                let path = s.require("FNO_CAPTURE_PATH")?.to_string();
                if !(path.starts_with("/api/services/") || path.starts_with("/data/")) {
                    return Err(ConfigError::new(
                        "FNO_CAPTURE_PATH",
                        format!(
                            "must be a custom service (/api/services/...) or a data entity (/data/...), got {path:?}"
                        ),
                    ));
                }
                Ok(CaptureMode::Fno(Box::new(FnoConfig {
                    url,
                    path,
                    data_area: s.get("FNO_DATA_AREA_ID").map(str::to_string),
                    credential: CredentialConfig::from_settings(s, "FNO")?,
                })))
            }
        }
    }

    /// The setting's own word for the mode, for logs and `check`.
    pub fn name(&self) -> &'static str {
        match self {
            CaptureMode::Off => "off",
            CaptureMode::Store => "store",
            CaptureMode::Fno(_) => "fno",
        }
    }
}

impl CapturePolicy {
    pub(super) fn from_settings(s: &Settings) -> Result<CapturePolicy, ConfigError> {
        let any_state = s.choice("CAPTURE_STATES", &[("registered", false), ("any", true)])?;
        let state_key_secret = s.get("CAPTURE_STATE_KEY_SECRET").map(str::to_string);
        if let Some(name) = &state_key_secret {
            validate_secret_name(name).map_err(|e| ConfigError::new("CAPTURE_STATE_KEY_SECRET", e))?;
        }
        Ok(CapturePolicy {
            any_state,
            state_key_secret,
            max_pending: s.parse("CAPTURE_MAX_PENDING", 1000, "a number")?,
        })
    }
}
