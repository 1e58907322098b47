//! A backend as written on the command line or in the file: its address, weight, cap (a
//! number or `auto`) and whether it is a backup.

use std::fmt;
use std::str::FromStr;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use super::HostPort;

/// One backend: `HOST:PORT[,weight=N][,max_connections=N|auto][,backup]` on the command line,
/// the same string or a table (`{ address = "...", weight = 2, max_connections = 30, backup =
/// true }`, or `max_connections = "auto"`) in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub address: HostPort,
    /// Share of new sessions under least-connections balancing, relative to the others.
    pub weight: u32,
    /// Cap on this backend's concurrent sessions; a full backend is skipped.
    pub max_connections: Option<usize>,
    /// `max_connections = "auto"`: the cap is learned from the backend's own signals.
    pub auto: bool,
    /// Used only when no primary backend is healthy.
    pub backup: bool,
}

impl FromStr for BackendSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let address: HostPort = parts.next().unwrap_or("").trim().parse()?;
        let mut spec = BackendSpec {
            address,
            weight: 1,
            max_connections: None,
            auto: false,
            backup: false,
        };
        for opt in parts {
            match opt.trim().split_once('=') {
                None if opt.trim() == "backup" => spec.backup = true,
                Some(("weight", n)) => {
                    spec.weight = n
                        .parse()
                        .ok()
                        .filter(|&w| w >= 1)
                        .ok_or_else(|| format!("invalid weight {n:?} in {s:?}: expected an integer of at least 1"))?;
                }
                Some(("max_connections", "auto")) => spec.auto = true,
                Some(("max_connections", n)) => {
                    spec.max_connections = Some(
                        n.parse()
                            .map_err(|_| format!("invalid max_connections {n:?} in {s:?}"))?,
                    );
                }
                _ => {
                    return Err(format!(
                        "invalid backend option {opt:?} in {s:?}: expected weight=N, max_connections=N, max_connections=auto or backup"
                    ))
                }
            }
        }
        Ok(spec)
    }
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.address)?;
        if self.weight != 1 {
            write!(f, ",weight={}", self.weight)?;
        }
        if let Some(m) = self.max_connections {
            write!(f, ",max_connections={m}")?;
        }
        if self.auto {
            f.write_str(",max_connections=auto")?;
        }
        if self.backup {
            f.write_str(",backup")?;
        }
        Ok(())
    }
}

impl Serialize for BackendSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for BackendSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(BackendVisitor)
    }
}

/// A backend as a string or a table, keeping each form's own error message.
struct BackendVisitor;

impl<'de> de::Visitor<'de> for BackendVisitor {
    type Value = BackendSpec;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "\"HOST:PORT[,weight=N][,max_connections=N|auto][,backup]\" or a table with address",
        )
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<BackendSpec, E> {
        v.parse().map_err(E::custom)
    }

    fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<BackendSpec, A::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct SpecTable {
            address: String,
            weight: Option<u32>,
            max_connections: Option<Cap>,
            backup: Option<bool>,
        }
        /// A number, or "auto".
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Cap {
            Fixed(usize),
            Word(String),
        }
        let t = SpecTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
        let weight = t.weight.unwrap_or(1);
        if weight == 0 {
            return Err(de::Error::custom("weight must be at least 1"));
        }
        let (max_connections, auto) = match t.max_connections {
            None => (None, false),
            Some(Cap::Fixed(n)) => (Some(n), false),
            Some(Cap::Word(w)) if w == "auto" => (None, true),
            Some(Cap::Word(w)) => {
                return Err(de::Error::custom(format!(
                    "invalid max_connections {w:?}: expected a number or \"auto\""
                )))
            }
        };
        Ok(BackendSpec {
            address: t.address.parse().map_err(de::Error::custom)?,
            weight,
            max_connections,
            auto,
            backup: t.backup.unwrap_or(false),
        })
    }
}

/// Accepts one backend or a list of them, keeping the real error of a bad entry.
pub fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<BackendSpec>, D::Error> {
    struct V;
    impl<'de> de::Visitor<'de> for V {
        type Value = Vec<BackendSpec>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a backend or a list of backends")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            BackendVisitor.visit_str(v).map(|b| vec![b])
        }

        fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            BackendVisitor.visit_map(map).map(|b| vec![b])
        }

        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(b) = seq.next_element::<BackendSpec>()? {
                out.push(b);
            }
            Ok(out)
        }
    }
    d.deserialize_any(V)
}
